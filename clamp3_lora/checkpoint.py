"""Training checkpoints: atomic saves, validated loads, rotation, and finding where to resume.

Files of a stage (here "ABC") in the log folder (OUTPUT_DIR/logs/lora):

    ABC_checkpoint_epoch{N}.pth            end of epoch N (the last keep_epoch_checkpoints are kept)
    ABC_checkpoint_epoch{N}_step{S}.pth    periodic, after optimizer step S of epoch N (only the
                                           newest is kept; all go once epoch N's checkpoint exists)
    ABC_emergency_checkpoint.pth           Ctrl+C, SIGTERM, too many bad steps, unexpected errors
    ABC_finished.json                      marker: the stage ran all its epochs

A checkpoint is one `torch.save`d dict (loadable with weights_only=True):

    format, version       "clamp3-lora-training-checkpoint", 1
    stage, kind           "ABC" | "MTF"; "epoch" | "periodic" | "emergency"
    identity              what the numbers depend on (model, LoRA shape, data files, optimisation
                          settings, the global batch = batch size x world size); a resume with a
                          different identity is refused (another world size with the same global
                          batch continues: `comparable`)
    config                the whole TrainConfig as a dict (for the record)
    lora                  LoRA tensors (peft keys), fp32 on the CPU
    optimizer, scheduler  state dicts (AdamW, LambdaLR)
    scaler                GradScaler state dict (fp16), or None
    progress              epoch in progress, batches done in it, micro-steps, optimizer steps,
                          samples seen, the epoch's running loss/skip counts, skipped batches,
                          best metric and its epoch, history
    sampler               the data order: seed, epoch, position (batches), layout
    rng                   one entry per rank: python, numpy, torch CPU and CUDA generator states
    world_size, saved_at, torch

Writes go to a temporary file in the same folder, are flushed and fsynced, renamed over the
target, and the folder is fsynced: a crash during a save leaves the previous file intact. Loads
check everything before anything is applied, so a bad file is refused whole, never half-loaded.
"""
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .logs import atomic_torch_save, atomic_write_json

FORMAT = "clamp3-lora-training-checkpoint"
VERSION = 1
KINDS = ("epoch", "periodic", "emergency")
REQUIRED_KEYS = ("format", "version", "stage", "kind", "identity", "config", "lora", "optimizer",
                 "scheduler", "scaler", "progress", "sampler", "rng", "world_size")


# --------------------------------------------------------------------------------------------
# File names


def epoch_path(log_dir, stage, epoch):
    """Checkpoint written at the end of epoch `epoch` (1-based)."""
    return Path(log_dir) / f"{stage}_checkpoint_epoch{epoch}.pth"


def periodic_path(log_dir, stage, epoch, step):
    """Checkpoint written after optimizer step `step` of epoch `epoch` (both 1-based)."""
    return Path(log_dir) / f"{stage}_checkpoint_epoch{epoch}_step{step}.pth"


def emergency_path(log_dir, stage):
    """The stage's emergency checkpoint."""
    return Path(log_dir) / f"{stage}_emergency_checkpoint.pth"


def finished_path(log_dir, stage):
    """The marker written when the stage has run all its epochs."""
    return Path(log_dir) / f"{stage}_finished.json"


def _pattern(stage):
    return re.compile(rf"^{re.escape(stage)}_checkpoint_epoch(\d+)(?:_step(\d+))?\.pth$")


def epoch_checkpoints(log_dir, stage):
    """{epoch: path} of the stage's epoch checkpoints."""
    found = {}
    for path in Path(log_dir).glob(f"{stage}_checkpoint_epoch*.pth"):
        match = _pattern(stage).match(path.name)
        if match and match.group(2) is None:
            found[int(match.group(1))] = path
    return found


def periodic_checkpoints(log_dir, stage):
    """Paths of the stage's periodic checkpoints."""
    paths = []
    for path in Path(log_dir).glob(f"{stage}_checkpoint_epoch*_step*.pth"):
        if _pattern(stage).match(path.name):
            paths.append(path)
    return paths


def stage_checkpoints(log_dir, stage):
    """Every checkpoint file of the stage (epoch, periodic, emergency) that exists."""
    paths = list(epoch_checkpoints(log_dir, stage).values()) + periodic_checkpoints(log_dir, stage)
    emergency = emergency_path(log_dir, stage)
    if emergency.exists():
        paths.append(emergency)
    return paths


# --------------------------------------------------------------------------------------------
# Save and load


