"""DDP with real processes on the CPU (gloo): the training step of two processes equals one process
on the concatenated batch (loss and LoRA gradients), evaluation under two processes equals one
process, a two-process checkpoint resumes under two processes, and under one or two processes
whatever wrote it when the global batch stays the same (refused when it would change), and a lost
or stuck rank ends the job with a message instead of a hang."""
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from clamp3_lora import checkpoint, distributed, train
from clamp3_lora.data import make_batch_loader
from clamp3_lora.cli import parse_config
from clamp3_lora.data import MusicTextDataset, scan_data_file
from clamp3_lora.distributed import Dist
from clamp3_lora.errors import DistributedError
from clamp3_lora.step import forward_loss, unwrap
from config import TrainConfig
from dist_fixtures import free_port, join_group, run_processes, tiny_training_model, training_batch
from trainer_fixtures import (ROOT, adapter_weights, comparable_history, explain, final_lora, log_dir, make_workspace,
                              max_difference, read_steps, run_torchrun, run_trainer, session_survivors, start_torchrun,
                              stop_session, torchrun_workers, trainer_args, trainer_env)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tokenizer and data files (16 ABC training records, 7 validation records: an odd number)."""
    return make_workspace(tmp_path_factory.mktemp("ddp"), abc_train=16, abc_eval=7)


# --------------------------------------------------------------------------------------------
# Test 1: the step of two processes == one process on the concatenated batch


def step_gradients(model, batch, gather):
    """(loss, {LoRA parameter name: gradient}) of one training step of `model` (DDP or not) through
    the trainer's step function; the gradients are what the optimizer would see (DDP-averaged)."""
    inner = unwrap(model)
    for param in inner.trainable_parameters():
        param.grad = None
    loss, _, _ = forward_loss(model, batch, gather=gather)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in inner.named_parameters() if p.requires_grad}


def step_worker(rank, world_size, port, tokenizer, records, sizes, results):
    join_group(rank, world_size, port)
    try:
        model = tiny_training_model(tokenizer)
        ddp = train.wrap_ddp(model, CPU)
        start = sum(sizes[:rank])
        batch = training_batch(model, records, range(start, start + sizes[rank]))
        results[rank] = {"global": step_gradients(ddp, batch, distributed.gather_with_grad),
                         "local": step_gradients(ddp, batch, None),
                         "find_unused_parameters": ddp.find_unused_parameters}
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_step_loss_and_lora_gradients_equal_one_process_on_the_concatenated_batch(workspace):
    records = scan_data_file(workspace["abc_train"]).records
    sizes = [3, 2]  # uneven, like the last batch of an epoch
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        run_processes(step_worker, (2, free_port(), workspace["tokenizer"], records, sizes, results))
        results = dict(results)

    model = tiny_training_model(workspace["tokenizer"])
    loss, grads = step_gradients(model, training_batch(model, records, range(sum(sizes))), None)
    assert len(grads) == 12 and max(g.abs().max().item() for g in grads.values()) > 1e-3  # not vacuous
    for rank in range(2):
        got_loss, got_grads = results[rank]["global"]
        assert got_loss == pytest.approx(loss, abs=1e-5)  # the logged loss is the global one
        assert max_difference(got_grads, grads) <= 1e-5
        assert results[rank]["find_unused_parameters"] is False
        # control: without the gather each rank's loss sees only its own negatives; the test can tell
        local_loss, local_grads = results[rank]["local"]
        assert abs(local_loss - loss) > 1e-3 and max_difference(local_grads, grads) > 1e-3


# --------------------------------------------------------------------------------------------
# Evaluation: two processes == one process on the whole validation set


def evaluation(tokenizer, records, count, batch_size, rank, world_size):
    """(eval loss, metrics, gathered record indices) of the trainer's evaluation of records[:count]."""
    model = tiny_training_model(tokenizer)
    cfg = TrainConfig(batch_size=batch_size, precision="fp32", num_workers=0, device="cpu", seed=1)
    where = Dist(rank=rank, world_size=world_size, local_rank=rank, device=CPU)
    dataset = MusicTextDataset(records[:count], model.tokenizer, train=False, max_patches=24, max_text_tokens=24)
    sampler = train.make_sampler(dataset, cfg, where, shuffle=False, what="validation")
    loader = make_batch_loader(dataset, sampler, cfg.num_workers, CPU)
    loss, metrics = train.evaluate_split(model, loader, sampler, cfg, where, SimpleNamespace(received=None), "eval")
    indices = torch.cat([distributed.gather(batch["index"]) for batch in loader]).tolist()
    return loss, metrics, indices


