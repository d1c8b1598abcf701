"""The two-stage LoRA training recipe: stage 1/2 trains the ABC adapter, stage 2/2 the MTF adapter.

Read it top to bottom: `main` prints the banner and runs each stage; `run_stage` builds the data,
a fresh model from the frozen base with a fresh adapter, AdamW over the LoRA weights, the schedule,
then runs THE training loop (epochs -> micro-batches -> optimizer steps), evaluates each epoch,
keeps the best adapter, and writes checkpoints. Everything else here is a small helper.

Robustness, in the loop itself:
- Checkpoints (checkpoint.py): periodic ones during each epoch, one per epoch (the last few kept),
  an emergency one on Ctrl+C (SIGINT), SIGTERM, too many bad steps in a row, or an unexpected error.
- Exact resume (`--resume auto`): a checkpoint holds the LoRA weights, optimizer, scheduler,
  GradScaler, the position in the epoch's data order and every RNG state; a sample's augmentations
  depend only on (seed, epoch, record), so the resumed run continues with exactly the batches,
  dropout masks and updates the uninterrupted run would have had.
- Guards: an OOM or a non-finite loss skips that batch, a non-finite gradient skips that optimizer
  step; with several processes all ranks agree first (a flag all-reduced), so none is left waiting.
  An OOM in the backward pass is skipped by one process only: with several, the ranks are then
  half-way through the gradient all-reduce, so that rank stops the job with a clear error instead.
- Several processes (torchrun): every collective has a timeout (--dist-timeout-s); a lost or stuck
  rank makes the others fail with a DistributedError that says so (emergency checkpoint on rank 0).
- Signals are only noted by the handler; the loop acts on them at the next optimizer-step boundary
  (all ranks at the same step), saves the emergency checkpoint and exits 130 (SIGINT) or 143 (SIGTERM).

Fault injection, for tests: `--fault-inject` or the environment variable CLAMP3_LORA_FAULTS holds
comma-separated faults KIND@STEP or KIND@STEP:RANK, where STEP is the stage's global micro-step
(batch) index counted from 0 across epochs, and RANK limits the fault to one process:
    oom@S       raise a CUDA out-of-memory error in the forward pass of batch S
    oomback@S   raise a CUDA out-of-memory error in place of the backward pass of batch S
    nan@S       make the loss of batch S NaN
    nangrad@S   make a LoRA gradient of batch S NaN after its backward pass
    sigint@S, sigterm@S, sigkill@S   send this signal to the process itself before batch S
    error@S     raise an unexpected RuntimeError before batch S (emergency checkpoint, then traceback)
    hang@S      stop answering before batch S, as a stuck process does, until a stop signal arrives
                (the other processes' collectives then time out after --dist-timeout-s)
Test-only switch CLAMP3_LORA_TEST_NO_RNG_RESTORE=1: resume WITHOUT restoring the RNG states and the
position in the data order (restart the epoch's order, re-seed); the tests use it as a negative
control that proves the exact-resume test can fail.

Exit codes: 0 done; 1 a clear error (configuration, data, checkpoint, no GPU) or an unexpected one
(traceback); 3 too many bad steps in a row; 130 SIGINT; 143 SIGTERM.
"""
import gc
import hashlib
import inspect
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint, distributed
from .data import Collator, MusicTextDataset, scan_data_file
from .errors import CheckpointError, Clamp3LoraError, DataError
from .fast import settings_from_config
from .logs import StageLogger, gpu_memory
from .metrics import METRIC_NAMES, better, retrieval_metrics
from .model import base_checkpoint_identity, clip_loss, load_model
from .step import (autocast, contrastive_loss, is_oom, local_features, read_scalars, read_scalars_during, text_ahead,
                   to_device)

EXIT_OK, EXIT_ERROR, EXIT_BAD_STEPS = 0, 1, 3
FAULTS_ENV = "CLAMP3_LORA_FAULTS"
NO_RNG_RESTORE_ENV = "CLAMP3_LORA_TEST_NO_RNG_RESTORE"
FAULT_KINDS = ("oom", "oomback", "nan", "nangrad", "sigint", "sigterm", "sigkill", "error", "hang")
SKIP_REASONS = ("oom", "nonfinite_loss", "nonfinite_grad")
WIDTH = 78


@dataclass(frozen=True)
class Stage:
    """One stage: its name in file names, the config fields of its data, its adapter folder."""
    name: str
    train_field: str
    eval_field: str
    adapter: str


STAGES = {
    "abc": Stage("ABC", "abc_train", "abc_eval", "lora_abc_adapter"),
    "mtf": Stage("MTF", "mtf_train", "mtf_eval", "lora_mtf_adapter"),
}


class StopTraining(Exception):
    """Leave the run with `exit_code` after `message` (a signal, or too many bad steps)."""

    def __init__(self, exit_code, message):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


# --------------------------------------------------------------------------------------------
# main


