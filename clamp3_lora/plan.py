"""What to do with each stage: start fresh, resume from a checkpoint, or skip it (finished).

Decided on rank 0 and shared with every rank before the stage starts (see --resume in config.py):
`plan_stage` returns a Plan; the stage's identity (everything its numbers depend on) must match a
checkpoint's for the checkpoint to be continued.
"""
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, distributed
from .console import format_value
from .errors import CheckpointError, Clamp3LoraError, DataError
from .logs import file_sha256
from .model import base_checkpoint_identity


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


@dataclass
class Plan:
    """What to do with a stage: start fresh, resume from a checkpoint, or skip it (finished)."""
    action: str
    identity: dict
    path: str = None
    state: dict = None
    note: str = ""


def stage_identity(cfg, stage, world_size):
    """Everything a stage's numbers depend on; a checkpoint is only continued with the same."""
    if cfg.preset:
        base = {"preset": cfg.preset, "seed": cfg.seed}
    else:
        if not Path(cfg.weights).is_file():
            if cfg.demo:
                raise CheckpointError(
                    f"the demo's base checkpoint is missing: {Path(cfg.weights).resolve()} (paths are relative to the "
                    f"folder you run from; run from the repository root, restore the file with git, or rebuild it "
                    f"with `python tools/make_demo_base.py`, which needs music21)")
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
    return {"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}


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
    leftovers = checkpoint.remove_interrupted_saves(log_dir, stage.name)
    if leftovers:
        console.say(f"⚠ removed {len(leftovers)} temporary file(s) of an interrupted save in {log_dir}: "
                    + ", ".join(p.name for p in leftovers))
    identity = stage_identity(cfg, stage, world_size)
    mode = cfg.resume
    if resume_stage is not None:
        names = [s.name for s in stages]
        if resume_stage not in names:
            raise CheckpointError(f"--resume {cfg.resume}: a {resume_stage} checkpoint, but --stages is {cfg.stages}")
        if names.index(stage.name) < names.index(resume_stage):
            return Plan("skip", identity, note=f"{stage.name} skipped: resuming {resume_stage} from {cfg.resume}")
        if stage.name == resume_stage:
            state = checkpoint.load(cfg.resume, stage.name, identity, cfg.new_global_batch)
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
        found = checkpoint.find_resume_checkpoint(log_dir, stage.name, identity, warn=console.say,
                                                  new_global_batch=cfg.new_global_batch)
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