def evaluation_worker(rank, world_size, port, tokenizer, records, counts, results):
    join_group(rank, world_size, port)
    try:
        results[rank] = {count: evaluation(tokenizer, records, count, 2, rank, world_size) for count in counts}
    finally:
        torch.distributed.destroy_process_group()


def test_evaluation_in_two_processes_equals_one_process_on_the_whole_validation_set(workspace):
    """Validation sets of 7 and 5 records, batch 2 per rank. 7: global batches of 4 and 3 records
    (ranks 2+2, 2+1), as one process with batch 4. 5: the one record left after the first global
    batch of 4 joins it (ranks 3+2: no rank is empty, none repeats a record), as one process with
    batch 5. The eval loss is the CLIP loss of each global batch, so it is compared with the process
    that has the same global batches; the retrieval metrics rank every pair against the whole set
    and do not depend on the batching at all."""
    records = scan_data_file(workspace["abc_eval"]).records
    single_batch = {7: 4, 5: 5}
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        run_processes(evaluation_worker, (2, free_port(), workspace["tokenizer"], records, tuple(single_batch),
                                          results))
        results = dict(results)
    for count, batch_size in single_batch.items():
        loss, metrics, indices = evaluation(workspace["tokenizer"], records, count, batch_size, 0, 1)
        assert indices == list(range(count))
        for rank in range(2):
            got_loss, got_metrics, got_indices = results[rank][count]
            assert got_indices == list(range(count))  # every record once, in order: no duplicates
            assert got_loss == pytest.approx(loss, abs=1e-6)
            assert got_metrics.keys() == metrics.keys()
            for name, value in metrics.items():
                assert got_metrics[name] == pytest.approx(value, abs=1e-9), name
        _, other_batching, _ = evaluation(workspace["tokenizer"], records, count, 3, 0, 1)
        assert other_batching == pytest.approx(metrics, abs=1e-9)


# --------------------------------------------------------------------------------------------
# A lost or stuck rank: collectives time out with a message


def timeout_worker(rank, world_size, port, results, release):
    # the variables torchrun sets (this forked child's own environment), then the trainer's setup
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    where = distributed.setup("cpu", timeout_s=2)
    try:
        if rank == 1:
            release.wait(30)  # stuck: never joins the collective below
            return
        started = time.monotonic()
        try:
            distributed.all_reduce_flag(True)
            results[rank] = ("no error", time.monotonic() - started)
        except DistributedError as error:
            results[rank] = (str(error), time.monotonic() - started)
        release.set()
        assert where.world_size == 2
    finally:
        distributed.teardown()


def test_a_collective_with_a_stuck_rank_times_out_with_a_clear_error():
    with torch.multiprocessing.Manager() as manager:
        results, release = manager.dict(), manager.Event()
        run_processes(timeout_worker, (2, free_port(), results, release))
        message, seconds = results[0]
    assert "another process stopped" in message and "--dist-timeout-s" in message, message
    assert 1.5 <= seconds < 15


# --------------------------------------------------------------------------------------------
# Test 4, second half: the 2-process checkpoint resumes under 2 processes, and only there


@pytest.fixture(scope="module")
def two_process_runs(workspace, tmp_path_factory):
    """(uninterrupted 2-process output, output of the same run killed after a periodic checkpoint).
    With dropout (the default), so each rank's own RNG state must come back on resume."""
    root = tmp_path_factory.mktemp("two_process")
    full = run_torchrun(trainer_args(workspace, root / "full", batch_size=2, dist_timeout_s=60))
    assert full.returncode == 0, explain(full)
    # 16 records, 2 x 2 per step: 4 steps per epoch, a periodic checkpoint after step 2 (micro-step
    # 6 of the stage); every rank kills itself before micro-step 7
    killed = run_torchrun(trainer_args(workspace, root / "killed", batch_size=2, dist_timeout_s=60,
                                       fault_inject="sigkill@7"))
    assert killed.returncode != 0, explain(killed)
    names = {p.name for p in log_dir(root / "killed").iterdir()}
    assert "ABC_checkpoint_epoch2_step2.pth" in names and "ABC_checkpoint_epoch2.pth" not in names, names
    return root / "full", root / "killed"


