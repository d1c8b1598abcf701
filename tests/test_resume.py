"""Exact resume, with real processes: a run killed with SIGKILL after a periodic checkpoint and
continued with `--resume auto` ends exactly where an uninterrupted run ends; with the RNG and data
position restore switched off (negative control) it does not; a truncated newest checkpoint is
refused by name and the resume falls back to the one before it."""
import shutil
import signal

import pytest

from clamp3_lora import checkpoint
from trainer_fixtures import (comparable_history, explain, final_lora, log_dir, max_difference, read_steps,
                              reference_run, run_trainer, trainer_args, adapter_weights)

# 2 epochs x 4 batches; periodic checkpoints after optimizer step 2 of each epoch (micro-step 2 and 6).
# sigkill@7 kills the process just before batch 3 of epoch 2: the newest checkpoint is then the
# periodic one of epoch 2, written after micro-step 6, and the epoch-2 checkpoint does not exist.
KILL = "sigkill@7"
NEWEST = "ABC_checkpoint_epoch2_step2.pth"


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """(workspace, reference output, output of the killed run)."""
    workspace, reference = reference_run(tmp_path_factory)
    output = tmp_path_factory.mktemp("killed") / "output"
    result = run_trainer(trainer_args(workspace, output, fault_inject=KILL))
    assert result.returncode == -signal.SIGKILL, explain(result)
    names = {p.name for p in log_dir(output).iterdir()}
    assert NEWEST in names and "ABC_checkpoint_epoch1.pth" in names, names
    assert "ABC_checkpoint_epoch2.pth" not in names and "ABC_finished.json" not in names
    return workspace, reference, output


def copy_of(output, tmp_path):
    target = tmp_path / "output"
    shutil.copytree(output, target)
    return target


def test_sigkill_then_resume_auto_gives_the_uninterrupted_adapter(killed, tmp_path):
    workspace, reference, killed_output = killed
    output = copy_of(killed_output, tmp_path)
    result = run_trainer(trainer_args(workspace, output, resume="auto"))
    assert result.returncode == 0, explain(result)
    assert f"resumed from {log_dir(output) / NEWEST}" in result.stdout, explain(result)
    assert "epoch 2, batch 2/4" in result.stdout
    # one fresh adapter: 2 layers x (query, key, value), not a wrapped wrapper
    assert "6 LoRA modules" in result.stdout

    assert max_difference(final_lora(output), final_lora(reference)) <= 1e-6
    assert max_difference(adapter_weights(output), adapter_weights(reference)) <= 1e-6
    assert len(adapter_weights(output)) == 12
    assert comparable_history(output) == comparable_history(reference)
    steps, expected = read_steps(output), read_steps(reference)
    assert [s["step"] for s in steps] == list(range(8))
    assert [(s["step"], s["loss"], s["lr"]) for s in steps] == [(s["step"], s["loss"], s["lr"]) for s in expected]
    # the periodic checkpoint was superseded by the epoch checkpoint
    assert not (log_dir(output) / NEWEST).exists()


def test_negative_control_without_rng_and_position_restore_differs(killed, tmp_path):
    """The same kill/resume with the restore switched off must NOT match: the test above can fail."""
    workspace, reference, killed_output = killed
    output = copy_of(killed_output, tmp_path)
    result = run_trainer(trainer_args(workspace, output, resume="auto"),
                         env={"CLAMP3_LORA_TEST_NO_RNG_RESTORE": "1"})
    assert result.returncode == 0, explain(result)
    assert "NOT restored" in result.stdout
    assert max_difference(final_lora(output), final_lora(reference)) > 1e-4
    assert comparable_history(output) != comparable_history(reference)


def test_truncated_newest_checkpoint_is_refused_and_resume_falls_back(killed, tmp_path):
    workspace, reference, killed_output = killed
    output = copy_of(killed_output, tmp_path)
    newest = log_dir(output) / NEWEST
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    explicit = run_trainer(trainer_args(workspace, output, resume=newest))
    assert explicit.returncode == 1, explain(explicit)
    assert str(newest) in explicit.stderr and "truncated or corrupt" in explicit.stderr

    result = run_trainer(trainer_args(workspace, output, resume="auto"))
    assert result.returncode == 0, explain(result)
    assert f"⚠ skipping checkpoint {newest}" in result.stdout
    assert f"resumed from {log_dir(output) / 'ABC_checkpoint_epoch1.pth'}" in result.stdout
    assert max_difference(final_lora(output), final_lora(reference)) <= 1e-6
    assert comparable_history(output) == comparable_history(reference)


def test_checkpoint_contents(killed):
    """What SPEC §7 lists is in the periodic checkpoint the resume used."""
    _, _, output = killed
    state = checkpoint.load(log_dir(output) / NEWEST, stage="ABC")
    assert state["kind"] == "periodic"
    progress = state["progress"]
    assert (progress["epoch"], progress["batch"], progress["micro_step"]) == (1, 2, 6)
    assert progress["optimizer_steps"] == 6 and progress["samples_seen"] == 24
    assert progress["best_epoch"] == 1 and [e["epoch"] for e in progress["history"]] == [0, 1]
    assert state["sampler"]["position"] == 2 and state["sampler"]["epoch"] == 1 and state["sampler"]["seed"] == 1
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 6
    assert state["config"]["lora_r"] == 4 and state["identity"]["lora_r"] == 4
    assert len(state["lora"]) == 12


def test_the_text_pass_queued_ahead_changes_nothing(killed, tmp_path):
    """--no-text-ahead (each batch's text pass in its own step) ends exactly where the default
    (the next batch's text pass queued during the loss read) ends."""
    workspace, reference, _ = killed
    output = tmp_path / "output"
    result = run_trainer(trainer_args(workspace, output) + ["--no-text-ahead"])
    assert result.returncode == 0, explain(result)
    assert max_difference(adapter_weights(output), adapter_weights(reference)) == 0
    steps, expected = read_steps(output), read_steps(reference)
    assert [(s["step"], s["loss"], s["lr"]) for s in steps] == [(s["step"], s["loss"], s["lr"]) for s in expected]
