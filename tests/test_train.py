"""The trainer end to end, with real processes on the CPU and the tiny model: no silent CPU
fallback, injected OOM/NaN guards, the bad-steps limit, checkpoint rotation with the best adapter
kept, skipping a finished stage, and refusing to overwrite an earlier run."""
import json
import re
import shutil

import pytest
import torch

from clamp3_lora import checkpoint
from trainer_fixtures import (adapter_weights, explain, final_lora, log_dir, make_workspace, max_difference,
                              read_history, read_steps, reference_run, run_trainer, trainer_args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_default_device_without_gpu_is_a_clear_error(tmp_path_factory, tmp_path):
    workspace, _ = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    result = run_trainer(trainer_args(workspace, output, device=None))
    assert result.returncode == 1, explain(result)
    assert "CUDA is not available" in result.stderr and "--device cpu" in result.stderr
    assert not output.exists()  # nothing was trained, on the CPU or elsewhere


def test_injected_oom_and_nan_skip_exactly_those_batches(tmp_path_factory, tmp_path):
    workspace, _ = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    result = run_trainer(trainer_args(workspace, output, fault_inject="oom@1,nan@3,nangrad@5"))
    assert result.returncode == 0, explain(result)
    skipped = {s["step"]: s["skipped"] for s in read_steps(output)}
    assert skipped == {0: None, 1: "oom", 2: None, 3: "nonfinite_loss", 4: None, 5: "nonfinite_grad",
                       6: None, 7: None}
    history = read_history(output)
    assert history[0]["epoch"] == 0 and history[0]["skipped"] == {}      # the base model, before training
    assert history[1]["skipped"] == {"no_samples": 0, "oom": 1, "nonfinite_loss": 1, "nonfinite_grad": 0}
    assert history[2]["skipped"] == {"no_samples": 0, "oom": 0, "nonfinite_loss": 0, "nonfinite_grad": 1}
    assert history[2]["optimizer_steps"] == 5  # 8 batches, 3 of them without an update
    log = (log_dir(output) / "ABC_training.log").read_text()
    assert "Skipped Batches: 2 (oom: 1, nonfinite_loss: 1" in log
    assert "Skipped Batches: 1 (" in log
    assert "skipped: oom" in result.stdout and "skipped: nonfinite_loss" in result.stdout


def test_too_many_bad_steps_in_a_row_stop_with_an_emergency_checkpoint(tmp_path_factory, tmp_path):
    workspace, _ = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    result = run_trainer(trainer_args(workspace, output, fault_inject="nan@1,oom@2,nan@3",
                                      max_bad_steps_in_row=3))
    assert result.returncode == 3, explain(result)
    assert "3 batches in a row were skipped" in result.stdout
    emergency = log_dir(output) / "ABC_emergency_checkpoint.pth"
    assert f"Emergency checkpoint: {emergency}" in result.stdout
    state = checkpoint.load(emergency, stage="ABC")
    assert state["progress"]["micro_step"] == 4
    assert state["progress"]["skipped"] == {"no_samples": 0, "oom": 1, "nonfinite_loss": 2, "nonfinite_grad": 0}


def test_unexpected_error_saves_an_emergency_checkpoint_and_is_raised(tmp_path_factory, tmp_path):
    """With gradient accumulation over 2 batches, an error before batch 5 (inside the window 4-5)
    leaves an emergency checkpoint at the last optimizer-step boundary (4 batches done), the
    traceback, exit 1; the resume continues from batch 4 to the end."""
    workspace, _ = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    result = run_trainer(trainer_args(workspace, output, grad_accum=2, fault_inject="error@5"))
    assert result.returncode == 1, explain(result)
    assert "Traceback" in result.stderr and "RuntimeError: unexpected failure" in result.stderr
    emergency = log_dir(output) / "ABC_emergency_checkpoint.pth"
    state = checkpoint.load(emergency, stage="ABC")
    assert (state["progress"]["micro_step"], state["progress"]["optimizer_steps"]) == (4, 2)
    resumed = run_trainer(trainer_args(workspace, output, grad_accum=2, resume="auto"))
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {emergency}: epoch 2, batch 0/4" in resumed.stdout
    assert [s["step"] for s in read_steps(output)] == list(range(8))
    assert read_history(output)[2]["optimizer_steps"] == 4


def test_rotation_keeps_three_epoch_checkpoints_and_the_best_adapter(tmp_path):
    """5 epochs, best epoch 1: with fewer than 10 validation pairs Hit@10 is always 1, so no later
    epoch beats the first. Constant lr without warm-up makes a 1-epoch run end with the very weights
    of the 5-epoch run's first epoch, which the kept adapter must hold. (The training data also has
    one bad record, which must be reported by file:line and skipped.)"""
    workspace = make_workspace(tmp_path / "data", abc_train=8, abc_eval=6)
    with open(workspace["abc_train"], "a") as data:
        data.write("{not json\n")
    settings = dict(best_metric="t2m_hit@10", schedule="constant", warmup_steps=0, epochs=5,
                    keep_epoch_checkpoints=3, bad_record_limit=0.2)
    long_run, one_epoch = tmp_path / "five", tmp_path / "one"
    result = run_trainer(trainer_args(workspace, long_run, **settings))
    assert result.returncode == 0, explain(result)
    assert f"{workspace['abc_train']}:9: invalid_json" in result.stdout.split("ABC stage finished")[1]
    names = sorted(p.name for p in log_dir(long_run).glob("*.pth"))
    assert names == ["ABC_checkpoint_epoch3.pth", "ABC_checkpoint_epoch4.pth", "ABC_checkpoint_epoch5.pth"]
    record = json.loads((long_run / "adapters" / "lora_abc_adapter" / "training_record.json").read_text())
    assert record["epoch"] == 1

    result = run_trainer(trainer_args(workspace, one_epoch, **dict(settings, epochs=1)))
    assert result.returncode == 0, explain(result)
    assert max_difference(adapter_weights(long_run), final_lora(one_epoch, epoch=1)) <= 1e-6
    assert max_difference(adapter_weights(long_run), final_lora(long_run, epoch=5)) > 1e-4


def test_resume_auto_skips_a_finished_abc_stage(tmp_path_factory, tmp_path):
    workspace, reference = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    shutil.copytree(reference, output)
    before = (log_dir(output) / "ABC_history.json").read_bytes()
    result = run_trainer(trainer_args(workspace, output, stages="abc,mtf", resume="auto"))
    assert result.returncode == 0, explain(result)
    assert "ABC stage already finished" in result.stdout
    assert "STAGE 2/2: Training MTF Adapter" in result.stdout
    assert "Training ABC Adapter" not in result.stdout and "[ABC] Epoch" not in result.stderr
    assert (log_dir(output) / "ABC_history.json").read_bytes() == before
    assert result.stdout.count("6 LoRA modules") == 1  # only the MTF model, one adapter deep
    assert sorted(adapter_weights(output, "lora_mtf_adapter")) == sorted(adapter_weights(output))
    assert (log_dir(output) / "MTF_finished.json").exists()


def test_a_new_run_refuses_to_overwrite_an_earlier_one(tmp_path_factory, tmp_path):
    workspace, reference = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    shutil.copytree(reference, output)
    result = run_trainer(trainer_args(workspace, output))
    assert result.returncode == 1, explain(result)
    assert "--resume auto" in result.stderr and "--resume fresh" in result.stderr
    assert len(list(log_dir(output).glob("ABC_checkpoint_epoch*.pth"))) == 2


def test_a_progress_snapshot_does_not_move_with_the_stage():
    """The boundary snapshot (Progress.copy, taken at every optimizer step) keeps the values of its
    moment while the stage goes on: counters, skip counts, and the history list."""
    from dataclasses import asdict

    from clamp3_lora.train import Progress
    progress = Progress(batch=3, history=[{"epoch": 1, "eval_loss": 2.0}])
    progress.skipped["oom"] = 1
    snapshot = progress.copy()
    before = asdict(snapshot)
    assert before == asdict(progress)
    progress.batch += 1
    progress.skipped["oom"] += 1
    progress.epoch_skipped["nonfinite_loss"] += 1
    progress.history.append({"epoch": 2, "eval_loss": 1.5})
    progress.next_epoch()
    assert asdict(snapshot) == before


def test_the_next_start_removes_the_temporary_files_of_an_interrupted_save(tmp_path):
    """A kill during a checkpoint save leaves `.ABC_checkpoint_....pth.XXXX.tmp` in the logs folder:
    the next start removes it (only the stage's own pattern there) and says so."""
    workspace = make_workspace(tmp_path)
    output = tmp_path / "output"
    log_dir(output).mkdir(parents=True)
    leftover = log_dir(output) / ".ABC_checkpoint_epoch1_step1.pth.k2j4x9.tmp"
    other = log_dir(output) / "notes.tmp"
    leftover.write_bytes(b"half a checkpoint")
    other.write_bytes(b"not ours")
    result = run_trainer(trainer_args(workspace, output, epochs=1, checkpoints_per_epoch=0))
    assert result.returncode == 0, explain(result)
    assert not leftover.exists() and other.exists()
    assert f"removed 1 temporary file(s) of an interrupted save in {log_dir(output)}: {leftover.name}" in result.stdout


def test_every_bad_record_is_in_the_training_log_and_the_terminal_says_where(tmp_path):
    workspace = make_workspace(tmp_path)
    data = workspace["abc_train"]
    good = data.read_text().splitlines()
    bad = ["{not json", "[1, 2]", '{"filepaths": []}', '{"filepaths": ["missing.abc"], "analysis": "x"}',
           '{"filepaths": ["abc_train_files/0.abc"]}', "{also not json", '"a string"', '{"location": "gone.mtf", "caption": "y"}',
           '{"filepaths": ["abc_train_files/0.abc"], "analysis": "lone \\ud800"}', "[" * 100_000 + "]" * 100_000]
    data.write_text("\n".join(good + bad) + "\n")
    output = tmp_path / "output"
    result = run_trainer(trainer_args(workspace, output, epochs=1, checkpoints_per_epoch=0, bad_record_limit=0.5))
    assert result.returncode == 0, explain(result)
    log = (log_dir(output) / "ABC_training.log").read_text()
    for number in range(len(good) + 1, len(good) + len(bad) + 1):
        assert f"{data}:{number}: " in log, number
    assert "... and 5 more" in result.stdout and "Traceback" not in result.stderr
    assert f"(all 10 bad records of {data}: {log_dir(output) / 'ABC_training.log'})" in result.stdout


def test_the_text_log_has_a_progress_line_at_each_periodic_checkpoint(tmp_path_factory):
    """`tail -f ABC_training.log` shows the run moving between epoch blocks: one line per periodic
    checkpoint (2 per epoch here) with the step, loss, lr, rate and the time left."""
    _, output = reference_run(tmp_path_factory)
    lines = [line for line in (log_dir(output) / "ABC_training.log").read_text().splitlines()
             if line.startswith("[ABC] ") and " optimizer steps): loss " in line]
    assert len(lines) == 2  # 4 steps per epoch: periodic after step 2 of each epoch (the 4th is the epoch's)
    assert re.fullmatch(r"\[ABC\] \d\d:\d\d:\d\d epoch 1/2 step 2/4 \(2/8 optimizer steps\): loss \d\.\d{6}, "
                        r"lr \S+, [\d.]+ samples/s, epoch time [\d.]+ min, about [\d.]+ min of training left",
                        lines[0]), lines[0]
    assert "epoch 2/2 step 2/4 (6/8 optimizer steps)" in lines[1]
