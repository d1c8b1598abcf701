"""The two-stage LoRA training recipe: stage 1/2 trains the ABC adapter, stage 2/2 the MTF adapter.

Read it top to bottom: `main` prints the banner, plans each stage (plan.py: fresh, resume or skip)
and runs it; a `StageRun` sets the stage up (data, model, optimizer and schedule, the resume) in
named methods, then `StageRun.train` is THE loop: epochs -> batches -> step -> log -> checkpoint
-> evaluate. One batch goes through `step.Step.run` (forward, guards, backward, clip, update), the
same step the preflight's dry run and the benchmark call.

Robustness, in the loop itself:
- Checkpoints (checkpoint.py): periodic ones during each epoch, one per epoch (the last few kept),
  an emergency one on Ctrl+C (SIGINT), SIGTERM, too many bad steps in a row, or an unexpected error.
- Exact resume (`--resume auto`): a checkpoint holds the LoRA weights, optimizer, scheduler,
  GradScaler, the position in the epoch's data order and every RNG state; a sample's augmentations
  depend only on (seed, epoch, record), so the resumed run continues with exactly the batches,
  dropout masks and updates the uninterrupted run would have had.
- Guards (step.py): an OOM or a non-finite loss skips that batch, a non-finite gradient skips that
  optimizer step; with several processes all ranks agree first, so none is left waiting. An OOM in
  the backward pass with several processes stops the job with a clear error.
- Several processes (torchrun): every collective has a timeout (--dist-timeout-s); a lost or stuck
  rank makes the others fail with a DistributedError that says so (emergency checkpoint on rank 0).
- Signals are only noted by the handler; the loop acts on them at the next optimizer-step boundary
  (all ranks at the same step), saves the emergency checkpoint and exits 130 (SIGINT) or 143 (SIGTERM).
- Fault injection for tests: faults.py (--fault-inject, CLAMP3_LORA_FAULTS). Test-only switch
  CLAMP3_LORA_TEST_NO_RNG_RESTORE=1: resume WITHOUT restoring the RNG states and the position in
  the data order (a negative control that proves the exact-resume test can fail).

Exit codes: 0 done; 1 a clear error (configuration, data, checkpoint, no GPU) or an unexpected one
(traceback); 3 too many bad steps in a row; 130 SIGINT; 143 SIGTERM.
"""
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
from tqdm import tqdm

from . import checkpoint, distributed, precision, tracking, weights
from .console import Console, banner, final_summary, format_counts, format_value
from .data import SHOWN_BAD_RECORDS, MusicTextDataset, has_samples, make_batch_loader, scan_data_file
from .errors import Clamp3LoraError, DataError
from .faults import FAULTS_ENV, Faults, restart_count
from .logs import StageLogger, gpu_memory
from .metrics import METRIC_NAMES, better, chance_metrics, gain_line, retrieval_metrics
from .model import clip_loss, load_model
from .plan import STAGES, plan_stage, resume_path_stage
from .speed import accelerate
from .step import SKIP_REASONS, BackwardOutOfMemory, Step, release_memory, to_device

