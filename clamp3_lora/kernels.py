"""A Triton kernel for the patch embedding's gather-sum (CUDA; the fast encoder's `patch_kernel`).

The patch embedding is a Linear over the one-hot of a patch's 64 characters: for each patch, the
sum of 64 rows of a [64 * 128, hidden] table (row = position * 128 + character) plus the bias.
`F.embedding_bag` computes that sum without the one-hot, one bag per thread block, at about a
quarter of the GPU's L2 bandwidth (the table, a few MB, stays in L2). This kernel sums a tile of
patches x hidden columns per program, 64 row loads in flight per tile, in fp32, and rounds to the
table's dtype as embedding_bag does (the same additions in the same order), then adds the bias.

Triton is optional: `available(device)` says whether it can run (CUDA with Triton installed, or
Triton's CPU interpreter, TRITON_INTERPRET=1, which the tests use); the caller falls back to
embedding_bag otherwise.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: torch's CPU wheels come without Triton
    triton = None

BLOCK_PATCHES = 16
BLOCK_HIDDEN = 256


def available(device):
    """Whether the kernel can run on `device` (CUDA with Triton; the CPU under Triton's interpreter)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _gather_sum_kernel(chars_ptr, table_ptr, bias_ptr, out_ptr, patches, hidden,
                           SIZE: tl.constexpr, CLASSES: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < patches
        col_ok = cols < hidden
        both = row_ok[:, None] & col_ok[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for position in range(SIZE):
            char = tl.load(chars_ptr + rows.to(tl.int64) * SIZE + position, mask=row_ok, other=0)
            table_row = (position * CLASSES + char).to(tl.int64)
            acc += tl.load(table_ptr + table_row[:, None] * hidden + cols[None, :], mask=both, other=0.0).to(tl.float32)
        summed = acc.to(table_ptr.dtype.element_ty).to(tl.float32)  # rounded as embedding_bag rounds
        summed += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], summed, mask=both)


def patch_embedding(chars, table, bias, classes):
    """chars [N, P] ints in 0..classes-1, table [P * classes, hidden] (the weight transposed,
    contiguous), bias [hidden] -> [N, hidden]: table rows position * classes + char summed per
    patch (fp32, rounded to table.dtype), plus the bias, in the dtype that `summed + bias` has."""
    patches, size = chars.shape
    hidden = table.shape[1]
    out = torch.empty(patches, hidden, device=chars.device, dtype=torch.promote_types(table.dtype, bias.dtype))
    if patches:
        grid = (triton.cdiv(patches, BLOCK_PATCHES), triton.cdiv(hidden, BLOCK_HIDDEN))
        _gather_sum_kernel[grid](chars.contiguous(), table.contiguous(), bias.contiguous(), out, patches, hidden,
                                 SIZE=size, CLASSES=classes, BLOCK_P=BLOCK_PATCHES, BLOCK_H=BLOCK_HIDDEN)
    return out


__all__ = ["available", "patch_embedding", "BLOCK_PATCHES", "BLOCK_HIDDEN"]