def main(cfg, argv=None):
    """Run the stages of `cfg` in order; returns the process exit code (see the module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    started = time.time()
    try:
        stages = check_config(cfg)
        faults = Faults.parse(cfg.fault_inject or os.environ.get(FAULTS_ENV, ""))
        dist = distributed.setup(cfg.device, cfg.dist_timeout_s)
    except Clamp3LoraError as error:
        print(f"✗ {error}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    console = Console(dist)
    try:
        with StopSignals() as signals:
            banner(cfg, dist, stages, console)
            check_precision(cfg, dist)
            log_dir = Path(cfg.output_dir) / "logs" / "lora"
            resume_stage = resume_path_stage(cfg, dist)
            results = []
            for number, stage in enumerate(stages, start=1):
                plan = plan_stage(cfg, stage, stages, resume_stage, log_dir, dist, console)
                if plan.action == "skip":
                    console.rule(f"STAGE {number}/{len(stages)}: {stage.name} adapter — skipped")
                    console.say(f"✓ {plan.note}")
                    continue
                results.append(run_stage(cfg, stage, number, len(stages), plan, dist, signals, faults,
                                         console, argv))
                release_memory(dist.device)
            final_summary(cfg, results, started, console)
        return EXIT_OK
    except StopTraining as stop:
        console.say(stop.message)
        return stop.exit_code
    except Clamp3LoraError as error:
        console.error(f"✗ {error}")
        return EXIT_ERROR
    finally:
        distributed.teardown()


def check_config(cfg):
    """Reject settings that cannot work, before anything starts; returns the Stage list."""
    names = [name.strip().lower() for name in cfg.stages.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise Clamp3LoraError(f"--stages {cfg.stages!r}: use abc, mtf or abc,mtf")
    if len(set(names)) != len(names):
        raise Clamp3LoraError(f"--stages {cfg.stages!r} names a stage twice")
    problems = []
    if cfg.schedule not in ("cosine", "constant"):
        problems.append(f"--schedule {cfg.schedule!r}: use cosine or constant")
    if cfg.precision not in ("bf16", "fp16", "fp32"):
        problems.append(f"--precision {cfg.precision!r}: use bf16, fp16 or fp32")
    if cfg.best_metric != "eval_loss" and cfg.best_metric not in METRIC_NAMES:
        problems.append(f"--best-metric {cfg.best_metric!r}: use eval_loss or one of {', '.join(METRIC_NAMES)}")
    for name in ("epochs", "batch_size", "grad_accum", "keep_epoch_checkpoints", "max_bad_steps_in_row",
                 "dist_timeout_s"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("checkpoints_per_epoch", "warmup_steps", "num_workers"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative (got {getattr(cfg, name)})")
    if not 0.0 <= cfg.bad_record_limit <= 1.0:
        problems.append(f"--bad-record-limit {cfg.bad_record_limit}: use a share between 0 and 1")
    if problems:
        raise Clamp3LoraError("invalid settings:\n  " + "\n  ".join(problems))
    return [STAGES[name] for name in names]


def check_precision(cfg, dist):
    """bf16 needs a GPU that supports it; say so instead of failing later."""
    if dist.device.type == "cuda" and cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise Clamp3LoraError(f"{torch.cuda.get_device_name(dist.device)} does not support bf16; "
                              f"use --precision fp16 (with a GradScaler) or fp32")


# --------------------------------------------------------------------------------------------
# One stage


@dataclass
class Progress:
    """Where a stage stands; saved in every checkpoint (as a dict) and restored on resume."""
    epoch: int = 0                 # epoch in progress, 0-based (== epochs when all are done)
    batch: int = 0                 # batches of that epoch consumed (on every rank)
    micro_step: int = 0            # batches consumed in the stage (the fault-injection index)
    optimizer_steps: int = 0       # optimizer updates applied
    samples_seen: int = 0          # samples consumed in the stage, all ranks together
    epoch_loss_sum: float = 0.0    # losses of the epoch's trained batches
    epoch_loss_count: int = 0
    epoch_samples: int = 0
    epoch_time: float = 0.0        # seconds of training already spent in this epoch
    epoch_skipped: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    skipped: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    bad_in_row: int = 0
    best_value: float = None       # best value of cfg.best_metric and its epoch (1-based)
    best_epoch: int = None
    best_eval_loss: float = None
    best_eval_loss_epoch: int = None
    history: list = field(default_factory=list)

    def next_epoch(self):
        """Move to the start of the next epoch (the per-epoch counters restart)."""
        self.epoch += 1
        self.batch = 0
        self.epoch_loss_sum, self.epoch_loss_count, self.epoch_samples, self.epoch_time = 0.0, 0, 0, 0.0
        self.epoch_skipped = dict.fromkeys(SKIP_REASONS, 0)

    def copy(self):
        """A snapshot, taken at every optimizer step: the counters' dicts and the history list are
        copied; the history's entries are shared (an entry is never changed once appended; a deep
        copy of them took ~0.5 ms per step after ten epochs, while the GPU waited for the next step)."""
        return replace(self, epoch_skipped=dict(self.epoch_skipped), skipped=dict(self.skipped),
                       history=list(self.history))


@dataclass
class Plan:
    """What to do with a stage: start fresh, resume from a checkpoint, or skip it (finished)."""
    action: str
    identity: dict
    path: str = None
    state: dict = None
    note: str = ""


@dataclass
class StageResult:
    """What a finished stage leaves behind, for the final summary."""
    stage: Stage
    seconds: float
    best_metric: str
    best_value: float
    best_epoch: int
    files: list


def run_stage(cfg, stage, number, total, plan, dist, signals, faults, console, argv):
    """Train one adapter: data, model, optimizer, resume, the loop, evaluation, checkpoints."""
    started = time.time()
    log_dir = Path(cfg.output_dir) / "logs" / "lora"
    adapter_dir = Path(cfg.output_dir) / "adapters" / stage.adapter
    logger = StageLogger(log_dir, stage.name) if dist.is_main else None
    device = dist.device
    console.rule(f"STAGE {number}/{total}: Training {stage.name} Adapter")

    def note(text):
        """A line for the terminal and the stage's text log."""
        console.say(text)
        if logger is not None:
            logger.write(text)

    note(f"{stage.name} stage started {time.ctime()}")

    # --- data: scanned once on rank 0; bad records reported with file:line ----------------------
    train_scan = shared_scan(getattr(cfg, stage.train_field), cfg, dist)
    eval_scan = shared_scan(getattr(cfg, stage.eval_field), cfg, dist)
    for scan in (train_scan, eval_scan):
        note(("⚠ " if scan.bad else "✓ ") + scan.summary())

    # --- model: the frozen base, a fresh adapter (a new model per stage, never re-wrapped) ------
    torch.manual_seed(cfg.seed)  # a random preset base is then the same in every run and stage
    model = load_model(None if cfg.preset else cfg.weights, text_model=cfg.text_model,
                       preset=cfg.preset or None, device=device)
    set_encoder_dropout(model, cfg.encoder_dropout)
    model.add_adapter(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      targets=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()))
    params = model.trainable_parameters()
    note(f"✓ LoRA adapter: r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout} on "
         f"{cfg.lora_targets}: {count_lora_modules(model)} LoRA modules, "
         f"{sum(p.numel() for p in params):,} trainable parameters")
    speed = model.prepare_for_training(precision=cfg.precision, **settings_from_config(cfg))
    note("✓ training step: " + ", ".join(f"{name} {value}" for name, value in speed.items()))
    train_model = model
    if dist.distributed:
        train_model = wrap_ddp(model, device)

    train_set = MusicTextDataset(train_scan.records, model.tokenizer, train=True, max_patches=cfg.max_patches,
                                 max_text_tokens=cfg.max_text_tokens,
                                 instrument_removal_prob=cfg.instrument_removal_prob, cache_mb=cfg.patch_cache_mb)
    eval_set = MusicTextDataset(eval_scan.records, model.tokenizer, train=False, max_patches=cfg.max_patches,
                                max_text_tokens=cfg.max_text_tokens, cache_mb=cfg.patch_cache_mb)
    train_sampler = make_sampler(train_set, cfg, dist, shuffle=True, what=getattr(cfg, stage.train_field))
    eval_sampler = make_sampler(eval_set, cfg, dist, shuffle=False, what=getattr(cfg, stage.eval_field))
    train_loader = make_loader(train_set, train_sampler, cfg, device)
    eval_loader = make_loader(eval_set, eval_sampler, cfg, device)
    batches = len(train_sampler)
    windows = math.ceil(batches / cfg.grad_accum)          # optimizer steps per epoch
    periodic_at = periodic_steps(windows, cfg.checkpoints_per_epoch)

    # --- optimizer over the LoRA weights only, warm-up then cosine/constant, GradScaler for fp16 -
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.epochs * windows, schedule=cfg.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
    gather = distributed.gather_with_grad if dist.distributed else None
    progress = Progress()
    torch.manual_seed(cfg.seed + 1 + dist.rank)  # this rank's dropout stream

    # --- resume ------------------------------------------------------------------------------
    exact = os.environ.get(NO_RNG_RESTORE_ENV) != "1"
    if plan.action == "resume":
        rng_known = dist.rank < len(plan.state["rng"]) and plan.state["rng"][dist.rank] is not None
        checkpoint.restore_training_state(plan.path, plan.state, model, optimizer, scheduler, scaler,
                                          rank=dist.rank, device=device, restore_rng_states=exact and rng_known)
        if not rng_known:
            console.error(f"⚠ {plan.path} has no RNG state for rank {dist.rank} (an emergency checkpoint written "
                          f"after an error on one rank): dropout continues from a fresh seed, not exactly")
        progress = Progress(**plan.state["progress"])
        note(f"✓ resumed from {plan.path}: epoch {progress.epoch + 1}, batch {progress.batch}/{batches}, "
             f"{progress.optimizer_steps} optimizer steps, {progress.samples_seen} samples seen")
        if not exact:
            note(f"⚠ {NO_RNG_RESTORE_ENV}=1: RNG states and data position NOT restored (test-only switch)")
    if logger is not None:
        logger.set_history(progress.history)
        logger.truncate_steps_after(progress.micro_step - 1)
    note(f"  {len(train_set)} training records, {len(eval_set)} validation records; {batches} batches "
         f"of {cfg.batch_size} per rank x {dist.world_size} rank(s), {windows} optimizer steps per epoch, "
         f"{cfg.epochs} epochs; periodic checkpoints after steps {sorted(periodic_at) or 'none'}")

    boundary = progress.copy()                       # the last optimizer-step boundary
    boundary_rng = checkpoint.capture_rng(device)

    def save(kind, path, at, rng_states):
        """Write a checkpoint of the state at boundary `at` (rank 0 writes; RNG of every rank)."""
        if not dist.is_main:
            return None
        state = {
            "stage": stage.name, "kind": kind, "identity": plan.identity, "config": asdict(cfg),
            "lora": model.lora_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() or None,
            "progress": asdict(at),
            "sampler": train_sampler.state_dict(epoch=at.epoch, position=at.batch),
            "rng": rng_states, "world_size": dist.world_size,
        }
        return checkpoint.save(path, state)

    def save_emergency(reason, collective=True):
        """The emergency checkpoint at the last boundary; returns its path (on rank 0)."""
        rngs = distributed.all_gather_objects(boundary_rng) if collective else (
            [boundary_rng] + [None] * (dist.world_size - 1))
        path = save("emergency", checkpoint.emergency_path(log_dir, stage.name), boundary, rngs)
        if path is not None:
            note(f"✓ emergency checkpoint ({reason}) saved: {path}")
        return path

    # --- the training loop -----------------------------------------------------------------------
    bar = None  # the epoch's progress bar, closed before any message that ends the stage
    try:
        for epoch in range(progress.epoch, cfg.epochs):
            console.epoch_rule(stage.name, epoch + 1, cfg.epochs)
            first = progress.batch
            train_sampler.set_epoch(epoch)
            train_sampler.start_at(first if exact else 0)
            model.train()
            model.text_model.eval()  # frozen and deterministic: no dropout on the text side
            reset_peak_memory(device)
            clock = time.time() - progress.epoch_time
            window_records, window_losses, window_grads = [], [], 0
            bar = tqdm(total=batches, initial=first, desc=f"[{stage.name}] Epoch {epoch + 1} Training",
                       disable=not dist.is_main, dynamic_ncols=True, leave=True)
            ahead = None  # (index, device batch, text features) of the next batch, made during a read
            for (index, batch), following in with_next(zip(range(first, batches), train_loader)):
                step = progress.micro_step
                faults.before_batch(step, dist.rank, signals)
                window_start = index - index % cfg.grad_accum
                window = min(cfg.grad_accum, batches - window_start)
                size = train_sampler.global_batch_size(index)
                text = None
                if ahead is not None and ahead[0] == index:
                    batch, text = ahead[1], ahead[2]
                else:
                    batch = to_device(batch, device)
                ahead = None
                # A one-batch step without a GradScaler reads loss and gradient norm in ONE host sync
                # after the backward pass (clip_and_read); the guards decide exactly as before. While
                # the host waits for that read, the GPU already runs the next batch's frozen text pass.
                fused = window == 1 and not scaler.is_enabled()

                def next_text(following=following):
                    if following is None or not cfg.text_ahead:
                        return None
                    made = text_ahead(train_model, following[1], device, cfg.precision)
                    return None if made is None else (following[0], *made)

                skip, loss_value, norm_value = None, None, None
                try:                                        # forward on this rank's samples
                    with autocast(device, cfg.precision):
                        music, text = local_features(train_model, batch, text)
                        faults.raise_oom(step, dist.rank)
                except RuntimeError as error:
                    if not is_oom(error):
                        raise
                    skip = "oom"
                if distributed.all_reduce_flag(skip is not None):   # every rank skips together
                    skip = skip or "oom"
                if skip is None:
                    with autocast(device, cfg.precision):
                        loss = contrastive_loss(music, text, gather)
                    if faults.due("nan", step, dist.rank):
                        loss = loss * float("nan")
                    if not fused:
                        loss_value = loss.item()
                        if distributed.all_reduce_flag(not math.isfinite(loss_value)):
                            skip, loss_value = "nonfinite_loss", None
                if skip is None:
                    try:
                        faults.raise_oom(step, dist.rank, kind="oomback")
                        scaler.scale(loss / window).backward()
                        window_grads += 1
                        window_losses.append(loss_value)
                    except RuntimeError as error:
                        if not is_oom(error):
                            raise
                        if dist.distributed:
                            raise backward_oom_error(error, stage, index, epoch, step, dist) from error
                        skip = "oom"                         # a half-done backward: drop the window
                    faults.poison_gradient(step, dist.rank, params)
                    if fused and skip is None:               # the loss guard, after the backward pass
                        (loss_value, norm_value), ahead = clip_and_read(loss, params, cfg.max_grad_norm, next_text)
                        if distributed.all_reduce_flag(not math.isfinite(loss_value)):
                            skip, loss_value, norm_value = "nonfinite_loss", None, None
                            optimizer.zero_grad(set_to_none=True)
                            window_grads, window_losses = 0, []
                        else:
                            window_losses = [loss_value]
                music = text = loss = None
                if skip == "oom":
                    optimizer.zero_grad(set_to_none=True)
                    window_grads, window_losses = 0, []
                    release_memory(device)
                if skip is not None:
                    progress.bad_in_row += 1
                    progress.epoch_skipped[skip] += 1
                    progress.skipped[skip] += 1
                    console.say(f"⚠ [{stage.name}] batch {index} of epoch {epoch + 1} (step {step}) skipped: {skip}")
                else:
                    progress.bad_in_row = 0
                progress.micro_step += 1
                progress.samples_seen += size
                progress.epoch_samples += size
                rate = progress.epoch_samples / max(time.time() - clock, 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                window_records.append({"step": step, "epoch": epoch + 1, "batch": index, "loss": loss_value,
                                       "lr": lr, "samples_per_s": rate, "batch_size": size, "skipped": skip})
                bar.update()
                bar.set_postfix(loss="skipped" if loss_value is None else f"{loss_value:.4f}",
                                lr=f"{lr:.2e}", **{"samples/s": f"{rate:.1f}"}, refresh=False)
                if index + 1 - window_start < window:
                    continue

                # --- optimizer-step boundary: step (or skip), log, then stop/checkpoint decisions -
                if window_grads:
                    if norm_value is None:
                        scaler.unscale_(optimizer)
                        norm_value = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
                    if distributed.all_reduce_flag(not math.isfinite(norm_value)):
                        reason = "nonfinite_grad"
                        progress.bad_in_row += 1
                        progress.epoch_skipped[reason] += window_grads
                        progress.skipped[reason] += window_grads
                        console.say(f"⚠ [{stage.name}] optimizer step after step {step} skipped: non-finite gradient")
                        for record in window_records:
                            if record["skipped"] is None:
                                record["skipped"] = reason
                        scaler.update()
                    else:
                        scaler.step(optimizer)
                        scaler.update()
                        scheduler.step()
                        progress.optimizer_steps += 1
                        progress.epoch_loss_sum += sum(window_losses)
                        progress.epoch_loss_count += len(window_losses)
                optimizer.zero_grad(set_to_none=True)
                progress.batch = index + 1
                progress.epoch_time = time.time() - clock
                boundary = progress.copy()
                boundary_rng = checkpoint.capture_rng(device)
                if logger is not None:
                    for record in window_records:
                        logger.step(record)
                window_records, window_losses, window_grads = [], [], 0

                if distributed.all_reduce_flag(signals.received is not None):
                    bar.close()
                    raise stop_for_signal(signals, save_emergency, stage, argv, dist)
                if progress.bad_in_row >= cfg.max_bad_steps_in_row:
                    bar.close()
                    path = save_emergency("too many bad steps")
                    raise StopTraining(EXIT_BAD_STEPS, (
                        f"✗ {progress.bad_in_row} batches in a row were skipped (out of memory or NaN/Inf; "
                        f"limit --max-bad-steps-in-row {cfg.max_bad_steps_in_row}). Training stopped.\n"
                        f"  Emergency checkpoint: {path}\n"
                        f"  Skipped so far: {format_counts(progress.skipped)}. Try a smaller --batch-size or "
                        f"--max-patches (OOM) or a lower --lr (NaN), then resume:\n"
                        f"  {resume_command(argv, dist)}"))
                step_in_epoch = math.ceil(progress.batch / cfg.grad_accum)
                if step_in_epoch in periodic_at:
                    rngs = distributed.all_gather_objects(boundary_rng)
                    path = save("periodic", checkpoint.periodic_path(log_dir, stage.name, epoch + 1, step_in_epoch),
                                boundary, rngs)
                    if path is not None:
                        checkpoint.delete_superseded(log_dir, stage.name, path)
            bar.close()
            train_seconds = time.time() - clock

            # --- evaluation over the whole validation set --------------------------------------
            evaluation = evaluate(model, eval_loader, eval_sampler, cfg, dist, signals,
                                  f"[{stage.name}] Epoch {epoch + 1} Eval")
            if evaluation is None:
                raise stop_for_signal(signals, save_emergency, stage, argv, dist)
            eval_loss, metrics = evaluation
            seconds = time.time() - clock
            train_loss = (progress.epoch_loss_sum / progress.epoch_loss_count
                          if progress.epoch_loss_count else math.nan)

            # --- best adapter, history, epoch checkpoint ---------------------------------------
            value = eval_loss if cfg.best_metric == "eval_loss" else metrics[cfg.best_metric]
            improved = better(cfg.best_metric, value, progress.best_value)
            if improved:
                progress.best_value, progress.best_epoch = value, epoch + 1
            if better("eval_loss", eval_loss, progress.best_eval_loss):
                progress.best_eval_loss, progress.best_eval_loss_epoch = eval_loss, epoch + 1
            if improved and dist.is_main:
                model.save_adapter(adapter_dir, adapter_record(cfg, stage, progress, metrics, eval_loss,
                                                               train_scan, eval_scan))
            entry = {
                "epoch": epoch + 1, "train_loss": train_loss, "eval_loss": eval_loss, "time": seconds,
                "timestamp": time.ctime(), "train_time": train_seconds,
                "samples_per_s": progress.epoch_samples / max(train_seconds, 1e-9),
                "lr": optimizer.param_groups[0]["lr"], "optimizer_steps": progress.optimizer_steps,
                "samples_seen": progress.samples_seen, "gpu_memory": gpu_memory(device),
                "metrics": metrics, "skipped": dict(progress.epoch_skipped),
                "best_metric": cfg.best_metric, "best_value": progress.best_value,
                "best_epoch": progress.best_epoch,
            }
            progress.history.append(entry)
            if logger is not None:
                logger.epoch(entry, cfg.epochs)
            progress.next_epoch()
            boundary = progress.copy()
            boundary_rng = checkpoint.capture_rng(device)
            rngs = distributed.all_gather_objects(boundary_rng)
            path = save("epoch", checkpoint.epoch_path(log_dir, stage.name, epoch + 1), boundary, rngs)
            if path is not None:
                checkpoint.rotate_epoch_checkpoints(log_dir, stage.name, cfg.keep_epoch_checkpoints)
                checkpoint.delete_superseded(log_dir, stage.name, path)
            console.epoch_summary(stage.name, entry, cfg, progress, improved, adapter_dir, path)
            release_memory(device)
            if distributed.all_reduce_flag(signals.received is not None):
                raise stop_for_signal(signals, save_emergency, stage, argv, dist)
    except StopTraining:
        raise
    except Exception as error:
        if bar is not None:
            bar.close()
        if not isinstance(error, Clamp3LoraError):  # those are printed once, by main
            console.error(f"✗ [{stage.name}] training failed: {type(error).__name__}: {error}")
        try:
            save_emergency(f"{type(error).__name__}", collective=False)
        except Exception as save_error:  # report it, then let the original error through
            console.error(f"✗ the emergency checkpoint could not be saved either: {save_error}")
        raise

    # --- the stage is done -----------------------------------------------------------------------
    seconds = time.time() - started
    files = []
    if dist.is_main:
        marker = checkpoint.write_finished(log_dir, stage.name, {
            "identity": plan.identity, "adapter": str(adapter_dir), "best_metric": cfg.best_metric,
            "best_value": progress.best_value, "best_epoch": progress.best_epoch,
            "optimizer_steps": progress.optimizer_steps, "samples_seen": progress.samples_seen})
        files = [adapter_dir] + logger.files() + sorted(checkpoint.stage_checkpoints(log_dir, stage.name)) + [marker]
        note(f"✓ {stage.name} stage finished in {seconds:.1f}s ({seconds / 60:.2f} min): best {cfg.best_metric} "
             f"{format_value(progress.best_value)} at epoch {progress.best_epoch}, adapter {adapter_dir}")
        note(f"  skipped batches in the stage: {format_counts(progress.skipped)}")
        for scan in (train_scan, eval_scan):
            if scan.bad:
                note("⚠ bad records skipped:\n" + scan.summary(show=20))
    distributed.barrier()
    return StageResult(stage, seconds, cfg.best_metric, progress.best_value, progress.best_epoch, files)


def make_optimizer(params, lr, weight_decay, device):
    """AdamW over the LoRA weights; on CUDA its fused kernel (one launch per step for all tensors;
    the same update and state dict as the default implementation)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def clip_and_read(loss, params, max_grad_norm, meanwhile=None):
    """(loss, gradient norm) as floats, with one host sync: the gradients are clipped (to
    max_grad_norm, none when 0) on the device first. For one-batch steps without a GradScaler.
    With `meanwhile`, returns ((loss, norm), meanwhile()), meanwhile's GPU work queued behind the
    read, so that it runs while the host waits (step.read_scalars_during)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    if meanwhile is None:
        return read_scalars(loss, norm)
    return read_scalars_during(meanwhile, loss, norm)


def with_next(items):
    """Pairs (item, the item after it, or None for the last) of an iterable, one item read ahead."""
    items = iter(items)
    end = object()
    item = next(items, end)
    while item is not end:
        following = next(items, end)
        yield item, (None if following is end else following)
        item = following


def evaluate(model, loader, sampler, cfg, dist, signals, desc):
    """(eval loss, retrieval metrics) over the whole validation set, or None when a stop signal
    arrives. The loss is the CLIP loss of each global batch, averaged over samples; the metrics
    rank every validation pair against all others (features gathered from every rank, in order)."""
    model.eval()
    sampler.set_epoch(0)
    musics, texts, loss_sum, count = [], [], 0.0, 0
    with torch.no_grad(), tqdm(loader, desc=desc, disable=not dist.is_main, dynamic_ncols=True, leave=True) as bar:
        for batch in bar:
            if distributed.all_reduce_flag(signals.received is not None):
                return None
            batch = to_device(batch, dist.device)
            with autocast(dist.device, cfg.precision):
                music = model.music_features(batch["patches"], batch["patch_mask"])
                text = model.text_features(batch["text_ids"], batch["text_mask"])
            music, text = distributed.gather(music.float()), distributed.gather(text.float())
            loss_sum += clip_loss(music, text).item() * len(music)
            count += len(music)
            musics.append(music.cpu())
            texts.append(text.cpu())
    return loss_sum / count, retrieval_metrics(torch.cat(texts), torch.cat(musics))


# --------------------------------------------------------------------------------------------
# Planning a stage: fresh, resume or skip


def stage_identity(cfg, stage, world_size):
    """Everything a stage's numbers depend on; a checkpoint is only continued with the same."""
    if cfg.preset:
        base = {"preset": cfg.preset, "seed": cfg.seed}
    else:
        if not Path(cfg.weights).is_file():
            raise CheckpointError(f"base checkpoint not found: {cfg.weights} (set --weights, or use --demo)")
        base = {k: v for k, v in base_checkpoint_identity(cfg.weights).items() if k != "path"}
    identity = {"stage": stage.name, "base": base, "text_model": cfg.text_model,
                "train_data": file_identity(getattr(cfg, stage.train_field)),
                "eval_data": file_identity(getattr(cfg, stage.eval_field)), "world_size": world_size}
    for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "encoder_dropout", "epochs",
                 "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm",
                 "precision", "seed", "max_patches", "max_text_tokens", "instrument_removal_prob", "best_metric"):
        identity[name] = getattr(cfg, name)
    return identity


