"""Candidate kernels of the training step, timed alone at the batch-128 full-length shape (GPU only).

Not the trainer: each block times one piece of the encoder layer in isolation, forward and
backward, to decide which levers are worth building into clamp3_lora/fast.py:

- attention: flash attention's variable-length kernel (the current path), the same on q/k/v that
  are strided views of one [T, 3 * hidden] projection (no copies), and SDPA over dense
  [B, heads, S, head size] rows with each backend (flash, cuDNN, memory-efficient);
- patch embedding: embedding_bag against a compiled gather-sum, and their agreement;
- feed-forward (Linear, GELU, Linear; gradient of the input only, as in LoRA training): torch.compile
  by default against max-autotune (GEMM templates with the GELU fused in);
- dropout + residual + LayerNorm, compiled: the random numbers drawn in the kernel, no dropout, a
  mask drawn before; and aten's own mask draws (what drawing random numbers costs);
- the same block as two hand-written Triton kernels (forward; backward with a frozen LayerNorm
  weight), several rows per program, against the compiled block and against the bytes it must move.

    python3 bench/kernel_probe.py --out $OUT [--parts attention,dropout_layer_norm]
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, warmup=3, reps=10):
    """Median ms of fn() over reps, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def attention(batch, length, heads, size, results):
    device = "cuda"
    tokens = batch * length
    hidden = heads * size
    cu = torch.arange(0, tokens + 1, length, device=device, dtype=torch.int32)
    qkv = torch.randn(tokens, 3 * hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, heads, size, device=device, dtype=torch.bfloat16)
    scale = size ** -0.5

    def parts(copy):
        q, k, v = (t.view(tokens, heads, size) for t in qkv.split(hidden, dim=1))
        return tuple(t.contiguous() for t in (q, k, v)) if copy else (q, k, v)

    def varlen(copy):
        def run(p):
            return torch.ops.aten._flash_attention_forward(*parts(copy), cu, cu, length, length, p, False, False,
                                                           scale=scale)[0]
        return run

    def dense(backend):
        def run(p):
            q, k, v = (t.view(batch, length, heads, size).transpose(1, 2) for t in parts(False))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
            return out.transpose(1, 2).reshape(tokens, heads, size)
        return run

    def with_grad(run, p):
        qkv.grad = None
        out = run(p)
        out.backward(grad)
        return out.detach(), qkv.grad.clone()

    variants = {"varlen_flash_contiguous": varlen(True), "varlen_flash_strided": varlen(False),
                "dense_flash": dense(SDPBackend.FLASH_ATTENTION), "dense_cudnn": dense(SDPBackend.CUDNN_ATTENTION),
                "dense_efficient": dense(SDPBackend.EFFICIENT_ATTENTION)}
    ref = with_grad(variants["varlen_flash_contiguous"], 0.0)
    rows = {}
    for name, run in variants.items():
        row = {}
        try:
            out, grads = with_grad(run, 0.0)
            row["out_err"], row["grad_err"] = rel(out, ref[0]), rel(grads, ref[1])
            for p in (0.1, 0.0):
                row[f"ms_fwd_bwd_p{p}"] = bench(lambda: run(p).backward(grad))
        except Exception as error:  # noqa: BLE001 -- a backend that cannot run is a result too
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows[name] = row
        print(f"  attention {name:26s} {row}", flush=True)
    # Dropout inside the kernels: one draw and the mean of 32 draws against the output without
    # dropout (the same spread for both kernels = the same keep rate and scaling).
    stats = {}
    for name in ("varlen_flash_strided", "dense_cudnn"):
        if "error" in rows[name]:
            continue
        with torch.no_grad():
            exact = variants[name](0.0)
            draws = [variants[name](0.1).float() for _ in range(32)]
        stats[name] = {"one_draw": rel(draws[0], exact), "mean_of_32": rel(sum(draws) / 32, exact)}
    rows["dropout_spread"] = stats
    print(f"  attention dropout spread {stats}", flush=True)
    results["attention"] = rows


def patch_embedding(tokens, size, classes, hidden, results):
    device = "cuda"
    table = torch.randn(size * classes, hidden, device=device).to(torch.bfloat16)
    chars = torch.randint(0, classes, (tokens, size), device=device)
    ids = chars + torch.arange(size, device=device) * classes
    ref = table.float()[ids].sum(1)

    def bag():
        return F.embedding_bag(ids, table, mode="sum")

    def gather_sum(ids, table):
        return table[ids].float().sum(1).to(table.dtype)

    compiled = torch.compile(gather_sum, fullgraph=True)
    rows = {"embedding_bag": {"ms": bench(bag), "err": rel(bag(), ref)},
            "compiled_gather_sum": {"ms": bench(lambda: compiled(ids, table)), "err": rel(compiled(ids, table), ref)}}
    for name, row in rows.items():
        print(f"  patch embedding {name:22s} {row}", flush=True)
    results["patch_embedding"] = rows