def test_two_process_checkpoint_resumes_under_two_processes(workspace, two_process_runs, tmp_path):
    full, killed = two_process_runs
    output = tmp_path / "output"
    shutil.copytree(killed, output)
    state = checkpoint.load(log_dir(output) / "ABC_checkpoint_epoch2_step2.pth", stage="ABC")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and all(state["rng"])
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # one stream per rank
    resumed = run_torchrun(trainer_args(workspace, output, batch_size=2, dist_timeout_s=60, resume="auto"))
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {log_dir(output) / 'ABC_checkpoint_epoch2_step2.pth'}" in resumed.stdout
    assert max_difference(final_lora(output), final_lora(full)) <= 1e-6
    assert max_difference(adapter_weights(output), adapter_weights(full)) <= 1e-6
    assert comparable_history(output) == comparable_history(full)
    assert [(s["step"], s["loss"]) for s in read_steps(output)] == [(s["step"], s["loss"]) for s in read_steps(full)]


def test_resuming_with_another_global_batch_is_refused(workspace, two_process_runs, tmp_path, capsys):
    """2 processes x batch 2 wrote the checkpoint; 1 process x batch 2 would halve the global batch:
    refused, with the batch size that keeps it and the command that continues as it was."""
    _, killed = two_process_runs
    output = tmp_path / "output"
    shutil.copytree(killed, output)
    newest = log_dir(output) / "ABC_checkpoint_epoch2_step2.pth"
    for resume in ("auto", str(newest)):
        argv = trainer_args(workspace, output, batch_size=2, resume=resume)
        assert train.main(parse_config(argv), argv) == train.EXIT_ERROR  # 1 process, here
        stderr = capsys.readouterr().err
        assert f"checkpoint {newest} cannot continue here: the global batch differs" in stderr
        assert "2 process(es) x batch size 2 = 4; this run has 1 x 2 = 2" in stderr
        assert "with --batch-size 4 (the same global batch" in stderr
        assert "torchrun --nproc_per_node=2 train_clamp3_lora.py" in stderr and "--resume fresh" in stderr
    assert {p.name for p in log_dir(output).iterdir()} == {p.name for p in log_dir(killed).iterdir()}


# --------------------------------------------------------------------------------------------
# Resume on another number of processes (elastic): the same global batch, the same training


NO_DROPOUT = dict(lora_dropout=0, encoder_dropout=0, dist_timeout_s=60)


