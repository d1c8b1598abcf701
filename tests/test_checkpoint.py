"""checkpoint.py in process: atomic writes, validated loads, fallback past a corrupt newest file,
rotation, RNG states, and restoring the training objects (the GradScaler included)."""
import os
import random
import time

import numpy as np
import pytest
import torch

from clamp3_lora import checkpoint
from clamp3_lora.errors import CheckpointError
from clamp3_lora.model import load_model

IDENTITY = {"stage": "ABC", "lora_r": 4, "train_data": {"sha256": "aa"}, "lr": 1e-4}


def minimal_state(stage="ABC", kind="periodic", identity=IDENTITY, **extra):
    state = {"stage": stage, "kind": kind, "identity": dict(identity), "config": {}, "lora": {},
             "optimizer": {}, "scheduler": {}, "scaler": None, "progress": {"micro_step": 1},
             "sampler": {}, "rng": [], "world_size": 1}
    state.update(extra)
    return state


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch1.pth", minimal_state())
    assert checkpoint.load(path)["progress"] == {"micro_step": 1}
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, minimal_state(progress={"micro_step": 2}))
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


SAVE_IN_A_CHILD = """
import resource, signal, sys, torch
from clamp3_lora import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write over the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
state = {"stage": "ABC", "kind": "periodic", "identity": {}, "config": {}, "optimizer": {}, "scheduler": {},
         "scaler": None, "progress": {"micro_step": 2}, "sampler": {}, "rng": [], "world_size": 1,
         "lora": {"big": torch.ones(200_000)}}
checkpoint.save(sys.argv[1], state)
"""


@pytest.mark.parametrize("failure", ["write", "fsync", "rename"])
def test_a_save_that_fails_part_way_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, failure):
    """The new file's write fails half-way (a file-size limit in a child process: whatever writes
    the file, the operating system stops it part-way), or its fsync or rename fails: the previous
    checkpoint is byte for byte what it was and still loads; no temporary file is left. A save
    that wrote the checkpoint in place (path.write_bytes) fails the "write" case."""
    import subprocess
    import sys
    from pathlib import Path
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch1.pth", minimal_state())
    before = path.read_bytes()
    if failure == "write":
        root = Path(__file__).resolve().parent.parent
        child = subprocess.run([sys.executable, "-c", SAVE_IN_A_CHILD, str(path), str(len(before) * 3)],
                               cwd=root, capture_output=True, text=True, timeout=120)
        assert child.returncode != 0 and "File too large" in child.stderr, child.stderr[-2000:]
    else:
        def crash(*args, **kwargs):
            raise OSError(f"{failure} failed (simulated)")
        monkeypatch.setattr(os, "fsync" if failure == "fsync" else "replace", crash)
        with pytest.raises(OSError):
            checkpoint.save(path, minimal_state(progress={"micro_step": 2}, lora={"big": torch.ones(200_000)}))
        monkeypatch.undo()
    assert path.read_bytes() == before
    assert checkpoint.load(path)["progress"] == {"micro_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_temporary_files_of_an_interrupted_save_are_removed(tmp_path):
    kept = [tmp_path / "ABC_checkpoint_epoch1.pth", tmp_path / ".MTF_checkpoint_epoch1.pth.x1y2.tmp",
            tmp_path / ".notes.tmp", tmp_path / "ABC_x.tmp"]
    doomed = [tmp_path / ".ABC_checkpoint_epoch2.pth.k2j4x9.tmp", tmp_path / ".ABC_history.json.a1b2.tmp"]
    for path in kept + doomed:
        path.write_bytes(b"x")
    assert sorted(checkpoint.remove_interrupted_saves(tmp_path, "ABC")) == sorted(doomed)
    assert sorted(p for p in tmp_path.iterdir()) == sorted(kept)
    assert checkpoint.remove_interrupted_saves(tmp_path / "missing", "ABC") == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch1.pth", minimal_state())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 50, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        checkpoint.load(path)
    assert str(path) in str(error.value)


def test_foreign_file_wrong_stage_and_other_settings_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a CLaMP 3 LoRA training checkpoint"):
        checkpoint.load(foreign)
    path = checkpoint.save(tmp_path / "MTF_checkpoint_epoch1.pth", minimal_state(stage="MTF"))
    with pytest.raises(CheckpointError, match="belongs to stage MTF, not ABC"):
        checkpoint.load(path, stage="ABC")
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch1.pth", minimal_state())
    other = dict(IDENTITY, lora_r=8, train_data={"sha256": "bb"})
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path, stage="ABC", identity=other)
    message = str(error.value)
    assert str(path) in message and "lora_r: checkpoint 4, now 8" in message and "train_data" in message
    assert "lr" not in message.replace("--resume", "")  # only what differs is named


def test_find_resume_checkpoint_falls_back_past_a_corrupt_newest(tmp_path):
    older = checkpoint.save(checkpoint.epoch_path(tmp_path, "ABC", 1), minimal_state(kind="epoch"))
    newer = checkpoint.save(checkpoint.periodic_path(tmp_path, "ABC", 2, 1), minimal_state())
    checkpoint.save(checkpoint.epoch_path(tmp_path, "MTF", 9), minimal_state(stage="MTF"))  # other stage
    os.utime(older, ns=(time.time_ns() - 10**9, time.time_ns() - 10**9))
    assert checkpoint.find_resume_checkpoint(tmp_path, "ABC", IDENTITY)[0] == newer

    newer.write_bytes(newer.read_bytes()[:100])
    warnings = []
    path, state = checkpoint.find_resume_checkpoint(tmp_path, "ABC", IDENTITY, warn=warnings.append)
    assert path == older and state["kind"] == "epoch"
    assert len(warnings) == 1 and str(newer) in warnings[0] and warnings[0].startswith("⚠")

    older.write_bytes(b"")
    assert checkpoint.find_resume_checkpoint(tmp_path, "ABC", IDENTITY, warn=warnings.append) is None


