"""distributed.py: the resumable sharded sampler (simulated ranks), and the gather with gradient
in 2 real gloo processes compared with 1 process on the concatenated batch; the trainer under
torchrun with 2 processes equals 1 process (with faults on one rank), and SIGTERM to the launcher.
More DDP tests (the real training step, evaluation, resume, lost ranks): test_ddp.py."""
import signal
import time

import pytest
import torch

from clamp3_lora import checkpoint, distributed
from clamp3_lora.distributed import ResumableSampler
from clamp3_lora.model import clip_loss
from dist_fixtures import free_port, join_group, run_processes
from trainer_fixtures import (explain, final_lora, log_dir, max_difference, read_history, read_steps,
                              reference_run, run_torchrun, run_trainer, session_survivors, start_torchrun,
                              stop_session, torchrun_workers, trainer_args)


def epoch_batches(n, batch_size, world_size, epoch, seed=3, shuffle=True):
    """[rank][batch] -> list of keys, for every simulated rank."""
    ranks = []
    for rank in range(world_size):
        sampler = ResumableSampler(n, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                                   batch_size=batch_size)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    return ranks


@pytest.mark.parametrize("n,batch_size", [(20, 4), (21, 4), (17, 3), (9, 4), (2, 5), (25, 1)])
def test_two_ranks_see_every_record_once_per_epoch(n, batch_size):
    for epoch in range(3):
        ranks = epoch_batches(n, batch_size, 2, epoch)
        indices = [key[0] for batches in ranks for batch in batches for key in batch]
        assert sorted(indices) == list(range(n))  # every record once, no padding, no duplicate
        assert len(ranks[0]) == len(ranks[1])  # same number of batches: nobody waits alone
        for first, second in zip(*ranks):
            assert first and second and abs(len(first) - len(second)) <= 1


def test_epochs_reshuffle_and_keys_carry_per_sample_seeds():
    one = epoch_batches(40, 4, 2, epoch=0)
    again = epoch_batches(40, 4, 2, epoch=0)
    two = epoch_batches(40, 4, 2, epoch=1)
    assert one == again
    order = lambda ranks: [key[0] for batches in ranks for batch in batches for key in batch]
    assert order(one) != order(two)
    seeds_one = {key[0]: key[1] for batches in one for batch in batches for key in batch}
    seeds_two = {key[0]: key[1] for batches in two for batch in batches for key in batch}
    assert all(seeds_one[i] != seeds_two[i] for i in range(40))  # new augmentations each epoch
    single = {key[0]: key[1] for batch in epoch_batches(40, 8, 1, epoch=0)[0] for key in batch}
    assert single == seeds_one  # a sample's seed does not depend on the rank or the world size


def test_start_at_resumes_the_same_order():
    for rank in range(2):
        sampler = ResumableSampler(30, seed=7, rank=rank, world_size=2, batch_size=4)
        sampler.set_epoch(5)
        full = list(sampler)
        for position in range(len(full) + 1):
            resumed = ResumableSampler(30, seed=7, rank=rank, world_size=2, batch_size=4)
            resumed.load_state_dict(sampler.state_dict(epoch=5, position=position))
            assert list(resumed) == full[position:]
    with pytest.raises(ValueError, match="world_size differs"):
        ResumableSampler(30, world_size=1, batch_size=4).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("offset", [0, 5, 8, 23])
def test_an_epoch_resumed_under_another_layout_trains_the_rest_of_its_order_once(offset):
    """set_epoch(e, offset): the samples after the first `offset` of the epoch's order, in order, cut
    into this layout's global batches numbered to end at len(sampler); samples_done maps back."""
    full = ResumableSampler(23, seed=4, world_size=1, batch_size=4)
    full.set_epoch(2)
    order = [index for batch in full for index, _ in batch]
    ranks = [ResumableSampler(23, seed=4, rank=r, world_size=2, batch_size=3) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2, offset)
    first = ranks[0].first_position
    assert first == len(ranks[0]) - len(distributed.global_batches(23 - offset, 3, 2))
    assert ranks[0].samples_done(first) == offset and ranks[0].samples_done(len(ranks[0])) == 23
    batches = [list(ranks[0])[i] + list(ranks[1])[i] for i in range(len(ranks[0]) - first)]
    assert [index for batch in batches for index, _ in batch] == order[offset:]
    assert [ranks[0].global_batch_size(p) for p in range(first, len(ranks[0]))] == [len(b) for b in batches]
    with pytest.raises(ValueError):
        ranks[0].start_at(first - 1) if first else ranks[0].start_at(len(ranks[0]) + 1)


def test_global_batches_match_one_process_with_the_global_batch_size():
    """Two ranks with batch 4 together take the same records per step as one process with batch 8."""
    two = epoch_batches(37, 4, 2, epoch=2)
    one = epoch_batches(37, 8, 1, epoch=2)[0]
    assert [sorted(k[0] for k in a + b) for a, b in zip(*two)] == [sorted(k[0] for k in batch) for batch in one]


def test_sequential_order_is_restored_by_a_gather_in_rank_order():
    ranks = epoch_batches(23, 4, 3, epoch=0, shuffle=False)
    gathered = [key[0] for step in zip(*ranks) for batch in step for key in batch]
    assert gathered == list(range(23))


def test_too_few_records_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="cannot be shared"):
        ResumableSampler(1, world_size=2)


