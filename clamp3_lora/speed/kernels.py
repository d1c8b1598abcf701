"""A Triton kernel for the patch embedding's gather-sum (CUDA; the fast encoder's `patch_kernel`).

The patch embedding is a Linear over the one-hot of a patch's 64 characters: for each patch, the
sum of 64 rows of a [64 * 128, hidden] table (row = position * 128 + character) plus the bias.
`F.embedding_bag` computes that sum without the one-hot, one bag per thread block, at about a
quarter of the GPU's L2 bandwidth (the table, a few MB, stays in L2). This kernel sums a tile of
patches x hidden columns per program, 64 row loads in flight per tile, in fp32, and rounds to the
table's dtype as embedding_bag does (the same additions in the same order), then adds the bias.

A second kernel draws the keep-masks of a layer's three dropouts (fast.dropout_keep): one Philox
call gives the random numbers of four elements, where compiled dropout draws one call per element
(drawing was what kept the compiled dropout + residual + LayerNorm kernels far from memory
bandwidth, BENCHMARKS.md).

Triton is optional: `available(device)` says whether it can run (CUDA with Triton installed, or
Triton's CPU interpreter, TRITON_INTERPRET=1, which the tests use); the callers fall back to
embedding_bag and torch.rand otherwise.
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


KEEP_BLOCK = 1024  # Philox calls per program; each fills four blocks of elements

if triton is not None:
    @triton.jit
    def _keep_mask_kernel(seed_ptr, out_ptr, n, layer, t0, t1, t2, BLOCK: tl.constexpr):
        # Row m of out [3, n]: element kept where its 32-bit Philox number is >= t_m. Program i
        # draws, for each lane, one Philox call with counter (i * BLOCK + lane, layer, m, 0): its
        # four numbers decide the elements 4 * i * BLOCK + j * BLOCK + lane, j = 0..3.
        m = tl.program_id(1)
        lane = tl.arange(0, BLOCK)
        quad = tl.program_id(0) * BLOCK + lane
        zero = tl.zeros_like(quad)
        r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), quad, zero + layer, zero + m, zero)
        threshold = tl.where(m == 0, t0, tl.where(m == 1, t1, t2)).to(tl.int64)
        first = tl.program_id(0).to(tl.int64) * 4 * BLOCK + lane
        row = out_ptr + m.to(tl.int64) * n
        tl.store(row + first, r0.to(tl.int64) >= threshold, mask=first < n)
        tl.store(row + first + BLOCK, r1.to(tl.int64) >= threshold, mask=first + BLOCK < n)
        tl.store(row + first + 2 * BLOCK, r2.to(tl.int64) >= threshold, mask=first + 2 * BLOCK < n)
        tl.store(row + first + 3 * BLOCK, r3.to(tl.int64) >= threshold, mask=first + 3 * BLOCK < n)


def keep_masks(seed, layer, n, ps):
    """[3, n] bool: row m keeps each element with probability 1 - ps[m] (independently), from the
    Philox stream of (seed, layer, m); `seed` a one-element int64 tensor on the device (drawn from
    torch's generator, so a restored random state draws the same masks, and a CUDA graph replay
    new ones). The same (seed, layer) gives the same masks."""
    if len(ps) != 3 or not all(0.0 <= p <= 1.0 for p in ps):
        raise ValueError(f"keep_masks takes three probabilities in [0, 1], got {ps}")
    if 4 * KEEP_BLOCK * triton.cdiv(max(n, 1), 4 * KEEP_BLOCK) >= 2 ** 33:
        raise ValueError(f"keep_masks: {n} elements exceed the 32-bit Philox counter")
    out = torch.empty(3, n, dtype=torch.bool, device=seed.device)
    if n:
        thresholds = [min(int(p * 2 ** 32), 2 ** 32) for p in ps]
        grid = (triton.cdiv(n, 4 * KEEP_BLOCK), 3)
        _keep_mask_kernel[grid](seed, out, n, layer, *thresholds, BLOCK=KEEP_BLOCK)
    return out


__all__ = ["available", "patch_embedding", "keep_masks", "BLOCK_PATCHES", "BLOCK_HIDDEN", "KEEP_BLOCK"]