def feed_forward(tokens, hidden, inner, results, modes):
    device = "cuda"
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(inner, hidden, device=device, dtype=torch.bfloat16) * hidden ** -0.5
    b1 = torch.randn(inner, device=device, dtype=torch.bfloat16) * 0.1
    w2 = torch.randn(hidden, inner, device=device, dtype=torch.bfloat16) * inner ** -0.5
    b2 = torch.randn(hidden, device=device, dtype=torch.bfloat16) * 0.1
    grad = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)

    def ffn(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    x.grad = None
    ffn(x, w1, b1, w2, b2).backward(grad)
    ref = x.grad.clone()
    rows = {}
    for mode in modes:
        row = {}
        torch._dynamo.reset()
        fn = torch.compile(ffn, mode=None if mode == "default" else mode)
        try:
            started = time.time()
            x.grad = None
            fn(x, w1, b1, w2, b2).backward(grad)
            row["compile_s"] = time.time() - started
            row["grad_err"] = rel(x.grad, ref)
            row["ms_fwd_bwd"] = bench(lambda: fn(x, w1, b1, w2, b2).backward(grad))
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows[mode] = row
        print(f"  feed-forward {mode:30s} {row}", flush=True)
    results["feed_forward"] = rows


def dropout_layer_norm(tokens, hidden, results):
    """The post-LN block (dropout, residual, LayerNorm; forward and backward), compiled: with
    dropout drawn inside the kernel, without dropout, and with a mask drawn before (aten's RNG).
    The difference tells what drawing the random numbers costs inside inductor's kernels."""
    device = "cuda"
    a = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w, b = torch.ones(hidden, device=device), torch.zeros(hidden, device=device)
    grad = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)

    def drawn(a, h, p):
        return F.layer_norm(F.dropout(a, p, True).float() + h.float(), (hidden,), w, b).to(torch.bfloat16)

    def masked(a, h, keep):
        return F.layer_norm((a * keep / 0.9).float() + h.float(), (hidden,), w, b).to(torch.bfloat16)

    compiled_drawn, compiled_masked = torch.compile(drawn), torch.compile(masked)
    keep = torch.rand(tokens, hidden, device=device) >= 0.1
    rows = {
        "drawn_in_kernel_p0.1": bench(lambda: compiled_drawn(a, h, 0.1).backward(grad)),
        "no_dropout": bench(lambda: compiled_drawn(a, h, 0.0).backward(grad)),
        "mask_given": bench(lambda: compiled_masked(a, h, keep).backward(grad)),
        "aten_mask_draw": bench(lambda: torch.rand(tokens, hidden, device=device) >= 0.1),
        "aten_bernoulli_bool": bench(lambda: torch.empty(tokens, hidden, device=device, dtype=torch.bool).bernoulli_(0.9)),
        "aten_dropout_bf16": bench(lambda: torch.ops.aten.native_dropout(a.detach(), 0.1, True)),
    }
    try:
        from torch._inductor.codegen.triton import TritonOverrides
        rows["inductor_rand4x"] = hasattr(TritonOverrides, "_can_use_4x_random")
    except ImportError:
        rows["inductor_rand4x"] = None
    print(f"  dropout + LayerNorm {rows}", flush=True)
    results["dropout_layer_norm"] = rows