def file_identity(path):
    """Name, size and sha256 of a data file (DataError when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(partial(handle.read, 1 << 20), b""):
            digest.update(chunk)
    return {"name": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def resume_path_stage(cfg, dist):
    """With --resume PATH: the stage that checkpoint belongs to (read on rank 0), else None."""
    if cfg.resume in ("", "auto", "fresh"):
        return None
    outcome = None
    if dist.is_main:
        try:
            outcome = {"stage": checkpoint.read(cfg.resume)["stage"]}
        except CheckpointError as error:
            outcome = {"error": str(error)}
    outcome = distributed.broadcast_object(outcome)
    if "error" in outcome:
        raise CheckpointError(outcome["error"])
    return outcome["stage"]


def plan_stage(cfg, stage, stages, resume_stage, log_dir, dist, console):
    """Decide (on rank 0, shared with every rank) whether the stage starts fresh, resumes or is skipped."""
    return distributed.computed_on_main(
        lambda: decide(cfg, stage, stages, resume_stage, log_dir, dist.world_size, console))


def decide(cfg, stage, stages, resume_stage, log_dir, world_size, console):
    """The stage's Plan; see --resume in config.py for the rules."""
    identity = stage_identity(cfg, stage, world_size)
    mode = cfg.resume
    if resume_stage is not None:
        names = [s.name for s in stages]
        if resume_stage not in names:
            raise CheckpointError(f"--resume {cfg.resume}: a {resume_stage} checkpoint, but --stages is {cfg.stages}")
        if names.index(stage.name) < names.index(resume_stage):
            return Plan("skip", identity, note=f"{stage.name} skipped: resuming {resume_stage} from {cfg.resume}")
        if stage.name == resume_stage:
            state = checkpoint.load(cfg.resume, stage.name, identity)
            return Plan("resume", identity, str(cfg.resume), state)
        mode = "auto"
    if mode == "fresh":
        deleted = checkpoint.delete_stage_files(log_dir, stage.name)
        if deleted:
            console.say(f"⚠ --resume fresh: deleted {len(deleted)} old {stage.name} checkpoint file(s) in {log_dir}")
        return Plan("fresh", identity)
    if mode == "auto":
        finished = checkpoint.read_finished(log_dir, stage.name)
        if finished is not None:
            saved = {k: v for k, v in finished.get("identity", {}).items() if k != "world_size"}
            current = {k: v for k, v in identity.items() if k != "world_size"}
            differences = checkpoint.identity_differences(saved, current)
            if differences:
                raise CheckpointError(
                    f"{checkpoint.finished_path(log_dir, stage.name)}: the {stage.name} stage was finished with other "
                    f"settings:\n  " + "\n  ".join(differences) + "\nUse the same settings, --stages to leave the "
                    "stage out, or --resume fresh to train it again.")
            return Plan("skip", identity, note=f"{stage.name} stage already finished "
                        f"(best {finished.get('best_metric')} {format_value(finished.get('best_value'))} at epoch "
                        f"{finished.get('best_epoch')}; adapter {finished.get('adapter')}) — skipped")
        found = checkpoint.find_resume_checkpoint(log_dir, stage.name, identity, warn=console.say)
        if found is None:
            unusable = checkpoint.stage_checkpoints(log_dir, stage.name)
            if unusable:
                raise CheckpointError(
                    f"none of the {len(unusable)} {stage.name} checkpoint(s) in {log_dir} can be used (see the "
                    f"⚠ lines above); nothing to continue from. Start over with --resume fresh.")
            return Plan("fresh", identity)
        path, state = found
        return Plan("resume", identity, str(path), state)
    if mode == "":
        old = checkpoint.stage_checkpoints(log_dir, stage.name)
        if checkpoint.finished_path(log_dir, stage.name).exists():
            old.append(checkpoint.finished_path(log_dir, stage.name))
        if old:
            raise Clamp3LoraError(
                f"{log_dir} already holds {stage.name} checkpoints of an earlier run "
                f"({', '.join(sorted(p.name for p in old)[:4])}{' ...' if len(old) > 4 else ''}).\n"
                f"  Continue that run:       add --resume auto\n"
                f"  Start over (deletes them): add --resume fresh")
        return Plan("fresh", identity)
    raise CheckpointError(f"--resume {mode}: not a checkpoint of stage {stage.name}")