def test_rotation_keeps_the_newest_epochs_and_touches_nothing_else(tmp_path):
    for epoch in range(1, 6):
        checkpoint.save(checkpoint.epoch_path(tmp_path, "ABC", epoch), minimal_state(kind="epoch"))
    periodic = checkpoint.save(checkpoint.periodic_path(tmp_path, "ABC", 6, 2), minimal_state())
    other_stage = checkpoint.save(checkpoint.epoch_path(tmp_path, "MTF", 1), minimal_state(stage="MTF"))
    adapter = tmp_path / "lora_abc_adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    deleted = checkpoint.rotate_epoch_checkpoints(tmp_path, "ABC", keep=3)
    assert sorted(p.name for p in deleted) == ["ABC_checkpoint_epoch1.pth", "ABC_checkpoint_epoch2.pth"]
    assert sorted(checkpoint.epoch_checkpoints(tmp_path, "ABC")) == [3, 4, 5]
    assert periodic.exists() and other_stage.exists() and (adapter / "adapter_model.safetensors").exists()


def test_superseded_periodic_and_emergency_checkpoints_are_deleted(tmp_path):
    old = checkpoint.save(checkpoint.periodic_path(tmp_path, "ABC", 1, 1), minimal_state())
    emergency = checkpoint.save(checkpoint.emergency_path(tmp_path, "ABC"), minimal_state(kind="emergency"))
    new = checkpoint.save(checkpoint.periodic_path(tmp_path, "ABC", 1, 2), minimal_state())
    epoch = checkpoint.save(checkpoint.epoch_path(tmp_path, "ABC", 1), minimal_state(kind="epoch"))
    assert sorted(p.name for p in checkpoint.delete_superseded(tmp_path, "ABC", new)) == sorted(
        [old.name, emergency.name])
    assert new.exists() and epoch.exists()


def test_rng_states_round_trip(tmp_path):
    states = checkpoint.capture_rng("cpu")
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch1.pth", minimal_state(rng=[states]))
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    checkpoint.restore_rng(checkpoint.load(path)["rng"][0], "cpu")
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def tiny_training_objects(seed=0, scale=1024.0):
    torch.manual_seed(seed)
    model = load_model(None, text_model=None, preset="tiny")
    model.add_adapter()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)
    return model, optimizer, scheduler, scaler


def training_state(model, optimizer, scheduler, scaler):
    return minimal_state(lora=model.lora_state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict() or None,
                         rng=[checkpoint.capture_rng("cpu")])


def test_grad_scaler_optimizer_and_scheduler_are_saved_and_loaded(tmp_path):
    model, optimizer, scheduler, scaler = tiny_training_objects()
    params = model.trainable_parameters()
    for _ in range(2):  # a few real steps: Adam moments, schedule position, grown scale
        loss = sum((p.float() ** 2).sum() for p in params) + sum(p.sum() for p in params)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
    assert scaler.get_scale() == 4096.0
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch1.pth", training_state(model, optimizer, scheduler, scaler))

    fresh = tiny_training_objects(seed=1, scale=8.0)
    checkpoint.restore_training_state(path, checkpoint.load(path), *fresh)
    model2, optimizer2, scheduler2, scaler2 = fresh
    assert scaler2.get_scale() == 4096.0
    assert scaler2.state_dict() == scaler.state_dict()
    assert scheduler2.state_dict()["last_epoch"] == 2 and optimizer2.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    for key, value in model.lora_state_dict().items():
        assert torch.equal(model2.lora_state_dict()[key], value)
    saved_moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    loaded_moments = [s["exp_avg"] for s in optimizer2.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(saved_moments, loaded_moments))


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_changes(tmp_path):
    model, optimizer, scheduler, scaler = tiny_training_objects()
    state = training_state(model, optimizer, scheduler, scaler)
    key = next(iter(state["lora"]))
    state["lora"][key] = torch.zeros(8, 8)  # another rank
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch1.pth", state)
    target = tiny_training_objects(seed=5, scale=8.0)
    before = target[0].lora_state_dict()
    with pytest.raises(CheckpointError, match="LoRA shape mismatch") as error:
        checkpoint.restore_training_state(path, checkpoint.load(path), *target)
    assert str(path) in str(error.value)
    assert all(torch.equal(target[0].lora_state_dict()[k], v) for k, v in before.items())
    assert target[3].get_scale() == 8.0

    state = training_state(model, optimizer, scheduler, scaler)
    state["scaler"] = None  # saved without a scaler, loaded into a run that uses one
    path = checkpoint.save(tmp_path / "ABC_checkpoint_epoch2.pth", state)
    with pytest.raises(CheckpointError, match="GradScaler"):
        checkpoint.restore_training_state(path, checkpoint.load(path), *target)
    assert all(torch.equal(target[0].lora_state_dict()[k], v) for k, v in before.items())


def test_finished_marker_round_trip(tmp_path):
    assert checkpoint.read_finished(tmp_path, "ABC") is None
    checkpoint.write_finished(tmp_path, "ABC", {"identity": IDENTITY, "best_epoch": 2})
    record = checkpoint.read_finished(tmp_path, "ABC")
    assert record["identity"] == IDENTITY and record["best_epoch"] == 2 and record["stage"] == "ABC"
    assert checkpoint.read_finished(tmp_path, "MTF") is None