def triton_layer_norm(tokens, hidden, results, device="cuda", p=0.1, eps=1e-12, timing=True):
    """y = LayerNorm(dropout(a) + h) (a, h, y bf16; fp32 math; dropout rounded to bf16 as
    F.dropout on a bf16 tensor rounds) with a frozen weight and bias, forward and backward as two
    Triton kernels: the forward saves the keep mask (int8) and each row's mean and 1/std, the
    backward recomputes the normalised row from a, h and the mask. Checked against autograd through
    F.layer_norm with the same mask, then timed against torch.compile of the same block."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward(a_ptr, h_ptr, w_ptr, b_ptr, y_ptr, keep_ptr, mean_ptr, rstd_ptr, seed_ptr, n_rows, p, scale,
                eps, N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        keep = tl.rand(tl.load(seed_ptr), offs) >= p
        x = tl.where(keep, a * scale, 0.0).to(tl.bfloat16).to(tl.float32) + h
        mean = tl.sum(x, axis=1) / N
        centred = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0)
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offs, y.to(tl.bfloat16), mask=inside)
        tl.store(keep_ptr + offs, keep.to(tl.int8), mask=inside)
        tl.store(mean_ptr + rows, mean, mask=rows < n_rows)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def backward(dy_ptr, a_ptr, h_ptr, keep_ptr, w_ptr, mean_ptr, rstd_ptr, da_ptr, dh_ptr, n_rows, scale,
                 N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        keep = tl.load(keep_ptr + offs, mask=inside, other=0) != 0
        a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        x = tl.where(keep, a * scale, 0.0).to(tl.bfloat16).to(tl.float32) + h
        mean = tl.load(mean_ptr + rows, mask=rows < n_rows, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
        xhat = tl.where(inside, (x - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0)
        g = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32) * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = tl.where(inside, (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
        tl.store(dh_ptr + offs, dx.to(tl.bfloat16), mask=inside)
        tl.store(da_ptr + offs, tl.where(keep, dx * scale, 0.0).to(tl.bfloat16), mask=inside)

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(tokens, hidden, device=device, generator=gen).to(torch.bfloat16)
    h = torch.randn(tokens, hidden, device=device, generator=gen).to(torch.bfloat16)
    w = 1 + 0.1 * torch.randn(hidden, device=device, generator=gen)
    b = 0.1 * torch.randn(hidden, device=device, generator=gen)
    dy = torch.randn(tokens, hidden, device=device, generator=gen).to(torch.bfloat16)
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device=device, generator=gen, dtype=torch.int32)
    scale, block = 1.0 / (1.0 - p), triton.next_power_of_2(hidden)
    y, da, dh = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    keep = torch.empty(tokens, hidden, device=device, dtype=torch.int8)
    mean, rstd = (torch.empty(tokens, device=device) for _ in range(2))

    def run(rows, warps, backward_too=True):
        grid = (triton.cdiv(tokens, rows),)
        forward[grid](a, h, w, b, y, keep, mean, rstd, seed, tokens, p, scale, eps, N=hidden, BLOCK=block,
                      ROWS=rows, num_warps=warps)
        if backward_too:
            backward[grid](dy, a, h, keep, w, mean, rstd, da, dh, tokens, scale, N=hidden, BLOCK=block, ROWS=rows,
                           num_warps=warps)

    run(1, 4)
    ref_a, ref_h = a.clone().requires_grad_(), h.clone().requires_grad_()
    dropped = (ref_a * keep.bool() * scale).to(torch.bfloat16).float()
    ref = F.layer_norm(dropped + ref_h.float(), (hidden,), w, b, eps)
    ref.backward(dy.float())
    rows = {"y_err": rel(y, ref), "da_err": rel(da, ref_a.grad), "dh_err": rel(dh, ref_h.grad),
            "kept": keep.float().mean().item()}
    if timing:
        def block_fn(a, h):
            return F.layer_norm(F.dropout(a, p, True).float() + h.float(), (hidden,), w, b, eps).to(torch.bfloat16)
        compiled = torch.compile(block_fn)
        ga, gh = a.clone().requires_grad_(), h.clone().requires_grad_()
        rows["compiled_fwd_bwd"] = bench(lambda: compiled(ga, gh).backward(dy))
        rows["compiled_fwd"] = bench(lambda: compiled(ga, gh))
        for r, nw in ((1, 4), (2, 4), (4, 8), (8, 8), (16, 16)):
            rows[f"triton_rows{r}_warps{nw}_fwd_bwd"] = bench(lambda: run(r, nw))
            rows[f"triton_rows{r}_warps{nw}_fwd"] = bench(lambda: run(r, nw, False))
        moved = tokens * hidden * (2 + 2 + 2 + 1 + 2 + 2 + 2 + 1 + 2 + 2)  # fwd: a h y keep; bwd: dy a h keep da dh
        rows["bytes_fwd_bwd_gb"] = moved / 1e9
        source = torch.empty(moved // 4, device=device, dtype=torch.bfloat16)  # read + written: `moved` bytes
        target = torch.empty_like(source)
        rows["copy_same_bytes"] = bench(lambda: target.copy_(source))
    print(f"  Triton dropout + LayerNorm {rows}", flush=True)
    results["triton_layer_norm"] = rows
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--modes", default="default,max-autotune-no-cudagraphs")
    parser.add_argument("--parts", default="attention,patch_embedding,feed_forward,dropout_layer_norm,"
                        "triton_layer_norm",
                        help="comma-separated probes to run")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "batch": args.batch}
    print(f"== {results['card']} torch {results['torch']}", flush=True)
    tokens = args.batch * 512
    parts = args.parts.split(",")
    if "attention" in parts:
        attention(args.batch, 512, 12, 64, results)
    if "patch_embedding" in parts:
        patch_embedding(tokens, 64, 128, 768, results)
    if "feed_forward" in parts:
        feed_forward(tokens, 768, 3072, results, args.modes.split(","))
    if "dropout_layer_norm" in parts:
        dropout_layer_norm(tokens, 768, results)
    if "triton_layer_norm" in parts:
        triton_layer_norm(tokens, 768, results)
    with open(os.path.join(args.out, "kernel_probe.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
