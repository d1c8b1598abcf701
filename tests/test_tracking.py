"""--report-to tensorboard: every logged scalar in event files read back with TensorBoard's own
reader, the same numbers as the step log and the history; a resumed run continues the curves with
no point twice; a backend that is not installed is an error before any training."""
import importlib.util

import pytest

from clamp3_lora import tracking
from clamp3_lora.errors import Clamp3LoraError
from trainer_fixtures import explain, log_dir, make_workspace, read_history, read_steps, run_trainer, trainer_args

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder, tag):
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_step_and_epoch_scalars_reach_tensorboard_and_a_resume_adds_no_duplicate(tmp_path):
    workspace = make_workspace(tmp_path / "ws")
    output = tmp_path / "out"
    stopped = run_trainer(trainer_args(workspace, output, report_to="tensorboard", fault_inject="sigterm@6"))
    assert stopped.returncode == 143, explain(stopped)
    resumed = run_trainer(trainer_args(workspace, output, report_to="tensorboard", resume="auto"))
    assert resumed.returncode == 0, explain(resumed)
    board = log_dir(output) / "tensorboard"

    losses = scalars(board / "ABC_steps", "loss")
    assert [step for step, _ in losses] == list(range(8))          # 2 epochs x 4 batches, each once
    logged = {record["step"]: record["loss"] for record in read_steps(output)}
    assert all(abs(value - logged[step]) < 1e-6 for step, value in losses)
    assert [step for step, _ in scalars(board / "ABC_steps", "lr")] == list(range(8))

    history = read_history(output)
    mrr = scalars(board / "ABC_epochs", "metrics/t2m_mrr")
    assert [step for step, _ in mrr] == [0, 1, 2]                   # epoch 0 is the base model
    assert all(abs(value - history[step]["metrics"]["t2m_mrr"]) < 1e-6 for step, value in mrr)
    assert [step for step, _ in scalars(board / "ABC_epochs", "chance/t2m_mrr")] == [0, 1, 2]
    assert [step for step, _ in scalars(board / "ABC_epochs", "eval_loss")] == [0, 1, 2]


def test_a_backend_that_is_missing_or_unknown_stops_before_training(tmp_path, monkeypatch):
    assert tracking.check(["none"]) == []
    with pytest.raises(Clamp3LoraError, match="--report-to 'mlflow': use none, tensorboard or wandb"):
        tracking.check(["mlflow"])
    if importlib.util.find_spec("wandb") is None:
        workspace = make_workspace(tmp_path / "ws", abc_train=4, abc_eval=2)
        result = run_trainer(trainer_args(workspace, tmp_path / "out", report_to="wandb"))
        assert result.returncode == 1, explain(result)
        assert "--report-to wandb needs the wandb package, which is not installed: pip install wandb" in result.stderr
        assert not (tmp_path / "out").exists()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(Clamp3LoraError, match="needs the tensorboard package"):
        tracking.check(["tensorboard"])


def test_scalars_flatten_the_log_records():
    entry = {"epoch": 2, "train_loss": 0.5, "metrics": {"t2m_mrr": 0.3}, "skipped": {"oom": 1}, "note": "x",
             "eval_loss": float("nan"), "base_model": True}
    assert tracking.scalars(entry) == {"epoch": 2.0, "train_loss": 0.5, "metrics/t2m_mrr": 0.3, "skipped/oom": 1.0}


def test_wandb_offline_needs_no_account_and_a_resume_continues_the_same_run(tmp_path):
    """W&B in offline mode (no account, no network): a run per stage, and the resumed job logs into
    the run of the same id (its id kept in the logs folder). Runs where wandb is installed."""
    pytest.importorskip("wandb")
    workspace = make_workspace(tmp_path / "ws")
    output = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    stopped = run_trainer(trainer_args(workspace, output, report_to="wandb", fault_inject="sigterm@6"), env=env)
    assert stopped.returncode == 143, explain(stopped)
    resumed = run_trainer(trainer_args(workspace, output, report_to="wandb", resume="auto"), env=env)
    assert resumed.returncode == 0, explain(resumed)
    run_id = (log_dir(output) / "ABC_wandb_id.txt").read_text().strip()
    runs = sorted((log_dir(output) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs), runs
    assert all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)
