"""Per-stage training logs: the text log, the history JSON, per-step JSON Lines and a PNG of the curves.

For stage "ABC" in log_dir (rank 0 only writes them):
    ABC_training.log    human-readable; one block per epoch as FEATURES.md shows
    ABC_history.json    list of epoch entries (epoch, train_loss, eval_loss, time, timestamp, metrics, ...)
    ABC_steps.jsonl     one JSON object per logged step ({"step": ..., "loss": ..., "lr": ...})
    ABC_curves.png      loss and retrieval-metric curves, redrawn every epoch
The history JSON and the PNG are replaced atomically, so a crash never leaves them half written.
"""
import hashlib
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

GB = 1024 ** 3
# Keys of an epoch entry that the block prints in its own fixed lines; any other scalar key is
# printed after them as "key: value".
BLOCK_KEYS = ("epoch", "train_loss", "eval_loss", "time", "timestamp", "gpu_memory", "metrics", "chance", "skipped",
              "base_model")
CURVE_METRICS = ("t2m_mrr", "m2t_mrr", "t2m_hit@1", "m2t_hit@1", "t2m_hit@10", "m2t_hit@10")
MAX_STEP_POINTS = 5000


def atomic_write_bytes(path, data):
    """Write `data` to `path` through a temporary file in the same folder: write, fsync, rename.
    Readers see the old file or the new one, never a partial one; no temporary file is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_torch_save(path, obj):
    """torch.save of `obj` to `path`, atomically (atomic_write_bytes)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def file_sha256(path):
    """The sha256 hex digest of a file's content, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_folder(folder):
    """Make a rename in `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text):
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """atomic_write_text of `obj` as indented JSON (NaN/Infinity written as JSON's usual extension)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def gpu_memory(device=None):
    """GPU memory of `device` in GB: {"allocated_gb", "reserved_gb", "peak_gb"}; None on the CPU
    (the logs then say it was a CPU run, not "0.00 GB").

    `device` is a torch.device, a string ("cuda", "cuda:1", "cpu") or None (the current CUDA device
    when there is one). peak_gb is torch's max_memory_allocated since the last reset of peak stats.
    """
    device = torch.device(device) if device is not None else None
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    return {
        "allocated_gb": torch.cuda.memory_allocated(device) / GB,
        "reserved_gb": torch.cuda.memory_reserved(device) / GB,
        "peak_gb": torch.cuda.max_memory_allocated(device) / GB,
    }


def format_number(value, digits=6):
    """A float with `digits` decimals; "n/a" for None; nan/inf as words."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return str(value)


def epoch_block(entry, total_epochs):
    """The text-log block of one epoch (FEATURES.md's lines first, then memory peak, metrics,
    skipped batches and any other scalar fields of the entry)."""
    memory = entry.get("gpu_memory")
    lines = [
        f"Epoch {entry['epoch']}/{total_epochs}" + (" (base model, before training)" if entry.get("base_model") else ""),
        f"Train Loss: {format_number(entry.get('train_loss'))}",
        f"Eval Loss: {format_number(entry.get('eval_loss'))}",
        f"Time: {entry.get('time', 0.0):.1f}s",
        f"Timestamp: {entry.get('timestamp', '')}",
    ]
    if memory:
        lines += [f"GPU Memory Allocated: {memory['allocated_gb']:.2f} GB",
                  f"GPU Memory Reserved: {memory['reserved_gb']:.2f} GB",
                  f"GPU Memory Peak: {memory['peak_gb']:.2f} GB"]
    else:
        lines.append("GPU Memory: none (a CPU run)")
    chance = entry.get("chance") or {}
    for name, value in (entry.get("metrics") or {}).items():
        beside = f" (chance {format_number(chance[name], 4)})" if name in chance else ""
        lines.append(f"{name}: {format_number(value, 4)}{beside}")
    skipped = entry.get("skipped")
    if skipped is not None:
        if isinstance(skipped, dict):
            detail = ", ".join(f"{reason}: {count}" for reason, count in skipped.items() if count)
            lines.append(f"Skipped Batches: {sum(skipped.values())}" + (f" ({detail})" if detail else ""))
        else:
            lines.append(f"Skipped Batches: {skipped}")
    for name, value in entry.items():
        if name not in BLOCK_KEYS and isinstance(value, (int, float, str, bool)):
            lines.append(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")
    return "\n".join(lines) + "\n\n"


def read_jsonl(path):
    """Records of a JSON Lines file, skipping lines that do not parse (a line torn by a crash); [] if absent."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def finite_points(xs, ys):
    """The (x, y) pairs whose y is a finite number."""
    pairs = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def smaller_batches(steps):
    """[(step, loss)] of the steps whose global batch was smaller than the run's usual one (each
    epoch's last batch takes what is left). The contrastive loss of a batch grows with its size
    (more negatives), so these steps dip in the per-step plot; the plot marks them."""
    sizes = [r.get("batch_size") for r in steps if r.get("batch_size")]
    if not sizes:
        return []
    usual = max(sizes)
    return [(r["step"], r.get("loss")) for r in steps if r.get("batch_size") and r["batch_size"] < usual]


def draw_curves(stage, history, steps):
    """PNG bytes: epoch losses, retrieval metrics per epoch and (when there are steps) step loss."""
    panels = 3 if steps else 2
    figure = Figure(figsize=(5 * panels, 4), dpi=100)
    FigureCanvasAgg(figure)
    epochs = [entry.get("epoch") for entry in history]

    losses = figure.add_subplot(1, panels, 1)
    for key, label in (("train_loss", "train"), ("eval_loss", "eval")):
        xs, ys = finite_points(epochs, [entry.get(key) for entry in history])
        losses.plot(xs, ys, marker="o", label=label)
    losses.set(title=f"{stage} loss per epoch", xlabel="epoch", ylabel="loss")
    losses.xaxis.set_major_locator(MaxNLocator(integer=True))
    losses.legend()
    losses.grid(alpha=0.3)

    metrics = figure.add_subplot(1, panels, 2)
    for name in CURVE_METRICS:
        xs, ys = finite_points(epochs, [(entry.get("metrics") or {}).get(name) for entry in history])
        if xs:
            line, = metrics.plot(xs, ys, marker="o", label=name)
            chance = (history[-1].get("chance") or {}).get(name)
            if chance is not None:
                metrics.axhline(chance, color=line.get_color(), linestyle="--", linewidth=0.8)
    pairs = history[-1].get("eval_pairs") if history else None
    chance_note = f"; dashed: chance, {pairs} pairs" if pairs else ""
    metrics.set(title=f"{stage} retrieval (eval{chance_note})", xlabel="epoch", ylim=(0, 1.02))
    metrics.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metrics.lines:
        metrics.legend(fontsize="small")
    metrics.grid(alpha=0.3)

    if steps:
        stride = max(1, len(steps) // MAX_STEP_POINTS)
        shown = steps[::stride]
        xs, ys = finite_points([r.get("step") for r in shown], [r.get("loss") for r in shown])
        step_loss = figure.add_subplot(1, panels, 3)
        step_loss.plot(xs, ys, linewidth=0.8)
        small = smaller_batches(steps)
        small_x, small_y = finite_points([x for x, _ in small], [y for _, y in small])
        if small_x:
            step_loss.plot(small_x, small_y, "x", color="tab:red", markersize=4,
                           label="an epoch's smaller last batch:\nfewer negatives, so a lower loss")
            step_loss.legend(fontsize="small")
        step_loss.set(title=f"{stage} training loss per step", xlabel="step", ylabel="loss")
        step_loss.grid(alpha=0.3)

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class StageLogger:
    """The log files of one stage ("ABC" or "MTF") in `log_dir`; create it on rank 0 only."""

    def __init__(self, log_dir, stage):
        self.log_dir = Path(log_dir)
        self.stage = stage
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{stage}_training.log"
        self.history_path = self.log_dir / f"{stage}_history.json"
        self.steps_path = self.log_dir / f"{stage}_steps.jsonl"
        self.curves_path = self.log_dir / f"{stage}_curves.png"
        self.history = []

    def write(self, text):
        """Append `text` (one or more lines) to the text log."""
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def epoch(self, entry, total_epochs):
        """Record a finished epoch: the block in the text log, the entry in the history JSON
        (rewritten atomically) and the redrawn PNG.

        `entry` holds at least epoch (1-based), train_loss, eval_loss and time (seconds); timestamp
        (time.ctime() when missing), gpu_memory (a gpu_memory() dict), metrics (retrieval_metrics()
        dict), skipped ({reason: count}) and other scalars such as samples_per_s are optional.
        """
        entry = dict(entry)
        entry.setdefault("timestamp", time.ctime())
        self.write(epoch_block(entry, total_epochs))
        self.history.append(entry)
        atomic_write_json(self.history_path, self.history)
        self.draw()

    def step(self, record):
        """Append one step record (a JSON-able dict with at least "step") to the steps file."""
        with self.steps_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def set_history(self, history):
        """Replace the history (on resume, from the checkpoint) and rewrite the history JSON."""
        self.history = [dict(entry) for entry in history]
        atomic_write_json(self.history_path, self.history)

    def truncate_steps_after(self, step):
        """Drop step records whose "step" is greater than `step` (and a torn last line), so that a
        resumed run continues the steps file from its checkpoint. step=-1 empties it."""
        if not self.steps_path.exists():
            return
        kept = [r for r in read_jsonl(self.steps_path) if r.get("step", -math.inf) <= step]
        atomic_write_text(self.steps_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def steps(self):
        """The step records written so far."""
        return read_jsonl(self.steps_path)

    def draw(self):
        """Redraw the curves PNG from the history and the steps file (atomic replace)."""
        atomic_write_bytes(self.curves_path, draw_curves(self.stage, self.history, self.steps()))

    def files(self):
        """Paths of this stage's log files (for the final summary)."""
        return [self.log_path, self.history_path, self.steps_path, self.curves_path]