def save(path, state):
    """Write a checkpoint atomically (temporary file in the same folder, fsync, rename, fsync the
    folder). `state` gets format, version, saved_at and torch added."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state, format=FORMAT, version=VERSION, saved_at=time.time(), torch=str(torch.__version__))
    atomic_torch_save(path, state)
    return path


def read(path):
    """The raw dict of a checkpoint file, checked for format only. CheckpointError (naming the
    file) when it is missing, truncated, corrupt or not a training checkpoint of this project."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load of a damaged file raises many types (RuntimeError,
        # EOFError, UnpicklingError, zip errors); each means this file cannot be used: say so, by name
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt "
                              f"({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a CLaMP 3 LoRA training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('version')}; "
                              f"this trainer reads version {VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if state["kind"] not in KINDS:
        raise CheckpointError(f"checkpoint {path} has an unknown kind {state['kind']!r}")
    return state


def identity_differences(saved, current):
    """Lines "name: checkpoint X, now Y" for every entry where two identities differ."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            lines.append(f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
    return lines


def launch_command(world_size):
    """How a run with `world_size` processes is started (for messages)."""
    if world_size == 1:
        return "python train_clamp3_lora.py ..."
    return (f"torchrun --nproc_per_node={world_size} train_clamp3_lora.py ... (or nodes x processes per "
            f"node = {world_size} across several nodes)")


def comparable(identity):
    """An identity as resumes compare it: the world size and the per-rank batch size give way to the
    global batch (batch size x processes), which is what the training's numbers depend on. So a
    run may continue on another number of processes when its batch size keeps the global batch."""
    identity = dict(identity)
    world_size = identity.pop("world_size", None)
    batch_size = identity.pop("batch_size", None)
    if world_size is not None and batch_size is not None:
        identity["global_batch"] = batch_size * world_size
    return identity


def world_size_change(saved, current):
    """Lines for a CheckpointError when the global batch changed with the number of processes: what
    batch size keeps it, and why another global batch cannot continue the same training."""
    global_batch = saved["batch_size"] * saved["world_size"]
    lines = [f"the global batch differs: the checkpoint's run had {saved['world_size']} process(es) x batch size "
             f"{saved['batch_size']} = {global_batch}; this run has {current['world_size']} x {current['batch_size']} "
             f"= {current['batch_size'] * current['world_size']}."]
    if global_batch % current["world_size"] == 0:
        lines.append(f"Continue it on {current['world_size']} process(es) with --batch-size "
                     f"{global_batch // current['world_size']} (the same global batch: the same training).")
    lines.append(f"Or continue with its own layout: {launch_command(saved['world_size'])} --batch-size "
                 f"{saved['batch_size']} --resume auto")
    lines.append("Another global batch changes the contrastive loss (its negatives), the steps per epoch and the "
                 "learning-rate schedule: add --new-global-batch to continue anyway (at the same sample of the same "
                 "epoch, the schedule stretched to the new steps per epoch), or start over with --resume fresh.")
    return lines


def check(path, state, stage=None, identity=None, new_global_batch=False):
    """Validate a read checkpoint: the right stage, and the same identity (model, LoRA shape, data
    files, settings that change the math) as the run that wants to continue from it; another global
    batch only with `new_global_batch` (--new-global-batch). Raises CheckpointError naming the file
    and what differs; returns state."""
    if stage is not None and state["stage"] != stage:
        raise CheckpointError(f"checkpoint {path} belongs to stage {state['stage']}, not {stage}")
    if identity is not None:
        saved, current = comparable(state["identity"]), comparable(identity)
        if saved.get("global_batch") != current.get("global_batch"):
            if not new_global_batch:
                raise CheckpointError(f"checkpoint {path} cannot continue here: "
                                      + "\n  ".join(world_size_change(state["identity"], identity)))
            del saved["global_batch"], current["global_batch"]
        differences = identity_differences(saved, current)
        if differences:
            raise CheckpointError(
                f"checkpoint {path} was written by a run with other settings, so continuing from it "
                f"would not give the same training:\n  " + "\n  ".join(differences)
                + "\nRun with the checkpoint's settings, or start over with --resume fresh.")
    return state


def load(path, stage=None, identity=None, new_global_batch=False):
    """read() then check(): a checkpoint that is intact, of `stage`, and of a run with `identity`."""
    return check(path, read(path), stage, identity, new_global_batch)


def find_resume_checkpoint(log_dir, stage, identity=None, warn=print, new_global_batch=False):
    """(path, state) of the newest valid checkpoint of the stage, or None when there is none.

    Newest = most recently written. A truncated or corrupt file is skipped with a ⚠ message
    through `warn` and the next newest is tried. A valid file of a run with other settings raises
    CheckpointError (falling back to an older file of that same run would not help).
    """
    candidates = sorted(stage_checkpoints(log_dir, stage), key=lambda p: p.stat().st_mtime_ns,
                        reverse=True)
    for path in candidates:
        try:
            state = read(path)
        except CheckpointError as error:
            warn(f"⚠ skipping checkpoint {path}: {error}")
            continue
        return path, check(path, state, stage, identity, new_global_batch)
    return None


# --------------------------------------------------------------------------------------------
# Rotation


def rotate_epoch_checkpoints(log_dir, stage, keep):
    """Delete all but the `keep` newest epoch checkpoints of the stage; returns the deleted paths.

    Only files named {stage}_checkpoint_epoch{N}.pth are touched (never adapters, logs or other
    stages' files)."""
    found = epoch_checkpoints(log_dir, stage)
    doomed = sorted(found)[:-keep] if keep > 0 else sorted(found)
    for epoch in doomed:
        found[epoch].unlink(missing_ok=True)
    return [found[epoch] for epoch in doomed]


def delete_superseded(log_dir, stage, newest):
    """After `newest` was written: delete the stage's other periodic checkpoints and the emergency
    checkpoint (both older than `newest`); returns the deleted paths."""
    newest = Path(newest)
    doomed = [p for p in periodic_checkpoints(log_dir, stage) if p.name != newest.name]
    emergency = emergency_path(log_dir, stage)
    if emergency.exists() and emergency.name != newest.name:
        doomed.append(emergency)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def remove_interrupted_saves(log_dir, stage):
    """Delete the temporary files that a save killed half-way left in `log_dir` (atomic writes go
    through `.NAME.XXXXXXXX.tmp` beside NAME: `.ABC_checkpoint_epoch1.pth.k2j4x9.tmp`, also the
    stage's history and log files). Only this stage's own pattern, only in its own folder, never a
    finished file; returns the deleted paths."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return []
    doomed = [path for path in folder.glob(f".{stage}_*.tmp") if path.is_file()]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def delete_stage_files(log_dir, stage):
    """Every checkpoint and the finished marker of the stage (start over); returns the deleted paths."""
    doomed = stage_checkpoints(log_dir, stage)
    marker = finished_path(log_dir, stage)
    if marker.exists():
        doomed.append(marker)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# --------------------------------------------------------------------------------------------
# Finished marker


def write_finished(log_dir, stage, record):
    """Mark the stage finished (atomic JSON write); `record` must hold "identity"."""
    path = finished_path(log_dir, stage)
    atomic_write_json(path, dict(record, stage=stage, finished_at=time.ctime()))
    return path


def read_finished(log_dir, stage):
    """The finished marker of the stage as a dict, or None when there is none (or it is unreadable)."""
    path = finished_path(log_dir, stage)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("stage") == stage else None


# --------------------------------------------------------------------------------------------
# RNG states


def capture_rng(device):
    """Every RNG state of this process: python, numpy, torch CPU, and the CUDA generator of
    `device` (None on the CPU). Only plain types and tensors, so weights_only loading works."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    device = torch.device(device)
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(state, device):
    """Put back the RNG states captured by capture_rng."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    device = torch.device(device)
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# Restoring the training objects


def _check_lora(path, saved, model):
    try:
        model.check_lora_state_dict(saved)
    except CheckpointError as error:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {error}") from error


def _check_optimizer(path, saved, optimizer):
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved.get("param_groups", [])
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
        raise CheckpointError(f"checkpoint {path}: the optimizer state does not fit the trainable "
                              f"parameters (parameters per group: checkpoint "
                              f"{[len(g['params']) for g in saved_groups]}, now {[len(g['params']) for g in groups]})")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved_groups for i in group["params"]]
    for param_id, param in zip(ids, params):
        for name, value in saved.get("state", {}).get(param_id, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(f"checkpoint {path}: optimizer state {name} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def restore_training_state(path, state, model, optimizer, scheduler, scaler, rank=0, device="cpu",
                           restore_rng_states=True):
    """Apply a loaded checkpoint: LoRA weights, optimizer, scheduler, GradScaler and (unless
    restore_rng_states is False) this rank's RNG states. Everything is checked first, so a
    checkpoint that does not fit raises CheckpointError before anything changes."""
    _check_lora(path, state["lora"], model)
    _check_optimizer(path, state["optimizer"], optimizer)
    scaler_state = state["scaler"]
    if scaler is not None and scaler.is_enabled() != bool(scaler_state):
        raise CheckpointError(f"checkpoint {path}: GradScaler state {'present' if scaler_state else 'absent'}, "
                              f"but this run {'uses' if scaler.is_enabled() else 'does not use'} one (fp16)")
    if restore_rng_states and rank >= len(state["rng"]):
        raise CheckpointError(f"checkpoint {path} has RNG states for {len(state['rng'])} ranks, not rank {rank}")
    model.load_lora_state_dict(state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    if restore_rng_states:
        restore_rng(state["rng"][rank], device)
