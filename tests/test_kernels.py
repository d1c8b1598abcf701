"""The Triton kernels (clamp3_lora/kernels.py): the patch embedding computes embedding_bag's sums,
and the dropout keep-masks are Bernoulli draws reproducible from torch's random state.

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
    from clamp3_lora.speed import accelerate, fast, kernels
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
    assert accelerate(model, "fp32", patch_kernel=True)["patch_kernel"]
    with_kernel = model.music_features(patches, mask)
    accelerate(model, "fp32", patch_kernel=False)
    without = model.music_features(patches, mask)
    assert rel(with_kernel, ref) < 1e-5 and rel(without, ref) < 1e-5, (rel(with_kernel, ref), rel(without, ref))
    print("ok")
""")


def run_under_the_interpreter(script):
    """Run `script` in a subprocess with TRITON_INTERPRET=1; assert it ends by printing "ok"."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_patch_kernel_equals_embedding_bag_under_the_interpreter():
    run_under_the_interpreter(SCRIPT)


KEEP_SCRIPT = textwrap.dedent("""
    import torch
    from clamp3_lora.speed import accelerate, kernels
    from clamp3_lora.model import load_model

    assert kernels.available(torch.device("cpu"))
    seed = torch.tensor([12345], dtype=torch.int64)
    n = 3 * 4 * kernels.KEEP_BLOCK + 37  # several programs and a tail
    ps = (0.1, 0.6, 0.1)
    masks = kernels.keep_masks(seed, 5, n, ps)
    assert masks.dtype == torch.bool and masks.shape == (3, n)
    for row, p in zip(masks, ps):
        kept = row.double().mean().item()
        assert abs(kept - (1 - p)) <= 5 * (p * (1 - p) / n) ** 0.5, (kept, p)
    assert torch.equal(masks, kernels.keep_masks(seed, 5, n, ps))          # same seed and layer: same masks
    for other in (kernels.keep_masks(seed, 6, n, ps), kernels.keep_masks(seed + 1, 5, n, ps)):
        assert 0.1 < (other[0] != masks[0]).double().mean() < 0.3           # another layer or seed: new draws
    assert 0.1 < (masks[0] != masks[2]).double().mean() < 0.3               # rows are separate streams
    block = kernels.KEEP_BLOCK
    assert not torch.equal(masks[0, :block], masks[0, block:2 * block])     # a call's four numbers differ
    assert not kernels.keep_masks(seed, 0, 100, (1.0, 1.0, 1.0)).any()
    assert kernels.keep_masks(seed, 0, 100, (0.0, 0.0, 0.0)).all()
    assert kernels.keep_masks(seed, 0, 0, ps).shape == (3, 0)

    torch.manual_seed(0)
    model = load_model(None, preset="tiny", text_model=None)
    model.add_adapter()
    accelerate(model, "fp32")
    model.train()
    patches = torch.randint(0, 128, (3, 9, 64))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    torch.manual_seed(1)
    first = model.music_features(patches, mask)
    second = model.music_features(patches, mask)
    torch.manual_seed(1)
    again = model.music_features(patches, mask)
    assert torch.equal(first, again) and not torch.equal(first, second)   # the torch random state decides
    print("ok")
""")


def test_keep_masks_are_bernoulli_draws_reproducible_from_the_random_state_under_the_interpreter():
    run_under_the_interpreter(KEEP_SCRIPT)