# --------------------------------------------------------------------------------------------
# Helpers of run_stage


def shared_scan(path, cfg, dist):
    """scan_data_file on rank 0, its result shared with every rank (a DataError reaches all)."""
    return distributed.computed_on_main(
        lambda: scan_data_file(path, limit=cfg.bad_record_limit, progress=True, max_patches=cfg.max_patches))


def make_sampler(dataset, cfg, dist, shuffle, what):
    try:
        return distributed.ResumableSampler(len(dataset), seed=cfg.seed, rank=dist.rank,
                                            world_size=dist.world_size, shuffle=shuffle,
                                            batch_size=cfg.batch_size)
    except ValueError as error:
        raise DataError(f"{what}: {error}") from error


def wrap_ddp(model, device):
    """DistributedDataParallel around the model: every LoRA weight is used every step (so no
    find_unused_parameters), and the frozen buffers are never re-broadcast during training."""
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_buffer_sync)


def ignore_stop_signals(worker_id):
    """DataLoader worker start: leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, sampler, cfg, device):
    """DataLoader over the sampler's batches of keys; workers with pinned memory on the GPU. Its own
    generator keeps the global RNG untouched (so resumed runs draw the same dropout masks)."""
    workers = cfg.num_workers
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      collate_fn=Collator(dataset.tokenizer.pad_token_id),
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None,
                      generator=torch.Generator())


def periodic_steps(windows, per_epoch):
    """Optimizer steps of an epoch after which a periodic checkpoint is written: `per_epoch` evenly
    spaced ones, the epoch's last step excluded (the epoch checkpoint follows it)."""
    if per_epoch <= 0:
        return set()
    return {math.ceil(j * windows / per_epoch) for j in range(1, per_epoch + 1)} - {windows}


