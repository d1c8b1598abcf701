"""The Triton kernels (clamp3_lora/kernels.py): the patch embedding computes embedding_bag's sums;
dropout + residual + LayerNorm computes what the PyTorch ops compute, gradients included.

Run on the CPU under Triton's interpreter (TRITON_INTERPRET=1, read when the kernel is defined, so
in a subprocess); skipped where Triton is not installed. The GPU compiles the same kernel: the
benchmark's checks compare the fast path with it against the plain fp32 path before timing.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from clamp3_lora import fast, kernels
    from clamp3_lora.model import load_model

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert kernels.available(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for patches, hidden in ((37, 200), (16, 256), (1, 8)):  # tails in both tile directions
        table = torch.randn(64 * 128, hidden, generator=gen)
        bias = torch.randn(hidden, generator=gen)
        chars = torch.randint(0, 128, (patches, 64), generator=gen)
        ids = chars + torch.arange(64) * 128
        exact = F.embedding_bag(ids, table.double(), mode="sum") + bias.double()
        got = kernels.patch_embedding(chars, table, bias, 128)
        assert got.dtype == torch.float32 and got.shape == (patches, hidden)
        assert rel(got, exact) < 1e-6, rel(got, exact)
        got16 = kernels.patch_embedding(chars, table.bfloat16(), bias, 128)
        ref16 = F.embedding_bag(ids, table.bfloat16().double(), mode="sum").bfloat16().double() + bias.double()
        assert got16.dtype == torch.float32 and rel(got16, ref16) < 1e-2, rel(got16, ref16)
        wrong = kernels.patch_embedding(chars.flip(1), table, bias, 128)  # positions matter
        assert rel(wrong, exact) > 0.1
    assert kernels.patch_embedding(torch.zeros(0, 64, dtype=torch.long), table, bias, 128).shape == (0, hidden)

    torch.manual_seed(0)
    model = load_model(None, preset="tiny", text_model=None).eval()
    patches = torch.randint(0, 128, (3, 9, 64))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    ref = model.music_features(patches, mask)
    assert model.prepare_for_training("fp32", patch_kernel=True)["patch_kernel"]
    with_kernel = model.music_features(patches, mask)
    model.prepare_for_training("fp32", patch_kernel=False)
    without = model.music_features(patches, mask)
    assert rel(with_kernel, ref) < 1e-5 and rel(without, ref) < 1e-5, (rel(with_kernel, ref), rel(without, ref))
    print("ok")
""")


def test_patch_kernel_equals_embedding_bag_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


NORM_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from clamp3_lora import fast, kernels
    from clamp3_lora.model import load_model

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    def reference(x, residual, weight, bias, keep, p):
        # F.dropout with the kernel's mask: x * keep * 1/(1-p) in fp32, rounded to x's dtype
        dropped = (x.float() * keep * (1 / (1 - p))).to(x.dtype)
        return F.layer_norm(dropped.float() + residual.float(), (x.shape[1],), weight.float(), bias.float(),
                            1e-12).to(residual.dtype)

    gen = torch.Generator().manual_seed(0)
    for rows, hidden, p in ((37, 48, 0.0), (37, 48, 0.3), (3, 200, 0.5), (1, 8, 0.1)):
        x = torch.randn(rows, hidden, generator=gen, requires_grad=True)
        residual = torch.randn(rows, hidden, generator=gen, requires_grad=True)
        weight = 1 + 0.1 * torch.randn(hidden, generator=gen)
        bias = 0.1 * torch.randn(hidden, generator=gen)
        grad = torch.randn(rows, hidden, generator=gen)
        y, keep, mean, rstd = kernels._norm_forward(x, residual, weight, bias, 1e-12, p)
        mask = keep.bool() if p else torch.ones(rows, hidden, dtype=torch.bool)
        if p and rows * hidden > 1000:
            assert abs(mask.float().mean().item() - (1 - p)) < 0.05, mask.float().mean()
        x_ref, residual_ref = x.detach().requires_grad_(), residual.detach().requires_grad_()
        ref = reference(x_ref, residual_ref, weight, bias, mask, p)
        ref.backward(grad)
        assert rel(y, ref) < 1e-6, rel(y, ref)
        out = kernels.dropout_add_layer_norm(x, residual, weight, bias, 1e-12, p)
        out.backward(grad)
        if p == 0:
            assert rel(out, ref) < 1e-6 and rel(x.grad, x_ref.grad) < 1e-6 and rel(residual.grad, residual_ref.grad) < 1e-6
        dx, dres = kernels._norm_backward(grad, x.detach(), residual.detach(), keep, weight, mean, rstd, p)
        assert rel(dx, x_ref.grad) < 1e-6 and rel(dres, residual_ref.grad) < 1e-6, (rel(dx, x_ref.grad), rel(dres, residual_ref.grad))
        if p:
            again = kernels.dropout_add_layer_norm(x, residual, weight, bias, 1e-12, p)
            assert rel(again, out) > 1e-3  # a fresh mask at each call
            torch.manual_seed(5)
            first = kernels.dropout_add_layer_norm(x, residual, weight, bias, 1e-12, p)
            torch.manual_seed(5)
            assert torch.equal(kernels.dropout_add_layer_norm(x, residual, weight, bias, 1e-12, p), first)
    # x in half precision, the residual in fp32: the dropped value is rounded to x's dtype first, as
    # F.dropout rounds (fp16 here: the interpreter rounds bf16 by truncation, the GPU to nearest)
    x = torch.randn(4, 32, generator=gen).half()
    residual = torch.randn(4, 32, generator=gen)
    y, keep, _, _ = kernels._norm_forward(x, residual, torch.ones(32), torch.zeros(32), 1e-12, 0.3)
    assert y.dtype == torch.float32
    assert rel(y, reference(x, residual, torch.ones(32), torch.zeros(32), keep.bool(), 0.3)) < 1e-6
    assert rel(y, reference(x.float(), residual, torch.ones(32), torch.zeros(32), keep.bool(), 0.3)) > 1e-5

    # The fast encoder with the kernels computes the plain path's features, loss and LoRA gradients.
    torch.manual_seed(0)
    model = load_model(None, preset="tiny", text_model=None)
    model.add_adapter()
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    patches = torch.randint(0, 128, (3, 9, 64))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0

    def outputs():
        model.zero_grad(set_to_none=True)
        music = model.music_features(patches, mask)
        music.square().sum().backward()
        return music.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_grads = outputs()
    assert model.prepare_for_training("fp32")["fused_layer_norm"]
    calls = []
    kernel = kernels.dropout_add_layer_norm
    fast.kernels.dropout_add_layer_norm = lambda *a: calls.append(1) or kernel(*a)
    music, grads = outputs()
    assert len(calls) == 2 * model.config.symbolic_layers, len(calls)
    assert rel(music, plain) < 1e-5 and max(rel(grads[n], plain_grads[n]) for n in grads) < 1e-5
    assert not model.prepare_for_training("fp32", fused_layer_norm=False)["fused_layer_norm"]
    calls.clear()
    outputs()
    assert not calls
    print("ok")
""")


def test_dropout_add_layer_norm_kernels_equal_the_pytorch_ops_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", NORM_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
