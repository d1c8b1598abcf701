"""The Triton patch-embedding kernel (clamp3_lora/kernels.py) computes embedding_bag's sums.

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