@pytest.fixture(scope="module")
def one_process_reference(workspace, tmp_path_factory):
    """An uninterrupted run of 1 process x batch 4, dropout 0 (fp32 on the CPU)."""
    output = tmp_path_factory.mktemp("elastic") / "reference"
    result = run_trainer(trainer_args(workspace, output, batch_size=4, **NO_DROPOUT))
    assert result.returncode == 0, explain(result)
    return output


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)], ids=["2_to_1", "1_to_2"])
def test_a_run_continues_on_another_number_of_processes(workspace, one_process_reference, tmp_path, before, after):
    """Killed after a periodic checkpoint on `before` processes, resumed with --resume auto on `after`
    with the same global batch (batch 4 / processes): the final adapter equals the uninterrupted
    run's within 1e-5, and no step is in the step log twice."""
    output = tmp_path / "output"

    def run(processes, **flags):
        args = trainer_args(workspace, output, batch_size=4 // processes, **NO_DROPOUT, **flags)
        return run_torchrun(args, nproc=2) if processes == 2 else run_trainer(args)

    killed = run(before, fault_inject="sigkill@7")
    assert killed.returncode != 0, explain(killed)
    assert (log_dir(output) / "ABC_checkpoint_epoch2_step2.pth").exists()
    resumed = run(after, resume="auto")
    assert resumed.returncode == 0, explain(resumed)
    assert f"was written by {before} process(es); this run has {after}, with the same global batch" in resumed.stdout
    assert max_difference(final_lora(output), final_lora(one_process_reference)) <= 1e-5
    assert max_difference(adapter_weights(output), adapter_weights(one_process_reference)) <= 1e-5
    steps = [s["step"] for s in read_steps(output)]
    assert steps == sorted(set(steps)) == [s["step"] for s in read_steps(one_process_reference)]


def test_another_global_batch_continues_at_the_same_sample_with_the_flag(workspace, tmp_path):
    """2 processes x batch 2 (global 4) killed in epoch 2 after a periodic checkpoint; resumed on 1
    process x batch 2 (global 2) with --new-global-batch: the run says what changes, finishes, and
    each epoch trains every record exactly once (no sample skipped or repeated at the switch)."""
    output = tmp_path / "output"
    killed = run_torchrun(trainer_args(workspace, output, batch_size=2, fault_inject="sigkill@7", **NO_DROPOUT))
    assert killed.returncode != 0, explain(killed)
    resumed = run_trainer(trainer_args(workspace, output, batch_size=2, resume="auto", new_global_batch=None,
                                       **NO_DROPOUT) + ["--new-global-batch"])
    assert resumed.returncode == 0, explain(resumed)
    assert ("--new-global-batch: the checkpoint's global batch was 4, this run's is 2: epoch 2 continues at its "
            "sample 8 of 16") in resumed.stdout
    steps = read_steps(output)
    for epoch in (1, 2):
        assert sum(s["batch_size"] for s in steps if s["epoch"] == epoch) == 16, epoch
    assert [s["batch_size"] for s in steps if s["epoch"] == 2] == [4, 4, 2, 2, 2, 2]
    assert [s["step"] for s in steps] == list(range(len(steps)))


def test_torchrun_restarts_after_a_worker_is_killed_and_the_job_finishes(workspace, one_process_reference,
                                                                          tmp_path):
    """`torchrun --max-restarts=2` with the same command line: rank 1 killed before batch 3 (first
    attempt), rank 0 before batch 6 (first restart). Each restart resumes by itself from the newest
    checkpoint; the job exits 0, no step is logged twice, the adapter equals the uninterrupted run's."""
    output = tmp_path / "output"
    args = trainer_args(workspace, output, batch_size=2, fault_inject="sigkill@3:1/0,sigkill@6:0/1", **NO_DROPOUT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts=2",
               "--nproc_per_node=2", "train_clamp3_lora.py", *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, explain(result)
    assert "torchrun restarted this job (restart 1)" in result.stdout
    assert "torchrun restarted this job (restart 2)" in result.stdout
    assert max_difference(final_lora(output), final_lora(one_process_reference)) <= 1e-5
    assert max_difference(adapter_weights(output), adapter_weights(one_process_reference)) <= 1e-5
    steps = [s["step"] for s in read_steps(output)]
    assert steps == sorted(set(steps)) == [s["step"] for s in read_steps(one_process_reference)]


# --------------------------------------------------------------------------------------------
# A rank that stops answering, and an OOM in the backward pass on one rank: the job ends


def test_a_stuck_rank_ends_the_job_with_a_message_after_the_timeout(workspace, tmp_path):
    """Rank 1 stops answering before batch 2 (and stays stuck until torchrun stops it): rank 0's next
    collective times out after --dist-timeout-s, rank 0 says why, writes the emergency checkpoint and
    exits; torchrun then stops rank 1. (The timeout leaves room for the ranks' start-up skew.)"""
    output = tmp_path / "output"
    launcher = start_torchrun(trainer_args(workspace, output, batch_size=2, dist_timeout_s=12, fault_inject="hang@2:1"))
    workers = torchrun_workers(launcher)
    try:
        assert len(workers) == 2
        stdout, stderr = launcher.communicate(timeout=90)  # the timeout, not the hang, ends the job
    finally:
        survivors = session_survivors(launcher, workers)
        stop_session(launcher, workers)
    assert launcher.returncode != 0
    assert "[rank 0] ✗ the all-reduce" in stderr and "did not answer within the collective timeout" in stderr, (
        stdout + stderr)
    assert "Timed out" in stderr  # gloo's own words: the timeout ended it, not a crash
    assert "emergency checkpoint (DistributedError) saved" in stdout
    state = checkpoint.load(checkpoint.emergency_path(log_dir(output), "ABC"), stage="ABC")
    assert state["progress"]["micro_step"] == 2  # the last step boundary before the stuck batch
    assert survivors == []


def test_an_oom_in_the_backward_pass_on_one_rank_stops_the_job_with_a_message(workspace, tmp_path):
    """Rank 1 runs out of memory in its backward pass while rank 0 is in the gradient all-reduce: rank
    1 stops with its message, rank 0 sees a lost process and writes the emergency checkpoint."""
    output = tmp_path / "output"
    result = run_torchrun(trainer_args(workspace, output, batch_size=2, dist_timeout_s=60,
                                       fault_inject="oomback@1:1"), timeout=120)
    assert result.returncode != 0
    assert "[rank 1] ✗ out of memory in the backward pass of batch 1 of epoch 1 (step 1) on rank 1" in result.stderr, (
        explain(result))
    assert "Lower --batch-size or --max-patches" in result.stderr
    assert "[rank 0] ✗ the all-reduce of the feature gradients across the 2 processes failed" in result.stderr
    state = checkpoint.load(checkpoint.emergency_path(log_dir(output), "ABC"), stage="ABC")
    assert state["progress"]["micro_step"] == 1
