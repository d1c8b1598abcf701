"""DDP benchmark of the training step on several GPUs (multi-GPU issue). Never part of the test suite.

    torchrun --standalone --nproc_per_node=1 bench/ddp_step.py --out bench_out   # one GPU, the baseline
    torchrun --standalone --nproc_per_node=2 bench/ddp_step.py --out bench_out   # two GPUs
    torchrun --standalone --nproc_per_node=2 bench/ddp_step.py --smoke --device cpu --out /tmp/x  # gloo, tiny

Each process does what the trainer does under torchrun, and nothing else:
- joins the process group with clamp3_lora.distributed.setup (NCCL on cuda:LOCAL_RANK, gloo with
  --device cpu);
- builds the same model on every rank: the full-size preset with random weights and an adapter with
  random B matrices (bench/train_step.base_state, seed 0), prepared with the project's default fast
  paths, whatever they are (bench/train_step.build -> clamp3_lora.speed.accelerate(model, "bf16") with its
  defaults, as the trainer calls it with config.py's defaults);
- wraps it in DistributedDataParallel with clamp3_lora.train.wrap_ddp;
- times bench/train_step.real_step, the trainer's step (to_device, bf16 autocast, forward_loss with
  gather=distributed.gather_with_grad, so the CLIP loss sees the global batch, backward with DDP's
  gradient all-reduce, the one host read, AdamW step: clamp3_lora.step.Step) on random full-length batches: 512 patches and
  128 text tokens per sample, --batch samples per rank, different samples on each rank.

Timing is bench/train_step.time_steps: --warmup steps first (torch.compile, DDP's bucket set-up), then
--blocks blocks of --steps steps between torch.cuda.synchronize() calls; the median block gives
ms/step. The ranks run in lock step (they meet in the all-gather and the all-reduce of every step).

Rank 0 writes OUT/ddp_N.json (N = world size; every rank's numbers in it) and prints one line:
    ddp_step world N (nccl) | CARD | full 512 patches, 128 tokens | batch 32/rank | MS ms/step | RATE samples/s total ...
bench/multi_gpu.sh runs it with 1 and then 2 processes and computes the scaling efficiency.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from clamp3_lora import distributed, train  # noqa: E402
from train_step import FULL, SMOKE, VARIANTS, base_state, build, full_batches, real_step, time_steps  # noqa: E402


def card_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def nccl_version():
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 -- a CPU build of torch has no NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def measure(args, where):
    """This rank's numbers: build, wrap, warm up, time."""
    spec = SMOKE if args.smoke else FULL
    device = where.device
    config, state = base_state(spec["preset"])  # seed 0: the same weights on every rank, as the trainer
    model = build(config, state, device, args.variant)
    del state
    train_model = train.wrap_ddp(model, device) if where.distributed else model
    gather = distributed.gather_with_grad if where.distributed else None
    batches = full_batches(args.batch, spec["length"], spec["text_tokens"], device, seed=1 + where.rank,
                           vocab=config.text_vocab_size)
    step = real_step(train_model, device, gather=gather)
    distributed.barrier()  # start together: the warm-up (compilation) of each rank is then comparable
    started = time.perf_counter()
    ms, blocks_ms, (peak, reserved) = time_steps(step, batches, device, args.warmup, args.blocks, args.steps)
    total_s = time.perf_counter() - started
    return {"rank": where.rank, "device": str(device), "card": card_name(device), "ms_per_step": ms,
            "blocks_ms": blocks_ms, "samples_per_s": args.batch * 1000 / ms, "peak_gib": peak,
            "reserved_gib": reserved, "warmup_s": total_s - sum(blocks_ms) * args.steps / 1000}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out", help="folder for ddp_N.json, N = world size (default bench_out)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset, 64 patches, 32 text tokens, 2 blocks of 2 steps (CPU or GPU)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default): each process drives cuda:LOCAL_RANK, NCCL; cpu: gloo (use with --smoke)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step on EACH rank (default 32; 4 with --smoke)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first, compilation included (default 5; 1 with --smoke)")
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks; the median block counts (default 5; 2 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block (default 8; 2 with --smoke)")
    parser.add_argument("--variant", default="fast", choices=list(VARIANTS),
                        help="fast paths as bench/train_step.py's levers name them (default fast: the project "
                             "defaults)")
    parser.add_argument("--dist-timeout-s", type=int, default=300,
                        help="timeout of every collective in seconds: a lost rank ends the run instead of "
                             "hanging it (default 300)")
    args = parser.parse_args(argv)
    defaults = dict(batch=4, warmup=1, blocks=2, steps=2) if args.smoke else dict(batch=32, warmup=5, blocks=5, steps=8)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notes per model
    spec = SMOKE if args.smoke else FULL

    where = distributed.setup(args.device, args.dist_timeout_s)
    try:
        row = measure(args, where)
        rows = distributed.all_gather_objects(row)
        if where.is_main:
            import peft
            import transformers
            backend = torch.distributed.get_backend() if where.distributed else "none"
            result = {
                "world_size": where.world_size, "backend": backend, "ddp": where.distributed, "card": row["card"],
                "variant": args.variant,
                "preset": spec["preset"], "patches": spec["length"], "text_tokens": spec["text_tokens"],
                "batch_per_rank": args.batch, "global_batch": args.batch * where.world_size,
                "precision": "bf16" if where.device.type == "cuda" else "fp32 (no autocast on the CPU)",
                "warmup": args.warmup, "blocks": args.blocks, "steps": args.steps,
                "ms_per_step": max(r["ms_per_step"] for r in rows),           # the slowest rank sets the pace
                "ms_per_step_median_rank": statistics.median(r["ms_per_step"] for r in rows),
                "samples_per_s_total": sum(r["samples_per_s"] for r in rows),
                "samples_per_s_per_rank": [r["samples_per_s"] for r in rows],
                "peak_gib": max(r["peak_gib"] for r in rows),               # max over ranks
                "reserved_gib": max(r["reserved_gib"] for r in rows),
                "warmup_s": max(r["warmup_s"] for r in rows),
                "ranks": rows,
                "env": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                        "cuda": torch.version.cuda, "nccl": nccl_version(), "transformers": transformers.__version__,
                        "peft": peft.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                        "command": " ".join([sys.executable] + sys.argv)},
            }
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"ddp_{where.world_size}.json"
            path.write_text(json.dumps(result, indent=2) + "\n")
            per_rank = " ".join(f"{r:.1f}" for r in result["samples_per_s_per_rank"])
            print(f"ddp_step world {where.world_size} ({backend}) | {row['card']} | {spec['preset']} "
                  f"{spec['length']} patches, {spec['text_tokens']} tokens | batch {args.batch}/rank | "
                  f"{result['ms_per_step']:.2f} ms/step | {result['samples_per_s_total']:.1f} samples/s total "
                  f"(per rank {per_rank}) | peak {result['peak_gib']:.2f} GiB (reserved {result['reserved_gib']:.2f}) | "
                  f"warm-up {result['warmup_s']:.0f} s "
                  f"| {path}", flush=True)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