def lr_factor(step, warmup_steps, total_steps, schedule):
    """Learning-rate multiplier after `step` optimizer steps: linear warm-up, then constant or cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def release_memory(device):
    """Free what Python still holds and return cached GPU memory (between epochs, stages, after OOM)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def set_encoder_dropout(model, p):
    """Set every dropout of the symbolic encoder (BERT hidden and attention dropout) to p."""
    for module in model.symbolic_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def count_lora_modules(model):
    """How many layers carry LoRA weights (a second, nested wrap would show up here)."""
    return sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))


def adapter_record(cfg, stage, progress, metrics, eval_loss, train_scan, eval_scan):
    """What the best adapter was trained on, saved beside it as training_record.json."""
    return {
        "stage": stage.name, "epoch": progress.best_epoch, "optimizer_steps": progress.optimizer_steps,
        "samples_seen": progress.samples_seen, "best_metric": cfg.best_metric, "best_value": progress.best_value,
        "eval_loss": eval_loss, "metrics": metrics,
        "data": {"train": str(train_scan.path), "train_records": len(train_scan.records),
                 "eval": str(eval_scan.path), "eval_records": len(eval_scan.records)},
        "settings": {k: getattr(cfg, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lr",
                                                  "batch_size", "grad_accum", "epochs", "seed", "max_patches",
                                                  "max_text_tokens", "precision")},
        "saved_at": time.ctime(),
    }


