"""Stop signals, with real processes: SIGINT and SIGTERM save a loadable emergency checkpoint, print
where it is and how to resume, exit 130 / 143; the resume continues at the right step."""
import shlex
import signal
import sys
import time

from clamp3_lora import checkpoint
from trainer_fixtures import (ROOT, comparable_history, explain, final_lora, log_dir, max_difference, read_steps,
                              reference_run, run_trainer, start_trainer, trainer_args, trainer_env)
import subprocess


def printed_resume_command(stdout):
    """The command line printed after "Resume with:"."""
    lines = stdout.splitlines()
    return lines[lines.index(next(line for line in lines if line.strip() == "Resume with:")) + 1].strip()


def test_sigint_saves_emergency_checkpoint_and_printed_command_resumes_exactly(tmp_path_factory, tmp_path):
    workspace, reference = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    # the process sends itself a real SIGINT before batch 2; it stops after that batch (a step boundary)
    result = run_trainer(trainer_args(workspace, output, fault_inject="sigint@2"))
    assert result.returncode == 130, explain(result)
    emergency = log_dir(output) / "ABC_emergency_checkpoint.pth"
    assert f"Emergency checkpoint: {emergency}" in result.stdout
    state = checkpoint.load(emergency, stage="ABC")
    assert state["kind"] == "emergency"
    assert (state["progress"]["epoch"], state["progress"]["batch"], state["progress"]["micro_step"]) == (0, 3, 3)

    command = printed_resume_command(result.stdout)
    assert command.startswith("python train_clamp3_lora.py ") and command.endswith("--resume auto")
    assert "--fault-inject" not in command
    args = shlex.split(command)
    resumed = subprocess.run([sys.executable] + args[1:], cwd=ROOT, env=trainer_env(), capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {emergency}: epoch 1, batch 3/4" in resumed.stdout
    assert [s["step"] for s in read_steps(output)] == list(range(8))
    assert max_difference(final_lora(output), final_lora(reference)) <= 1e-6
    assert comparable_history(output) == comparable_history(reference)
    assert not emergency.exists()  # superseded by the later checkpoints


def test_sigterm_from_outside_stops_at_a_step_and_resume_continues_there(tmp_path_factory, tmp_path):
    workspace, _ = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    args = trainer_args(workspace, output, epochs=50)  # long enough to be stopped from outside
    process = start_trainer(args)
    steps_file = log_dir(output) / "ABC_steps.jsonl"
    deadline = time.time() + 120
    while not (steps_file.exists() and steps_file.read_text().strip()):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the trainer logged no step in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, f"{process.returncode}\n{stdout}\n{stderr}"
    assert "SIGTERM received" in stdout and "Resume with:" in stdout

    emergency = log_dir(output) / "ABC_emergency_checkpoint.pth"
    state = checkpoint.load(emergency, stage="ABC")
    stopped_at = state["progress"]["micro_step"]
    assert stopped_at >= 1
    assert [s["step"] for s in read_steps(output)] == list(range(stopped_at))

    # resume, and let the process die right after it has trained one more batch
    result = run_trainer(args + ["--resume", "auto", "--fault-inject", f"sigkill@{stopped_at + 1}"])
    assert result.returncode == -signal.SIGKILL, explain(result)
    assert f"resumed from {emergency}" in result.stdout
    assert [s["step"] for s in read_steps(output)] == list(range(stopped_at + 1))


def test_a_signal_during_imports_is_one_line_and_no_traceback():
    """Ctrl+C while the trainer is still importing (torch takes seconds): one line, exit 130."""
    process = subprocess.Popen([sys.executable, "train_clamp3_lora.py", "--demo", "--device", "cpu"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert "SIGINT during start-up: stopped; nothing was trained yet." in err and "Traceback" not in err


def test_a_signal_during_the_stage_set_up_stops_before_the_first_step(tmp_path, monkeypatch, capsys):
    """SIGTERM while the stage is being set up (here: while the model loads): the stage stops
    before its first step, exit 143, no checkpoint written, no traceback."""
    import os

    from clamp3_lora import train
    from clamp3_lora.cli import parse_config
    from trainer_fixtures import make_workspace, trainer_args
    load = train.StageRun.set_up_model

    def interrupted(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(self)
    monkeypatch.setattr(train.StageRun, "set_up_model", interrupted)
    output = tmp_path / "output"
    cfg = parse_config(trainer_args(make_workspace(tmp_path), output))
    assert train.main(cfg, argv=[]) == 143
    printed = capsys.readouterr().out
    assert "SIGTERM during the start-up of the ABC stage: stopped before its first step" in printed
    assert not list(log_dir(output).glob("*.pth"))
