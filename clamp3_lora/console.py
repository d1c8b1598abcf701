"""What a training run prints: the banner, stage and epoch rules, epoch summaries, the final summary.

Rank 0 alone prints progress (through tqdm, so the progress bars stay intact); every rank prints errors.
"""
import sys
import time

import torch
from tqdm import tqdm

WIDTH = 78


def format_value(value):
    return "n/a" if value is None else f"{value:.6f}"


def format_counts(counts):
    total = sum(counts.values())
    return f"{total}" + (" (" + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + ")" if total else "")


class Console:
    """Progress text on rank 0 (stdout, through tqdm so bars stay intact); errors on every rank."""

    def __init__(self, dist):
        self.enabled = dist.is_main
        self.prefix = f"[rank {dist.rank}] " if dist.world_size > 1 else ""
        self.color = self.enabled and sys.stdout.isatty()

    def say(self, text=""):
        if self.enabled:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def error(self, text):
        tqdm.write(self.prefix + text, file=sys.stderr)
        sys.stderr.flush()

    def paint(self, text, code):
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def rule(self, title):
        self.say(self.paint("=" * WIDTH, "1;36"))
        self.say(self.paint(title, "1;36"))
        self.say(self.paint("=" * WIDTH, "1;36"))

    def epoch_rule(self, stage, epoch, epochs):
        self.say(self.paint(f"── [{stage}] Epoch {epoch}/{epochs} " + "─" * max(0, WIDTH - 20), "36"))

    def base_summary(self, stage, entry):
        metrics, chance = entry["metrics"], entry["chance"]
        self.say(f"✓ [{stage}] Base model (epoch 0, before training) on {entry['eval_pairs']} validation pairs: "
                 f"Eval Loss {entry['eval_loss']:.6f}, t2m MRR {metrics['t2m_mrr']:.4f}, m2t MRR "
                 f"{metrics['m2t_mrr']:.4f} (chance {chance['t2m_mrr']:.4f})")

    def epoch_summary(self, stage, entry, cfg, progress, improved, adapter_dir, checkpoint_path):
        memory = entry["gpu_memory"]
        metrics, chance = entry["metrics"], entry["chance"]
        lines = [
            f"✓ [{stage}] Epoch {entry['epoch']}/{cfg.epochs} done in {entry['time']:.1f}s ({entry['time'] / 60:.2f} min)",
            f"    Train Loss: {entry['train_loss']:.6f}    Eval Loss: {entry['eval_loss']:.6f}",
            f"    Best eval loss so far: {format_value(progress.best_eval_loss)} (epoch {progress.best_eval_loss_epoch})",
        ]
        if cfg.best_metric != "eval_loss":
            lines.append(f"    Best {cfg.best_metric} so far: {format_value(progress.best_value)} (epoch {progress.best_epoch})")
        lines += [
            f"    Retrieval: t2m MRR {metrics['t2m_mrr']:.4f}, Hit@1/5/10 {metrics['t2m_hit@1']:.3f}/"
            f"{metrics['t2m_hit@5']:.3f}/{metrics['t2m_hit@10']:.3f} | m2t MRR {metrics['m2t_mrr']:.4f}, Hit@1/5/10 "
            f"{metrics['m2t_hit@1']:.3f}/{metrics['m2t_hit@5']:.3f}/{metrics['m2t_hit@10']:.3f}",
            f"    Chance ({entry['eval_pairs']} pairs): MRR {chance['t2m_mrr']:.4f}, Hit@1/5/10 {chance['t2m_hit@1']:.3f}/"
            f"{chance['t2m_hit@5']:.3f}/{chance['t2m_hit@10']:.3f}",
            f"    GPU Memory: {memory['allocated_gb']:.2f} GB allocated, {memory['reserved_gb']:.2f} GB reserved, "
            f"{memory['peak_gb']:.2f} GB peak" if memory else "    GPU Memory: none (a CPU run)",
            f"    Throughput: {entry['samples_per_s']:.1f} samples/s    Skipped batches: {format_counts(entry['skipped'])}",
        ]
        if improved:
            lines.append(f"    ✓ new best {cfg.best_metric}: adapter saved to {adapter_dir}")
        if checkpoint_path is not None:
            lines.append(f"    ✓ checkpoint: {checkpoint_path}")
        self.say("\n".join(lines))


def banner(cfg, dist, stages, console):
    """System information: torch, CUDA, GPU name and memory, world size; and what will run."""
    console.rule("CLaMP 3 LoRA training")
    console.say(f"  torch {torch.__version__} | CUDA {torch.version.cuda or 'not built'} "
                f"({'available' if torch.cuda.is_available() else 'not available'}) | Python {sys.version.split()[0]}")
    if dist.device.type == "cuda":
        props = torch.cuda.get_device_properties(dist.device)
        console.say(f"  ✓ GPU {dist.device}: {props.name}, {props.total_memory / 1024 ** 3:.1f} GB, "
                    f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}; precision {cfg.precision}")
    else:
        console.say("  ⚠ device: CPU (explicit --device cpu): fp32, slow; for tests and the demo")
    backend = torch.distributed.get_backend() if dist.distributed else "none"
    console.say(f"  world size {dist.world_size} (backend {backend}); batch {cfg.batch_size} per rank x "
                f"{dist.world_size} x grad accum {cfg.grad_accum} = {cfg.batch_size * dist.world_size * cfg.grad_accum} "
                f"samples per optimizer step")
    console.say(f"  stages: {', '.join(s.name for s in stages)}; model: "
                f"{'preset ' + cfg.preset if cfg.preset else cfg.weights}; output: {cfg.output_dir}")


def final_summary(cfg, results, started, console):
    hours = (time.time() - started) / 3600
    console.rule("TRAINING COMPLETE")
    console.say(f"✓ total time: {hours:.3f} h ({hours * 60:.1f} min)")
    for result in results:
        console.say(f"✓ {result.stage.name}: {result.seconds / 60:.1f} min, best {result.best_metric} "
                    f"{format_value(result.best_value)} at epoch {result.best_epoch}")
        console.say(f"  {result.gain}")
    if results:
        console.say("Output files:")
        for result in results:
            for path in result.files:
                console.say(f"  {path}")