def backward_oom_error(error, stage, index, epoch, step, dist):
    """The error that stops a multi-process run after an OOM in the backward pass: the other ranks
    are inside the gradient all-reduce, so this batch cannot be skipped by all of them together."""
    return Clamp3LoraError(
        f"out of memory in the backward pass of batch {index} of epoch {epoch + 1} (step {step}) on rank "
        f"{dist.rank} of {stage.name}: with several processes a backward pass cannot be skipped (the other "
        f"ranks are already in the gradient all-reduce), so the job stops. Lower --batch-size or "
        f"--max-patches, then continue with --resume auto. ({error})")


def stop_for_signal(signals, save_emergency, stage, argv, dist):
    """Save the emergency checkpoint and build the StopTraining for the signal that arrived."""
    number = signals.received or signal.SIGTERM
    name = signal.Signals(number).name
    path = save_emergency(name)
    where = f"  Emergency checkpoint: {path}\n" if path is not None else ""
    return StopTraining(128 + number, (
        f"⚠ {name} received: {stage.name} training stopped at an optimizer-step boundary.\n{where}"
        f"  Resume with:\n  {resume_command(argv, dist)}"))


def resume_command(argv, dist):
    """The command that continues this run: the same flags, --resume auto, no fault injection."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--resume", "--fault-inject"):
            skip = True
            continue
        if arg.startswith(("--resume=", "--fault-inject=")):
            continue
        kept.append(arg)
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    if dist.world_size > 1:
        launcher = ["torchrun"] + ([f"--nnodes={nodes}"] if nodes > 1 else ["--standalone"]) + [
            f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', dist.world_size)}"]
    else:
        launcher = ["python"]
    command = " ".join(shlex.quote(a) for a in launcher + ["train_clamp3_lora.py"] + kept + ["--resume", "auto"])
    if nodes > 1:
        command += "\n  (on every node, with the job's --node_rank / --rdzv_* flags, as the job was started)"
    return command


def format_value(value):
    return "n/a" if value is None else f"{value:.6f}"


def format_counts(counts):
    total = sum(counts.values())
    return f"{total}" + (" (" + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + ")" if total else "")


# --------------------------------------------------------------------------------------------
# Faults and signals


class Faults:
    """The fault-injection plan (see the module doc): {(kind, step): rank or None}."""

    def __init__(self, faults=()):
        self.faults = list(faults)

    @classmethod
    def parse(cls, text):
        faults = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, where = item.partition("@")
            step, _, rank = where.partition(":")
            if kind not in FAULT_KINDS or not step.isdigit() or (rank and not rank.isdigit()):
                raise Clamp3LoraError(f"fault injection {item!r}: expected KIND@STEP or KIND@STEP:RANK "
                                      f"with KIND one of {', '.join(FAULT_KINDS)}")
            faults.append((kind, int(step), int(rank) if rank else None))
        return cls(faults)

    def due(self, kind, step, rank):
        return any(k == kind and s == step and r in (None, rank) for k, s, r in self.faults)

    def raise_oom(self, step, rank, kind="oom"):
        if self.due(kind, step, rank):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by the fault hook at step {step})")

    def poison_gradient(self, step, rank, params):
        if self.due("nangrad", step, rank):
            for param in params:
                if param.grad is not None:
                    param.grad.view(-1)[0] = math.nan
                    return

    def before_batch(self, step, rank, signals):
        """The faults that strike before a batch: a signal to this process, an unexpected error, a
        hang (until `signals` has received a stop signal)."""
        for kind in ("sigint", "sigterm", "sigkill"):
            if self.due(kind, step, rank):
                os.kill(os.getpid(), getattr(signal, kind.upper()))
        if self.due("error", step, rank):
            raise RuntimeError(f"unexpected failure (injected by the fault hook at step {step})")
        if self.due("hang", step, rank):
            while signals.received is None:
                time.sleep(0.05)


class StopSignals:
    """Within `with StopSignals() as signals:`, SIGINT and SIGTERM only set `signals.received`
    (the loop stops at the next step boundary). A second Ctrl+C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def handle(self, number, frame):
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl+C: stopping without an emergency checkpoint")
        self.received = self.received or number

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


# --------------------------------------------------------------------------------------------
# Output


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

    def epoch_summary(self, stage, entry, cfg, progress, improved, adapter_dir, checkpoint_path):
        memory = entry["gpu_memory"]
        metrics = entry["metrics"]
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
            f"    GPU Memory: {memory['allocated_gb']:.2f} GB allocated, {memory['reserved_gb']:.2f} GB reserved, "
            f"{memory['peak_gb']:.2f} GB peak",
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
    if results:
        console.say("Output files:")
        for result in results:
            for path in result.files:
                console.say(f"  {path}")
