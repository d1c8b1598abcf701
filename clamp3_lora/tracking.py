"""Experiment tracking: every scalar the logs hold, to TensorBoard and/or Weights & Biases.

    --report-to tensorboard   event files in OUTPUT_DIR/logs/lora/tensorboard/{STAGE}_steps and
                              {STAGE}_epochs (`tensorboard --logdir code/logs/lora/tensorboard`)
    --report-to wandb         a W&B run per stage (WANDB_MODE=offline works with no account)

Rank 0 alone reports. Per step (x: the stage's micro-step): loss, lr, samples/s, batch size, skipped.
Per epoch (x: the epoch; 0 is the base model): train and eval loss, every retrieval metric and its
chance level, samples/s, skipped batches by reason. A resumed run continues the same curves: in
TensorBoard what the interrupted run logged after its checkpoint is dropped (purge_step), so no point
is there twice; W&B resumes the same run by id, but cannot drop points it already holds, so those
steps may show twice there. Each backend is an optional extra (pip install .[tracking]); asking for
one that is not installed is an error before any training.
"""
import importlib.util
import json
import math
import secrets

from .errors import Clamp3LoraError

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""--report-to name -> the package it needs."""


def check(report_to):
    """The backends asked for (without "none"); Clamp3LoraError for an unknown or missing one."""
    wanted = [name for name in report_to if name != "none"]
    for name in wanted:
        if name not in BACKENDS:
            raise Clamp3LoraError(f"--report-to {name!r}: use none, tensorboard or wandb (repeat the flag for both)")
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise Clamp3LoraError(f"--report-to {name} needs the {BACKENDS[name]} package, which is not installed: "
                                  f"pip install {BACKENDS[name]} (or pip install .[tracking])")
    return wanted


def scalars(record, prefix=""):
    """{name: float} of the numbers in a log record (nested dicts flattened with '/'; finite only)."""
    found = {}
    for key, value in record.items():
        if isinstance(value, dict):
            found.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[f"{prefix}{key}"] = float(value)
    return found


class Tracker:
    """The backends of one stage on rank 0 (`backends` empty: every call does nothing)."""

    def __init__(self, backends, log_dir, stage, config, next_step, next_epoch):
        self.stage, self.writers, self.run = stage, {}, None
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter
            folder = log_dir / "tensorboard"
            self.writers = {"steps": SummaryWriter(str(folder / f"{stage}_steps"), purge_step=next_step),
                            "epochs": SummaryWriter(str(folder / f"{stage}_epochs"), purge_step=next_epoch)}
        if "wandb" in backends:
            import wandb
            id_file = log_dir / f"{stage}_wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
            id_file.write_text(run_id + "\n")
            self.run = wandb.init(project="clamp3-lora", name=f"{log_dir.parent.parent.name}-{stage}", id=run_id,
                                  resume="allow", dir=str(log_dir), config=json.loads(json.dumps(config, default=str)))

    def step(self, record):
        values = {k: v for k, v in scalars(record).items() if k not in ("step", "epoch", "batch")}
        values["skipped"] = 1.0 if record.get("skipped") else 0.0
        self._log("steps", values, record["step"])

    def epoch(self, entry):
        values = {k: v for k, v in scalars(entry).items() if k != "epoch"}
        self._log("epochs", values, entry["epoch"])

    def _log(self, kind, values, x):
        if kind in self.writers:
            for name, value in values.items():
                self.writers[kind].add_scalar(name, value, x)
            self.writers[kind].flush()
        if self.run is not None:
            axis = "step" if kind == "steps" else "epoch"
            self.run.log({f"{kind}/{name}": value for name, value in values.items()} | {axis: x})

    def close(self):
        for writer in self.writers.values():
            writer.close()
        if self.run is not None:
            self.run.finish()
