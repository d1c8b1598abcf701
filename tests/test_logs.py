"""Stage logs: the FEATURES.md epoch block, history JSON, steps JSONL, curves PNG, atomic writes."""
import json
import os
import re

import pytest

from clamp3_lora.logs import (StageLogger, atomic_write_json, atomic_write_text, draw_curves, epoch_block,
                              gpu_memory, smaller_batches)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def entry(epoch, train_loss, eval_loss, **extra):
    """An epoch entry as the trainer builds it."""
    base = {
        "epoch": epoch, "train_loss": train_loss, "eval_loss": eval_loss, "time": 123.4,
        "timestamp": "Sat Nov 30 12:34:56 2025",
        "gpu_memory": {"allocated_gb": 4.5234, "reserved_gb": 5.1203, "peak_gb": 6.0},
        "metrics": {"t2m_mrr": 0.5, "m2t_mrr": 0.25, "t2m_hit@1": 0.5, "t2m_hit@10": 1.0},
        "skipped": {"oom": 1, "nan": 2},
    }
    base.update(extra)
    return base


def test_epoch_block_has_the_features_md_lines_in_order():
    block = epoch_block(entry(5, 0.234567, 0.345678), total_epochs=10)
    lines = block.splitlines()
    assert lines[:7] == [
        "Epoch 5/10",
        "Train Loss: 0.234567",
        "Eval Loss: 0.345678",
        "Time: 123.4s",
        "Timestamp: Sat Nov 30 12:34:56 2025",
        "GPU Memory Allocated: 4.52 GB",
        "GPU Memory Reserved: 5.12 GB",
    ]
    assert "GPU Memory Peak: 6.00 GB" in lines
    assert "t2m_mrr: 0.5000" in lines
    assert "Skipped Batches: 3 (oom: 1, nan: 2)" in lines


def test_logger_writes_and_reloads_every_file(tmp_path):
    logger = StageLogger(tmp_path / "logs", "ABC")
    logger.write("STAGE 1/2: Training ABC Adapter")
    for step in range(6):
        logger.step({"step": step, "loss": 2.0 - 0.1 * step, "lr": 1e-4})
    logger.epoch(entry(1, 0.5432, 0.4321, samples_per_s=812.5, lr=1e-05, best_epoch=1), total_epochs=2)
    logger.epoch(entry(2, 0.4, float("nan")), total_epochs=2)

    text = (tmp_path / "logs" / "ABC_training.log").read_text(encoding="utf-8")
    assert text.startswith("STAGE 1/2: Training ABC Adapter\n")
    assert "Epoch 1/2\nTrain Loss: 0.543200\nEval Loss: 0.432100\n" in text
    assert "Epoch 2/2\n" in text and "Eval Loss: nan" in text
    assert "samples_per_s: 812.5" in text
    assert "lr: 1e-05" in text and "best_epoch: 1" in text

    history = json.loads((tmp_path / "logs" / "ABC_history.json").read_text(encoding="utf-8"))
    assert [h["epoch"] for h in history] == [1, 2]
    for key in ("epoch", "train_loss", "eval_loss", "time", "timestamp", "metrics"):
        assert key in history[0]
    assert history[0]["metrics"]["t2m_mrr"] == 0.5
    assert history == json.loads(json.dumps(logger.history))

    steps = [json.loads(line) for line in (tmp_path / "logs" / "ABC_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(6))

    png = (tmp_path / "logs" / "ABC_curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert len(png) > 5000
    assert not [p for p in (tmp_path / "logs").iterdir() if p.name.endswith(".tmp")]


def test_timestamp_filled_when_missing(tmp_path):
    logger = StageLogger(tmp_path, "MTF")
    logger.epoch({"epoch": 1, "train_loss": 1.0, "eval_loss": 1.0, "time": 1.0}, total_epochs=1)
    stamp = logger.history[0]["timestamp"]
    assert re.fullmatch(r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", stamp)
    assert (tmp_path / "MTF_curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_set_history_on_resume_then_continue(tmp_path):
    logger = StageLogger(tmp_path, "ABC")
    logger.epoch(entry(1, 1.0, 1.0), 3)
    logger.epoch(entry(2, 0.9, 0.9), 3)
    logger.epoch(entry(3, 0.8, 0.8), 3)

    resumed = StageLogger(tmp_path, "ABC")
    resumed.set_history(json.loads((tmp_path / "ABC_history.json").read_text())[:1])
    assert [h["epoch"] for h in json.loads((tmp_path / "ABC_history.json").read_text())] == [1]
    resumed.epoch(entry(2, 0.7, 0.7), 3)
    history = json.loads((tmp_path / "ABC_history.json").read_text())
    assert [(h["epoch"], h["train_loss"]) for h in history] == [(1, 1.0), (2, 0.7)]


def test_truncate_steps_after(tmp_path):
    logger = StageLogger(tmp_path, "ABC")
    for step in range(10):
        logger.step({"step": step, "loss": float(step)})
    with logger.steps_path.open("a") as handle:   # a line torn by a crash mid-write
        handle.write('{"step": 10, "lo')
    logger.truncate_steps_after(4)
    assert [r["step"] for r in logger.steps()] == [0, 1, 2, 3, 4]
    assert logger.steps_path.read_text().endswith("}\n")
    logger.step({"step": 5, "loss": 5.0})
    assert [r["step"] for r in logger.steps()] == [0, 1, 2, 3, 4, 5]
    logger.truncate_steps_after(-1)
    assert logger.steps() == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes_replace_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    atomic_write_json(target, {"a": [1, 2], "b": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2], "b": "é"}
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "history.json"
    atomic_write_json(target, [1])

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, [1, 2, 3])
    assert json.loads(target.read_text()) == [1]
    assert os.listdir(tmp_path) == ["history.json"]


def test_a_cpu_run_says_so_instead_of_zero_gpu_memory():
    assert gpu_memory("cpu") is None
    block = epoch_block({"epoch": 1, "train_loss": 0.5, "eval_loss": 0.4, "gpu_memory": None}, 3)
    assert "GPU Memory: none (a CPU run)" in block and "0.00 GB" not in block


def test_the_smaller_last_batch_of_an_epoch_is_marked_in_the_step_plot():
    """The per-step loss dips at each epoch's last, smaller batch (fewer negatives); those steps are
    the ones marked and explained in the plot's legend."""
    steps = [{"step": i, "loss": 2.0, "batch_size": 4} for i in range(3)] + [{"step": 3, "loss": 1.1, "batch_size": 2}]
    steps += [{"step": 4, "loss": 1.9, "batch_size": 4}, {"step": 5, "loss": None, "batch_size": 2}]
    assert smaller_batches(steps) == [(3, 1.1), (5, None)]
    assert smaller_batches([{"step": 0, "loss": 1.0}]) == []
    assert draw_curves("ABC", [], steps)[:8] == b"\x89PNG\r\n\x1a\n"