def test_world_size_one_needs_no_process_group():
    assert distributed.all_reduce_flag(True) is True and distributed.all_reduce_flag(False) is False
    tensor = torch.ones(2, requires_grad=True)
    assert distributed.gather_with_grad(tensor) is tensor and distributed.is_main()
    dist = distributed.setup("cpu", env={})
    assert (dist.rank, dist.world_size, dist.distributed) == (0, 1, False)


def features(seed, rows):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=generator), torch.randn(rows, 6, generator=generator)


def gather_worker(rank, world_size, port, sizes, results):
    join_group(rank, world_size, port)
    try:
        music, text = features(rank, sizes[rank])
        music.requires_grad_(True)
        loss = clip_loss(distributed.gather_with_grad(music), distributed.gather(text))
        loss.backward()
        flag = distributed.all_reduce_flag(rank == 1)
        # DDP averages parameter gradients over ranks: the rank's feature gradient / world size
        # is what reaches the parameters, so compare music.grad / world_size
        results[rank] = (loss.item(), (music.grad / world_size).clone(), flag)
    finally:
        torch.distributed.destroy_process_group()


def test_gather_with_grad_in_two_processes_equals_one_process():
    sizes = [3, 2]  # uneven, like the last batch of an epoch
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        run_processes(gather_worker, (2, free_port(), sizes, results))
        results = dict(results)
    parts = [features(rank, sizes[rank]) for rank in range(2)]
    music = torch.cat([p[0] for p in parts]).requires_grad_(True)
    text = torch.cat([p[1] for p in parts])
    loss = clip_loss(music, text)
    loss.backward()
    for rank in range(2):
        got_loss, got_grad, flag = results[rank]
        assert got_loss == pytest.approx(loss.item(), abs=1e-5)
        start = sum(sizes[:rank])
        # rank's feature gradient / world size (what DDP's average passes on) == one process's
        assert torch.allclose(got_grad, music.grad[start:start + sizes[rank]], atol=1e-6)
        assert flag is True


def test_two_process_training_equals_one_process_with_the_same_global_batch(tmp_path_factory, tmp_path):
    """torchrun, 2 processes on gloo, batch 2 each == 1 process with batch 4 (no dropout, so the
    only randomness is the data, which is keyed per sample). An OOM and a NaN loss injected on rank
    1 only, and a NaN gradient on rank 0 only, make BOTH ranks skip those steps, exactly like the
    single process; only rank 0 prints (one warning per skipped batch, not one per rank)."""
    workspace, _ = reference_run(tmp_path_factory)
    common = dict(lora_dropout=0, encoder_dropout=0, dist_timeout_s=60)
    single = run_trainer(trainer_args(workspace, tmp_path / "one", batch_size=4, fault_inject="oom@1,nan@3,nangrad@5",
                                      **common))
    assert single.returncode == 0, explain(single)
    double = run_torchrun(trainer_args(workspace, tmp_path / "two", batch_size=2,
                                       fault_inject="oom@1:1,nan@3:1,nangrad@5:0", **common), timeout=240)
    assert double.returncode == 0, explain(double)
    assert "world size 2 (backend gloo)" in double.stdout
    assert max_difference(final_lora(tmp_path / "two"), final_lora(tmp_path / "one")) <= 1e-5
    skips = lambda out: [(s["step"], s["skipped"], s["batch_size"]) for s in read_steps(out)]
    assert skips(tmp_path / "two") == skips(tmp_path / "one")
    assert [s for _, s, _ in skips(tmp_path / "one")][:6] == [None, "oom", None, "nonfinite_loss", None,
                                                              "nonfinite_grad"]
    for warning in ("(step 1) skipped: oom", "(step 3) skipped: nonfinite_loss",
                    "optimizer step after step 5 skipped: non-finite gradient"):
        assert double.stdout.count(warning) == 1, explain(double)
    assert double.stdout.count("STAGE 1/1: Training ABC Adapter") == 1
    for got, expected in zip(read_history(tmp_path / "two"), read_history(tmp_path / "one")):
        assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
        assert got["metrics"]["t2m_mrr"] == pytest.approx(expected["metrics"]["t2m_mrr"], abs=1e-9)


def test_sigterm_to_torchrun_gives_one_emergency_checkpoint_and_every_process_exits(tmp_path_factory, tmp_path):
    workspace, _ = reference_run(tmp_path_factory)
    output = tmp_path / "output"
    launcher = start_torchrun(trainer_args(workspace, output, batch_size=2, epochs=50, dist_timeout_s=60))
    steps = log_dir(output) / "ABC_steps.jsonl"
    deadline = time.time() + 120
    try:
        while not (steps.exists() and steps.read_text().strip()):
            assert launcher.poll() is None, launcher.communicate()
            assert time.time() < deadline, "no training step logged in time"
            time.sleep(0.05)
        workers = torchrun_workers(launcher)
        assert len(workers) == 2
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=60)  # every process gone within the bound
    finally:
        survivors = session_survivors(launcher, workers)
        stop_session(launcher, workers)
    assert stdout.count("emergency checkpoint (SIGTERM) saved") == 1, stdout + stderr
    assert "torchrun --standalone --nproc_per_node=2 train_clamp3_lora.py" in stdout and "--resume auto" in stdout
    state = checkpoint.load(log_dir(output) / "ABC_emergency_checkpoint.pth", stage="ABC")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and all(state["rng"])
    assert survivors == []