EXIT_OK, EXIT_ERROR, EXIT_BAD_STEPS = 0, 1, 3
NO_RNG_RESTORE_ENV = "CLAMP3_LORA_TEST_NO_RNG_RESTORE"


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
        tracking.check(cfg.report_to)
        faults = Faults.parse(cfg.fault_inject or os.environ.get(FAULTS_ENV, ""))
        dist = distributed.setup(cfg.device, cfg.dist_timeout_s)
    except Clamp3LoraError as error:
        print(f"✗ {error}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    console = Console(dist)
    restarts = restart_count()
    if restarts:  # torchrun --max-restarts started this job again after a worker died: continue, never redo
        cfg = replace(cfg, resume="auto")
    try:
        with StopSignals() as signals:
            if not cfg.preset:  # c2, saas, REPO:FILE -> the file in the Hugging Face cache (downloaded once)
                cfg = replace(cfg, weights=weights.resolve(cfg.weights))
            banner(cfg, dist, stages, console)
            if restarts:
                console.say(f"⚠ torchrun restarted this job (restart {restarts}): continuing from the newest "
                            f"checkpoint of each stage (--resume auto)")
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
                run = StageRun(cfg, stage, plan, dist, signals, faults, console, argv)
                results.append(run.train(number, len(stages)))
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
    if cfg.precision not in precision.PRECISIONS:
        problems.append(f"--precision {cfg.precision!r}: use {', '.join(precision.PRECISIONS)}")
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
    epoch_offset: int = 0          # samples of that epoch trained under another global batch (--new-global-batch)
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
        self.epoch_offset = 0
        self.epoch_loss_sum, self.epoch_loss_count, self.epoch_samples, self.epoch_time = 0.0, 0, 0, 0.0
        self.epoch_skipped = dict.fromkeys(SKIP_REASONS, 0)

    def copy(self):
        """A snapshot, taken at every optimizer step: the counters' dicts and the history list are
        copied; the history's entries are shared (an entry is never changed once appended; a deep
        copy of them took ~0.5 ms per step after ten epochs, while the GPU waited for the next step)."""
        return replace(self, epoch_skipped=dict(self.epoch_skipped), skipped=dict(self.skipped),
                       history=list(self.history))


@dataclass
class StageResult:
    """What a finished stage leaves behind, for the final summary."""
    stage: object                  # plan.Stage
    seconds: float
    best_metric: str
    best_value: float
    best_epoch: int
    files: list
    gain: str = ""


class StageRun:
    """One stage: `train` sets it up with the named set_up_* methods, in order (data, model, loaders,
    optimizer and schedule, progress or resume), then runs the loop. Rank 0 alone writes files."""

    def __init__(self, cfg, stage, plan, dist, signals, faults, console, argv):
        self.cfg, self.stage, self.plan, self.dist = cfg, stage, plan, dist
        self.signals, self.faults, self.console, self.argv = signals, faults, console, argv
        self.started = time.time()
        self.log_dir = Path(cfg.output_dir) / "logs" / "lora"
        self.adapter_dir = Path(cfg.output_dir) / "adapters" / stage.adapter
        self.logger = StageLogger(self.log_dir, stage.name) if dist.is_main else None
        self.exact = os.environ.get(NO_RNG_RESTORE_ENV) != "1"

    def note(self, text):
        """A line for the terminal and the stage's text log."""
        self.console.say(text)
        if self.logger is not None:
            self.logger.write(text)

    def note_scan(self, scan):
        """A data file's scan: the terminal shows the first bad records and where the full list is;
        the stage's text log holds every one of them (`file:line: reason`)."""
        mark = "⚠ " if scan.bad else "✓ "
        self.console.say(mark + scan.summary())
        if self.logger is not None:
            self.logger.write(mark + scan.summary(show=len(scan.bad)))
            if len(scan.bad) > SHOWN_BAD_RECORDS:
                self.console.say(f"  (all {len(scan.bad)} bad records of {scan.path}: {self.logger.log_path})")

    def note_dropped(self, dropped):
        """Samples whose record passed the scan but that could not be made now (data.MusicTextDataset):
        each `file:line: why` on the terminal and in the stage's text log; any rank may meet them."""
        for where in dropped:
            line = f"⚠ [{self.stage.name}] sample dropped: {where}"
            if self.dist.is_main:
                self.note(line)
            else:
                self.console.error(line)

    # --- set-up -----------------------------------------------------------------------------

    def set_up_data(self):
        """Scan both data files (rank 0; bad records reported with file:line), build the datasets."""
        cfg, stage = self.cfg, self.stage
        self.train_scan = shared_scan(getattr(cfg, stage.train_field), cfg, self.dist)
        self.eval_scan = shared_scan(getattr(cfg, stage.eval_field), cfg, self.dist)
        for scan in (self.train_scan, self.eval_scan):
            self.note_scan(scan)
        if len(self.eval_scan.records) < 2:
            raise DataError(f"{self.eval_scan.path}: {len(self.eval_scan.records)} usable validation pair(s); "
                            f"retrieval ranks each text among the pieces, which needs at least 2")

    def set_up_model(self):
        """The frozen base, a fresh adapter (a new model per stage, never re-wrapped), the speed paths."""
        cfg, device = self.cfg, self.dist.device
        torch.manual_seed(cfg.seed)  # a random preset base is then the same in every run and stage
        model = load_model(None if cfg.preset else cfg.weights, text_model=cfg.text_model,
                           preset=cfg.preset or None, device=device)
        set_encoder_dropout(model, cfg.encoder_dropout)
        model.add_adapter(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          targets=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()))
        params = model.trainable_parameters()
        self.note(f"✓ LoRA adapter: r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout} on "
                  f"{cfg.lora_targets}: {count_lora_modules(model)} LoRA modules, "
                  f"{sum(p.numel() for p in params):,} trainable parameters")
        speed = accelerate(model, cfg.precision, cfg.speed)
        self.note("✓ training step: " + ", ".join(f"{name} {value}" for name, value in speed.items()))
        self.model = model
        self.train_model = wrap_ddp(model, device) if self.dist.distributed else model

    def set_up_loaders(self):
        cfg, dist, stage = self.cfg, self.dist, self.stage
        sets = [MusicTextDataset(scan.records, self.model.tokenizer, train=train, max_patches=cfg.max_patches,
                                 max_text_tokens=cfg.max_text_tokens, cache_mb=cfg.patch_cache_mb,
                                 instrument_removal_prob=cfg.instrument_removal_prob if train else 0.0)
                for scan, train in ((self.train_scan, True), (self.eval_scan, False))]
        self.train_set, self.eval_set = sets
        self.train_sampler = make_sampler(self.train_set, cfg, dist, True, getattr(cfg, stage.train_field))
        self.eval_sampler = make_sampler(self.eval_set, cfg, dist, False, getattr(cfg, stage.eval_field))
        self.train_loader = make_batch_loader(self.train_set, self.train_sampler, cfg.num_workers, dist.device)
        self.eval_loader = make_batch_loader(self.eval_set, self.eval_sampler, cfg.num_workers, dist.device)
        self.batches = len(self.train_sampler)
        self.windows = math.ceil(self.batches / cfg.grad_accum)          # optimizer steps per epoch
        self.periodic_at = periodic_steps(self.windows, cfg.checkpoints_per_epoch)

    def set_up_optimizer(self):
        """AdamW over the LoRA weights, warm-up then cosine/constant, GradScaler for fp16; the step."""
        cfg, device = self.cfg, self.dist.device
        self.optimizer = make_optimizer(self.model.trainable_parameters(), cfg.lr, cfg.weight_decay, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.epochs * self.windows, schedule=cfg.schedule))
        self.scaler = precision.grad_scaler(device, cfg.precision)
        gather = distributed.gather_with_grad if self.dist.distributed else None
        self.step = Step(self.model, self.optimizer, self.scheduler, self.scaler, cfg.precision, cfg.max_grad_norm,
                         device, train_model=self.train_model, gather=gather, text_ahead=cfg.speed.text_ahead,
                         faults=self.faults, rank=self.dist.rank)

    def set_up_progress(self):
        """Where the stage starts: from scratch (the base model evaluated as epoch 0) or from the
        plan's checkpoint (every state restored)."""
        dist, plan = self.dist, self.plan
        self.progress = Progress()
        torch.manual_seed(self.cfg.seed + 1 + dist.rank)  # this rank's dropout stream
        if plan.action == "resume":
            self.resume(plan)
        if self.logger is not None:
            self.logger.set_history(self.progress.history)
            self.logger.truncate_steps_after(self.progress.micro_step - 1)
        backends = tracking.check(self.cfg.report_to) if dist.is_main else []
        self.tracker = tracking.Tracker(backends, self.log_dir, self.stage.name, asdict(self.cfg),
                                        next_step=self.progress.micro_step, next_epoch=len(self.progress.history))
        cfg = self.cfg
        self.note(f"  {len(self.train_set)} training records, {len(self.eval_set)} validation records; "
                  f"{self.batches} batches of {cfg.batch_size} per rank x {dist.world_size} rank(s), {self.windows} "
                  f"optimizer steps per epoch, {cfg.epochs} epochs; periodic checkpoints after steps "
                  f"{sorted(self.periodic_at) or 'none'}")
        self.chance = chance_metrics(len(self.eval_set))
        if self.progress.epoch == 0 and self.progress.batch == 0 and not self.progress.history:
            self.evaluate_base()
        self.mark_boundary()

    def resume(self, plan):
        """Every state from the plan's checkpoint. On another number of processes the data continues
        at the same sample and each rank's dropout stream is derived afresh; another global batch
        (--new-global-batch) is mapped to the same sample too."""
        dist, state = self.dist, plan.state
        saved_world = state["world_size"]
        same_batch = state["identity"]["batch_size"] * saved_world == self.cfg.batch_size * dist.world_size
        rng_known = (saved_world == dist.world_size and dist.rank < len(state["rng"])
                     and state["rng"][dist.rank] is not None)
        checkpoint.restore_training_state(plan.path, state, self.model, self.optimizer, self.scheduler,
                                          self.scaler, rank=dist.rank, device=dist.device,
                                          restore_rng_states=self.exact and rng_known)
        self.progress = Progress(**state["progress"])
        if saved_world != dist.world_size:
            torch.manual_seed(distributed.rank_seed(self.cfg.seed, self.progress.epoch, self.progress.batch, dist.rank))
            self.note(f"✓ {plan.path} was written by {saved_world} process(es); this run has {dist.world_size}"
                      + (", with the same global batch: the data continues at the same sample" if same_batch else "")
                      + "; each rank's dropout stream is derived afresh from the seed (other dropout masks)")
        elif not rng_known:
            self.console.error(f"⚠ {plan.path} has no RNG state for rank {dist.rank} (an emergency checkpoint "
                               f"written after an error on one rank): dropout continues from a fresh seed, not exactly")
        if not same_batch:
            self.continue_with_new_global_batch(state)
        self.note(f"✓ resumed from {plan.path}: epoch {self.progress.epoch + 1}, batch {self.progress.batch}/"
                  f"{self.batches}, {self.progress.optimizer_steps} optimizer steps, "
                  f"{self.progress.samples_seen} samples seen")
        if not self.exact:
            self.note(f"⚠ {NO_RNG_RESTORE_ENV}=1: RNG states and data position NOT restored (test-only switch)")

    def continue_with_new_global_batch(self, state):
        """--new-global-batch: the checkpoint's position (batches of its layout) becomes the sample it
        stands at in the epoch's order; the rest of the epoch is cut into this run's global batches."""
        progress, saved = self.progress, state["identity"]
        old = distributed.ResumableSampler(len(self.train_set), seed=self.cfg.seed, world_size=state["world_size"],
                                           batch_size=saved["batch_size"])
        old.set_epoch(progress.epoch, progress.epoch_offset)
        done = old.samples_done(progress.batch)
        self.train_sampler.set_epoch(progress.epoch, done)
        progress.epoch_offset, progress.batch = done, self.train_sampler.first_position
        self.note(f"⚠ --new-global-batch: the checkpoint's global batch was {saved['batch_size'] * state['world_size']}, "
                  f"this run's is {self.cfg.batch_size * self.dist.world_size}: epoch {progress.epoch + 1} continues at "
                  f"its sample {done} of {len(self.train_set)}; the contrastive loss sees the new batch's negatives and "
                  f"the learning rate follows the schedule over {self.cfg.epochs * self.windows} optimizer steps from "
                  f"step {progress.optimizer_steps}")

    # --- the loop ---------------------------------------------------------------------------

    def train(self, number, total):
        """Set the stage up, then train it: epochs -> batches -> step -> log -> checkpoint -> evaluate."""
        cfg, dist, stage, console = self.cfg, self.dist, self.stage, self.console
        console.rule(f"STAGE {number}/{total}: Training {stage.name} Adapter")
        self.note(f"{stage.name} stage started {time.ctime()}")
        self.set_up_data()
        self.set_up_model()
        self.set_up_loaders()
        self.set_up_optimizer()
        self.set_up_progress()
        self.stop_if_asked_before_training()
        progress, self.bar = self.progress, None
        try:
            for epoch in range(progress.epoch, cfg.epochs):
                console.epoch_rule(stage.name, epoch + 1, cfg.epochs)
                first = self.start_epoch(epoch)
                batches = zip(range(first, self.batches), self.train_loader)
                for (index, batch), following in with_next(batches):
                    fault_step = progress.micro_step
                    self.faults.before_batch(fault_step, dist.rank, self.signals)
                    window_start = index - index % cfg.grad_accum
                    window = min(cfg.grad_accum, self.batches - window_start)
                    last = index + 1 - window_start == window
                    try:
                        result = self.step.run(batch, window, last, key=index, following=following,
                                               fault_step=fault_step)
                    except BackwardOutOfMemory as error:
                        raise backward_oom_error(error, stage, index, epoch, fault_step, dist) from error
                    self.count_batch(result, epoch, index, fault_step, batch.get("dropped", []))
                    if last:
                        self.end_window(result, epoch, index)
                self.bar.close()
                self.end_epoch(epoch)
        except StopTraining:
            raise
        except Exception as error:
            self.fail(error)
            raise
        finally:
            self.tracker.close()
        return self.finish()

    def start_epoch(self, epoch):
        """Position the data order, set the modes, open the progress bar; the epoch's first batch."""
        first = self.progress.batch
        self.train_sampler.set_epoch(epoch, self.progress.epoch_offset)
        self.train_sampler.start_at(first if self.exact else self.train_sampler.first_position)
        self.model.train()
        self.model.text_model.eval()  # frozen and deterministic: no dropout on the text side
        reset_peak_memory(self.dist.device)
        self.clock = time.time() - self.progress.epoch_time
        self.window_records = []
        self.bar = tqdm(total=self.batches, initial=first, desc=f"[{self.stage.name}] Epoch {epoch + 1} Training",
                        disable=not self.dist.is_main, dynamic_ncols=True, leave=True)
        return first

    def count_batch(self, result, epoch, index, fault_step, dropped):
        """Counters, the step record and the progress bar after one batch (`dropped`: its samples
        that could not be made)."""
        progress, skip = self.progress, result.skip
        if dropped:
            self.note_dropped(dropped)
        if skip is not None:
            progress.bad_in_row += 1
            progress.epoch_skipped[skip] = progress.epoch_skipped.get(skip, 0) + 1
            progress.skipped[skip] = progress.skipped.get(skip, 0) + 1
            self.console.say(f"⚠ [{self.stage.name}] batch {index} of epoch {epoch + 1} (step {fault_step}) "
                             f"skipped: {skip}")
        else:
            progress.bad_in_row = 0
        size = self.train_sampler.global_batch_size(index)
        progress.micro_step += 1
        progress.samples_seen += size
        progress.epoch_samples += size
        rate = progress.epoch_samples / max(time.time() - self.clock, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        self.window_records.append({"step": fault_step, "epoch": epoch + 1, "batch": index, "loss": result.loss,
                                    "lr": lr, "samples_per_s": rate, "batch_size": size, "skipped": skip,
                                    "dropped": len(dropped)})
        self.bar.update()
        self.bar.set_postfix(loss="skipped" if result.loss is None else f"{result.loss:.4f}", lr=f"{lr:.2e}",
                             **{"samples/s": f"{rate:.1f}"}, refresh=False)

    def end_window(self, result, epoch, index):
        """An optimizer-step boundary: count the update (or its skip), log, then stop/checkpoint decisions."""
        progress, cfg = self.progress, self.cfg
        if result.skip_window is not None:
            progress.bad_in_row += 1
            progress.epoch_skipped[result.skip_window] += result.window_batches
            progress.skipped[result.skip_window] += result.window_batches
            self.console.say(f"⚠ [{self.stage.name}] optimizer step after step {progress.micro_step - 1} skipped: "
                             f"non-finite gradient")
            for record in self.window_records:
                record["skipped"] = record["skipped"] or result.skip_window
        if result.updated:
            progress.optimizer_steps += 1
            progress.epoch_loss_sum += sum(result.window_losses)
            progress.epoch_loss_count += len(result.window_losses)
        progress.batch = index + 1
        progress.epoch_time = time.time() - self.clock
        self.mark_boundary()
        if self.logger is not None:
            for record in self.window_records:
                self.logger.step(record)
                self.tracker.step(record)
        self.window_records = []
        self.stop_if_asked()
        if progress.bad_in_row >= cfg.max_bad_steps_in_row:
            self.bar.close()
            path = self.save_emergency("too many bad steps")
            raise StopTraining(EXIT_BAD_STEPS, (
                f"✗ {progress.bad_in_row} batches in a row were skipped (out of memory or NaN/Inf; limit "
                f"--max-bad-steps-in-row {cfg.max_bad_steps_in_row}). Training stopped.\n"
                f"  Emergency checkpoint: {path}\n"
                f"  Skipped so far: {format_counts(progress.skipped)}. Try a smaller --batch-size or "
                f"--max-patches (OOM) or a lower --lr (NaN), then resume:\n"
                f"  {resume_command(self.argv, self.dist)}"))
        step_in_epoch = math.ceil(progress.batch / cfg.grad_accum)
        if step_in_epoch in self.periodic_at:
            path = self.save("periodic", checkpoint.periodic_path(self.log_dir, self.stage.name, epoch + 1,
                                                                  step_in_epoch))
            if path is not None:
                checkpoint.delete_superseded(self.log_dir, self.stage.name, path)
                self.logger.write(self.progress_line(epoch, step_in_epoch))

    def progress_line(self, epoch, step_in_epoch):
        """One line for the text log at each periodic checkpoint (so `tail -f` shows the run moving):
        where the stage is, the epoch's mean loss so far, lr, samples/s, elapsed and remaining time."""
        progress, cfg = self.progress, self.cfg
        total = cfg.epochs * self.windows
        seconds_per_step = progress.epoch_time / max(step_in_epoch, 1)
        remaining = (total - (epoch * self.windows + step_in_epoch)) * seconds_per_step
        loss = progress.epoch_loss_sum / progress.epoch_loss_count if progress.epoch_loss_count else None
        memory = (f", GPU memory {torch.cuda.max_memory_allocated(self.dist.device) / 2 ** 30:.2f} GiB peak"
                  if self.dist.device.type == "cuda" else "")
        return (f"[{self.stage.name}] {time.strftime('%H:%M:%S')} epoch {epoch + 1}/{cfg.epochs} step {step_in_epoch}/"
                f"{self.windows} ({epoch * self.windows + step_in_epoch}/{total} optimizer steps): loss "
                f"{format_value(loss)}, lr {self.optimizer.param_groups[0]['lr']:.2e}, "
                f"{progress.epoch_samples / max(progress.epoch_time, 1e-9):.1f} samples/s, epoch time "
                f"{progress.epoch_time / 60:.1f} min, about {remaining / 60:.1f} min of training left{memory}")

    def end_epoch(self, epoch):
        """Evaluate, keep the best adapter, log the epoch, write the epoch checkpoint."""
        progress, cfg, stage = self.progress, self.cfg, self.stage
        train_seconds = time.time() - self.clock
        evaluation = evaluate_split(self.model, self.eval_loader, self.eval_sampler, cfg, self.dist, self.signals,
                                    f"[{stage.name}] Epoch {epoch + 1} Eval", self.note_dropped)
        if evaluation is None:
            raise stop_for_signal(self.signals, self.save_emergency, stage, self.argv, self.dist)
        eval_loss, metrics = evaluation
        value = eval_loss if cfg.best_metric == "eval_loss" else metrics[cfg.best_metric]
        improved = better(cfg.best_metric, value, progress.best_value)
        if improved:
            progress.best_value, progress.best_epoch = value, epoch + 1
        if better("eval_loss", eval_loss, progress.best_eval_loss):
            progress.best_eval_loss, progress.best_eval_loss_epoch = eval_loss, epoch + 1
        if improved and self.dist.is_main:
            self.model.save_adapter(self.adapter_dir, adapter_record(cfg, stage, progress, metrics, eval_loss,
                                                                     self.train_scan, self.eval_scan))
        entry = {
            "epoch": epoch + 1,
            "train_loss": progress.epoch_loss_sum / progress.epoch_loss_count if progress.epoch_loss_count else math.nan,
            "eval_loss": eval_loss, "time": time.time() - self.clock, "timestamp": time.ctime(),
            "train_time": train_seconds, "samples_per_s": progress.epoch_samples / max(train_seconds, 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"], "optimizer_steps": progress.optimizer_steps,
            "samples_seen": progress.samples_seen, "gpu_memory": gpu_memory(self.dist.device),
            "metrics": metrics, "chance": self.chance, "eval_pairs": len(self.eval_set),
            "skipped": dict(progress.epoch_skipped), "best_metric": cfg.best_metric,
            "best_value": progress.best_value, "best_epoch": progress.best_epoch,
        }
        progress.history.append(entry)
        if self.logger is not None:
            self.logger.epoch(entry, cfg.epochs)
            self.tracker.epoch(entry)
        progress.next_epoch()
        self.mark_boundary()
        path = self.save("epoch", checkpoint.epoch_path(self.log_dir, stage.name, epoch + 1))
        if path is not None:
            checkpoint.rotate_epoch_checkpoints(self.log_dir, stage.name, cfg.keep_epoch_checkpoints)
            checkpoint.delete_superseded(self.log_dir, stage.name, path)
        self.console.epoch_summary(stage.name, entry, cfg, progress, improved, self.adapter_dir, path)
        release_memory(self.dist.device)
        self.stop_if_asked()

    def evaluate_base(self):
        """Epoch 0 of the history: the base model (the fresh adapter changes nothing yet) on the
        validation set, before any training."""
        clock = time.time()
        evaluation = evaluate_split(self.model, self.eval_loader, self.eval_sampler, self.cfg, self.dist, self.signals,
                                    f"[{self.stage.name}] Base model Eval", self.note_dropped)
        if evaluation is None:
            self.stop_if_asked_before_training()
        eval_loss, metrics = evaluation
        entry = {"epoch": 0, "train_loss": None, "eval_loss": eval_loss, "time": time.time() - clock,
                 "timestamp": time.ctime(), "gpu_memory": gpu_memory(self.dist.device), "metrics": metrics,
                 "chance": self.chance, "eval_pairs": len(self.eval_set), "skipped": {}, "base_model": True}
        self.progress.history.append(entry)
        if self.logger is not None:
            self.logger.epoch(entry, self.cfg.epochs)
            self.tracker.epoch(entry)
        self.console.base_summary(self.stage.name, entry)

    def finish(self):
        """The stage is done: the finished marker, the summary with the gain line; a StageResult."""
        progress, stage = self.progress, self.stage
        seconds = time.time() - self.started
        gain = stage_gain(stage, progress)
        files = []
        if self.dist.is_main:
            marker = checkpoint.write_finished(self.log_dir, stage.name, {
                "identity": self.plan.identity, "adapter": str(self.adapter_dir), "best_metric": self.cfg.best_metric,
                "best_value": progress.best_value, "best_epoch": progress.best_epoch,
                "optimizer_steps": progress.optimizer_steps, "samples_seen": progress.samples_seen})
            files = ([self.adapter_dir] + self.logger.files()
                     + sorted(checkpoint.stage_checkpoints(self.log_dir, stage.name)) + [marker])
            self.note(f"✓ {stage.name} stage finished in {seconds:.1f}s ({seconds / 60:.2f} min): best "
                      f"{self.cfg.best_metric} {format_value(progress.best_value)} at epoch {progress.best_epoch}, "
                      f"adapter {self.adapter_dir}")
            self.note(f"  skipped batches in the stage: {format_counts(progress.skipped)}")
            self.note(f"✓ {gain}")
            for scan in (self.train_scan, self.eval_scan):
                if scan.bad:
                    self.console.say("⚠ bad records skipped:\n" + scan.summary())
                    self.logger.write("⚠ bad records skipped:\n" + scan.summary(show=len(scan.bad)))
        distributed.barrier()
        return StageResult(stage, seconds, self.cfg.best_metric, progress.best_value, progress.best_epoch, files, gain)

    # --- checkpoints and stops --------------------------------------------------------------

    def mark_boundary(self):
        """Remember the state at this optimizer-step boundary (what an emergency checkpoint saves)."""
        self.boundary = self.progress.copy()
        self.boundary_rng = checkpoint.capture_rng(self.dist.device)

    def save(self, kind, path, rngs=None):
        """Write a checkpoint of the last boundary (rank 0 writes; the RNG states of every rank)."""
        rngs = distributed.all_gather_objects(self.boundary_rng) if rngs is None else rngs
        if not self.dist.is_main:
            return None
        state = {
            "stage": self.stage.name, "kind": kind, "identity": self.plan.identity, "config": asdict(self.cfg),
            "lora": self.model.lora_state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() or None,
            "progress": asdict(self.boundary),
            "sampler": self.train_sampler.state_dict(epoch=self.boundary.epoch, position=self.boundary.batch),
            "rng": rngs, "world_size": self.dist.world_size,
        }
        return checkpoint.save(path, state)

    def save_emergency(self, reason, collective=True):
        """The emergency checkpoint at the last boundary; returns its path (on rank 0)."""
        rngs = None if collective else [self.boundary_rng] + [None] * (self.dist.world_size - 1)
        path = self.save("emergency", checkpoint.emergency_path(self.log_dir, self.stage.name), rngs)
        if path is not None:
            self.note(f"✓ emergency checkpoint ({reason}) saved: {path}")
        return path

    def stop_if_asked_before_training(self):
        """A stop signal during the stage's set-up (data scan, model load, base evaluation): stop at
        once, before any step of the stage; its earlier checkpoints, if any, stay as they were."""
        if distributed.all_reduce_flag(self.signals.received is not None):
            number = self.signals.received or signal.SIGTERM
            raise StopTraining(128 + number, (
                f"⚠ {signal.Signals(number).name} during the start-up of the {self.stage.name} stage: stopped before "
                f"its first step; nothing of this stage was trained yet.\n"
                f"  Start again with:\n  {resume_command(self.argv, self.dist)}"))

    def stop_if_asked(self):
        """At a boundary: stop (emergency checkpoint) when any rank received a stop signal."""
        if distributed.all_reduce_flag(self.signals.received is not None):
            if self.bar is not None:
                self.bar.close()
            raise stop_for_signal(self.signals, self.save_emergency, self.stage, self.argv, self.dist)

    def fail(self, error):
        """An unexpected error: report it, try the emergency checkpoint (the error then goes on)."""
        if self.bar is not None:
            self.bar.close()
        if not isinstance(error, Clamp3LoraError):  # those are printed once, by main
            self.console.error(f"✗ [{self.stage.name}] training failed: {type(error).__name__}: {error}")
        try:
            self.save_emergency(f"{type(error).__name__}", collective=False)
        except Exception as save_error:  # report it, then let the original error through
            self.console.error(f"✗ the emergency checkpoint could not be saved either: {save_error}")


def stage_gain(stage, progress):
    """The line that says what the stage's best adapter gained over the base model (epoch 0)."""
    entries = {entry["epoch"]: entry for entry in progress.history}
    best, base = entries.get(progress.best_epoch), entries.get(0)
    if best is None or base is None or "chance" not in best:
        return f"{stage.name} adapter: no base-model evaluation in this run's history (resumed from an older checkpoint)"
    return gain_line(f"{stage.name} adapter", best["metrics"], base["metrics"], best["chance"], best["eval_pairs"])


# --------------------------------------------------------------------------------------------
# Helpers of a stage


def evaluate_split(model, loader, sampler, cfg, dist, signals, desc, note_dropped=None):
    """(eval loss, retrieval metrics) over the whole validation set, or None when a stop signal
    arrives. The loss is the CLIP loss of each global batch, averaged over samples; the metrics
    rank every validation pair against all others (features gathered from every rank, in order).
    `note_dropped(list)` hears of samples that could not be made (data.MusicTextDataset)."""
    model.eval()
    sampler.set_epoch(0)
    musics, texts, loss_sum, count = [], [], 0.0, 0
    with torch.no_grad(), tqdm(loader, desc=desc, disable=not dist.is_main, dynamic_ncols=True, leave=True) as bar:
        for batch in bar:
            if distributed.all_reduce_flag(signals.received is not None):
                return None
            if note_dropped is not None and batch.get("dropped"):
                note_dropped(batch["dropped"])
            if has_samples(batch):
                batch = to_device(batch, dist.device)
                with precision.autocast(dist.device, cfg.precision):
                    music = model.music_features(batch["patches"], batch["patch_mask"])
                    text = model.text_features(batch["text_ids"], batch["text_mask"])
            else:  # every sample of this rank's batch dropped (logged where the data is loaded)
                music = text = torch.zeros(0, model.config.projection_size, device=dist.device)
            music, text = distributed.gather(music.float()), distributed.gather(text.float())
            if not len(music):
                continue
            loss_sum += clip_loss(music, text).item() * len(music)
            count += len(music)
            musics.append(music.cpu())
            texts.append(text.cpu())
    return loss_sum / count, retrieval_metrics(torch.cat(texts), torch.cat(musics))


def shared_scan(path, cfg, dist):
    """scan_data_file on rank 0, its result shared with every rank (a DataError reaches all)."""
    return distributed.computed_on_main(
        lambda: scan_data_file(path, limit=cfg.bad_record_limit, progress=True, max_patches=cfg.max_patches,
                               music_roots=cfg.music_root))


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


def make_optimizer(params, lr, weight_decay, device):
    """AdamW over the LoRA weights; on CUDA its fused kernel (one launch per step for all tensors;
    the same update and state dict as the default implementation)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def with_next(items):
    """Pairs (item, the item after it, or None for the last) of an iterable, one item read ahead."""
    items = iter(items)
    end = object()
    item = next(items, end)
    while item is not end:
        following = next(items, end)
        yield item, (None if following is end else following)
        item = following


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
