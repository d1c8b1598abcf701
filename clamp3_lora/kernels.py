"""Triton kernels of the fast encoder (CUDA): the patch embedding's gather-sum (`patch_kernel`) and
the post-LN block's dropout + residual + LayerNorm (`fused_layer_norm`).

The patch embedding is a Linear over the one-hot of a patch's 64 characters: for each patch, the
sum of 64 rows of a [64 * 128, hidden] table (row = position * 128 + character) plus the bias.
`F.embedding_bag` computes that sum without the one-hot, one bag per thread block, at about a
quarter of the GPU's L2 bandwidth (the table, a few MB, stays in L2). This kernel sums a tile of
patches x hidden columns per program, 64 row loads in flight per tile, in fp32, and rounds to the
table's dtype as embedding_bag does (the same additions in the same order), then adds the bias.

The post-LN block, LayerNorm(dropout(x) + residual) with a frozen LayerNorm, is one forward and one
backward kernel, a row per program (`dropout_add_layer_norm`): inductor's kernels for the same
block ran at a third of the memory bandwidth (BENCHMARKS.md), mostly for drawing one Philox random
number per element; here one Philox call gives the draws of four elements. The forward saves the
keep mask (int8) and each row's mean and 1/std; the backward recomputes the row from x, the residual
and the mask. The pair is a torch custom op with its own autograd, so that torch.compile keeps it as
one opaque call; the dropout seed is drawn from torch's CUDA generator on the device at each call,
so CUDA graphs draw fresh masks at each replay and a restored random state repeats them.

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


if triton is not None:
    @triton.jit
    def _norm_forward_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, keep_ptr, mean_ptr, rstd_ptr, seed_ptr, p, scale,
                             eps, N: tl.constexpr, BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        offs = row * N + cols
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if DROPOUT:
            quarter = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
            r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr), quarter)
            keep = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK,)) >= p
            # the dropped value is rounded to x's dtype, as F.dropout of a tensor of that dtype is
            x = tl.where(keep, x * scale, 0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(keep_ptr + offs, keep.to(tl.int8), mask=inside)
        x += tl.load(res_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        centred = tl.where(inside, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (centred * rstd * w + b).to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _norm_backward_kernel(grad_ptr, x_ptr, res_ptr, keep_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, scale,
                              N: tl.constexpr, BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        offs = row * N + cols
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = tl.load(keep_ptr + offs, mask=inside, other=0) != 0
            x = tl.where(keep, x * scale, 0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        x += tl.load(res_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(inside, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        g = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        dsum = tl.where(inside, (g - tl.sum(g, axis=0) / N - xhat * (tl.sum(g * xhat, axis=0) / N)) * rstd, 0.0)
        tl.store(dres_ptr + offs, dsum.to(dres_ptr.dtype.element_ty), mask=inside)
        if DROPOUT:
            dsum = tl.where(keep, dsum * scale, 0.0)
        tl.store(dx_ptr + offs, dsum.to(dx_ptr.dtype.element_ty), mask=inside)


def _norm_launch_settings(hidden):
    block = max(16, 1 << (hidden - 1).bit_length())  # a power of two (four draws per Philox call)
    return block, max(1, min(8, block // 256))


@torch.library.custom_op("clamp3_lora::dropout_add_layer_norm", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, hidden = x.shape
    y = torch.empty_like(residual)
    keep = torch.empty((rows, hidden) if p > 0 else (0,), device=x.device, dtype=torch.int8)
    mean, rstd = (torch.empty(rows, device=x.device, dtype=torch.float32) for _ in range(2))
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device=x.device, dtype=torch.int32) if p > 0 else mean
    if rows:
        block, warps = _norm_launch_settings(hidden)
        _norm_forward_kernel[(rows,)](x, residual, weight, bias, y, keep, mean, rstd, seed, p, 1.0 / (1.0 - p), eps,
                                      N=hidden, BLOCK=block, DROPOUT=p > 0, num_warps=warps)
    return y, keep, mean, rstd


@_norm_forward.register_fake
def _(x, residual, weight, bias, eps, p):
    rows, hidden = x.shape
    return (torch.empty_like(residual), x.new_empty((rows, hidden) if p > 0 else (0,), dtype=torch.int8),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("clamp3_lora::dropout_add_layer_norm_backward", mutates_args=())
def _norm_backward(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, keep: torch.Tensor,
                   weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   p: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, hidden = x.shape
    dx, dres = torch.empty_like(x), torch.empty_like(residual)
    if rows:
        block, warps = _norm_launch_settings(hidden)
        _norm_backward_kernel[(rows,)](grad, x, residual, keep, weight, mean, rstd, dx, dres, 1.0 / (1.0 - p),
                                       N=hidden, BLOCK=block, DROPOUT=p > 0, num_warps=warps)
    return dx, dres


@_norm_backward.register_fake
def _(grad, x, residual, keep, weight, mean, rstd, p):
    return torch.empty_like(x), torch.empty_like(residual)


def _norm_setup_context(ctx, inputs, output):
    x, residual, weight, _, _, p = inputs
    _, keep, mean, rstd = output
    ctx.save_for_backward(x, residual, keep, weight, mean, rstd)
    ctx.p = p


def _norm_autograd_backward(ctx, grad, *_):
    x, residual, keep, weight, mean, rstd = ctx.saved_tensors
    dx, dres = _norm_backward(grad.contiguous(), x, residual, keep, weight, mean, rstd, ctx.p)
    return dx, dres, None, None, None, None


_norm_forward.register_autograd(_norm_autograd_backward, setup_context=_norm_setup_context)


def dropout_add_layer_norm(x, residual, weight, bias, eps, p):
    """LayerNorm(dropout(x, p) + residual) over the last dimension, x and residual [T, hidden], in
    fp32 inside, returned in residual's dtype; weight and bias [hidden] frozen (no gradient).
    The same function as F.layer_norm(F.dropout(x, p, True).float() + residual.float(), ...)
    with its own dropout masks (p = 0: none)."""
    if bias is None:
        bias = torch.zeros_like(weight)
    return _norm_forward(x.contiguous(), residual.contiguous(), weight, bias, float(eps), float(p))[0]


__all__ = ["available", "patch_embedding", "dropout_add_layer_norm", "BLOCK_PATCHES", "BLOCK_HIDDEN"]
