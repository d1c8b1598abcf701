"""Several processes through torchrun: the process group, a resumable sharded sampler, and the
collectives the trainer needs (a gather that keeps the gradient, a flag every rank agrees on).

A plain `python train_clamp3_lora.py` never touches torch.distributed: `setup` returns a one-process
`Dist` and every helper here is then a no-op or an identity. Under
`torchrun --nproc_per_node=N train_clamp3_lora.py` (which sets RANK, WORLD_SIZE, LOCAL_RANK), `setup`
joins the process group (NCCL on GPUs, gloo on the CPU) with a timeout on every collective, and each
process drives the GPU of its LOCAL_RANK.

A collective that fails (another process crashed or was killed, or did not answer within the timeout)
raises DistributedError, which says so, instead of a bare backend error; with NCCL a timed-out
collective aborts the process from PyTorch's watchdog, with its own message. Either way the job ends
(torchrun then stops the other processes) instead of hanging.
"""
import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import Clamp3LoraError, DistributedError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank, the number of processes, and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self):
        """Whether a process group is in use (launched by torchrun)."""
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun(env=os.environ):
    """True when torchrun (or another launcher with its variables) started this process."""
    return "RANK" in env and "WORLD_SIZE" in env


def resolve_device(name, local_rank=0):
    """The torch.device for --device NAME; "cuda" means this process's GPU (cuda:LOCAL_RANK).

    Never falls back: a CUDA device without a usable GPU raises Clamp3LoraError.
    """
    try:
        device = torch.device(name)
    except RuntimeError as error:  # torch's own message lists twenty device types
        raise Clamp3LoraError(f"unknown --device {name!r}: use cuda (the default; cuda:N for one GPU) or cpu") \
            from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise Clamp3LoraError(f"unsupported --device {name!r}: use cuda (default) or cpu")
    if not torch.cuda.is_available():
        raise Clamp3LoraError(
            "CUDA is not available: no usable GPU was found (torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda or 'none'}). This trainer runs on a "
            "GPU by default and never falls back to the CPU silently. Check `nvidia-smi` and the CUDA "
            "build of torch, or pass --device cpu to train on the CPU on purpose (slow; for tests and the demo).")
    index = device.index if device.index is not None else local_rank
    if index >= torch.cuda.device_count():
        raise Clamp3LoraError(f"--device {name}: GPU {index} does not exist "
                              f"({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def setup(device_name="cuda", timeout_s=1800, env=os.environ):
    """Join torchrun's process group (if launched by torchrun) and pick this process's device.

    NCCL on CUDA, gloo on the CPU; every collective times out after `timeout_s` seconds, so a lost
    rank ends the job with an error instead of hanging. Returns a Dist.
    """
    if not launched_by_torchrun(env):
        return Dist(rank=0, world_size=1, local_rank=0, device=resolve_device(device_name))
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        join(backend, rank, world_size, timeout_s, int(env.get("TORCHELASTIC_RESTART_COUNT", 0)), **kwargs)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


JOIN_TIMEOUT_S = 300
"""How long a process waits for the others to join the process group before it gives up."""


def join(backend, rank, world_size, timeout_s, attempt, **kwargs):
    """init_process_group through torchrun's store, its keys under a prefix of their own for each
    attempt of the job: torchrun --max-restarts keeps one store across restarts, and without the
    prefix a restarted process can read the address a process of the previous attempt left there
    (gloo: "connectFullMesh failed ... Connection refused", then a wait until the timeout). Waiting
    for the others lasts at most JOIN_TIMEOUT_S (or `timeout_s`, the collectives' timeout, if
    shorter); then DistributedError."""
    join_s = min(timeout_s, JOIN_TIMEOUT_S)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                           timeout=datetime.timedelta(seconds=join_s)))
        store = dist.PrefixStore(f"clamp3_lora/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"rank {rank} could not join the other {world_size - 1} process(es) of attempt {attempt} within "
            f"{join_s} s ({type(error).__name__}: {error}). If torchrun restarts the job it tries again; "
            f"otherwise start it again with --resume auto.") from error


def teardown():
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what):
    """Run the collective `what` (a few words for the message); a backend failure becomes a
    DistributedError that says what it means. An out-of-memory error passes through unchanged."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise DistributedError(
            f"{what} across the {dist.get_world_size()} processes failed on rank {dist.get_rank()}: another "
            f"process stopped (crashed, killed, out of memory; its own error, if it printed one, is above) "
            f"or did not answer within the collective timeout (--dist-timeout-s). The job stops here; "
            f"continue it with --resume auto. ({type(error).__name__}: {error})") from error


def is_main():
    """Whether this process is rank 0 (always true without a process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier():
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        with collective("a barrier"):
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


def _collective_device():
    """Device of the tensors handed to collectives: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_flag(flag):
    """True on every rank if `flag` is true on any rank (identity without a process group)."""
    return bool(all_reduce_max(1 if flag else 0))


def all_reduce_max(value):
    """The largest of every rank's int `value` (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int32, device=_collective_device())
    with collective("the all-reduce of a step flag (skip, stop)"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())


def computed_on_main(compute):
    """compute() run on rank 0 alone, its result sent to every rank; a Clamp3LoraError that it
    raises is raised on every rank (so no rank waits for a result that will never come)."""
    outcome = None
    if is_main():
        try:
            outcome = {"result": compute()}
        except Clamp3LoraError as error:
            outcome = {"error": error}
    outcome = broadcast_object(outcome)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    with collective("an all-gather of objects (RNG states)"):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's obj on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    with collective("a broadcast from rank 0"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_sizes(tensor):
    """The first-dimension sizes of `tensor` on every rank."""
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor, sizes):
    """all_gather of tensors whose first dimensions differ (`sizes`); concatenated in rank order."""
    largest = max(sizes)
    padded = tensor
    if tensor.shape[0] < largest:
        filler = tensor.new_zeros((largest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        padded = torch.cat([tensor, filler])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the gradient of its own rows.

    Every rank computes the same global loss from the gathered tensor, so the gradient of the
    global loss with respect to this rank's rows is the SUM over ranks of the gradients they see for
    those rows (all-reduce, then this rank's slice). DDP then averages the parameter gradients over
    the ranks; together that is exactly the gradient of one process on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, tensor):
        with collective("the all-gather of the features"):
            sizes = _gather_sizes(tensor)
            gathered = _gather_padded(tensor, sizes)
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return gathered

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        with collective("the all-reduce of the feature gradients"):
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(tensor):
    """[sum of first dims over ranks, ...]: every rank's `tensor`, concatenated in rank order, with
    the gradient flowing back to each rank's own rows (see _GatherWithGrad). Ranks may hold different
    numbers of rows. Identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather(tensor):
    """Like gather_with_grad but without autograd (evaluation, frozen text features)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    with torch.no_grad(), collective("the all-gather of the features"):
        return _gather_padded(tensor.detach(), _gather_sizes(tensor))


# --------------------------------------------------------------------------------------------
# The sampler


def sample_seed(seed, epoch, index):
    """The seed of every random choice made for record `index` in `epoch` (augmentations, windows):
    a hash of (seed, epoch, index), so a sample never depends on which rank, worker or run draws it."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rank_seed(seed, epoch, batch, rank):
    """A fresh seed for rank `rank`'s own random stream (dropout) from batch `batch` of `epoch` on,
    for a resume on another number of processes (whose saved per-rank streams do not fit)."""
    return sample_seed(seed, epoch, f"resume/{batch}/{rank}")


def epoch_order(n, seed, epoch, shuffle=True):
    """The order of the n records in `epoch`: a permutation drawn from (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batches(n, batch_size, world_size):
    """[(start, end)] slices of an epoch's order, one per global batch (batch_size on each rank).

    The last global batch takes whatever is left; if fewer records are left than there are ranks
    (one of them would get an empty batch), they join the batch before it. So every record is in
    exactly one global batch and every rank gets at least one record of every global batch.
    """
    size = batch_size * world_size
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world_size:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def rank_slice(start, end, rank, world_size):
    """This rank's contiguous part of the global batch [start, end): sizes differ by at most one,
    the first ranks take the extra records, and the parts follow rank order (so a gather in rank
    order restores the global batch's order)."""
    base, extra = divmod(end - start, world_size)
    begin = start + rank * base + min(rank, extra)
    return begin, begin + base + (1 if rank < extra else 0)


class ResumableSampler:
    """Batches of sample keys for one rank: a per-epoch permutation of n records, cut into global
    batches and sharded across ranks; resumable at any batch.

    Use it as a DataLoader `batch_sampler`: iterating yields lists of `(index, sample_seed)` keys,
    `batch_size` keys per batch (the last global batch may be smaller or, to avoid an empty batch on
    some rank, up to world_size - 1 larger; ranks differ by at most one key). Over one epoch the
    ranks together see every record exactly once, with no padding and no duplicates, and every rank
    has the same number of batches, so no rank waits alone in a collective.

    `set_epoch(e)` picks the epoch's order (from seed and e, the same on every rank), `start_at(b)`
    skips the first b batches of it (resume mid-epoch); `state_dict()` / `load_state_dict()` keep
    both. With shuffle=False (evaluation) the order is 0..n-1, so gathering the features of every
    batch in rank order gives the whole set in its original order.
    """

    def __init__(self, n, seed=0, rank=0, world_size=1, shuffle=True, batch_size=1):
        if n < world_size:
            raise ValueError(f"{n} records cannot be shared by {world_size} ranks (every rank needs one)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.n = n
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.epoch = 0
        self.position = 0
        self._bounds = global_batches(n, batch_size, world_size)
        self._epoch_bounds = self._bounds

    def set_epoch(self, epoch, offset=0):
        """Use epoch's order from now on, from its first batch. `offset`: the first `offset` samples of
        the order were trained under another global batch (a resume with --new-global-batch); the
        rest is cut into this layout's global batches, numbered so that the epoch still ends at
        len(self): they are batches first_position .. len(self) - 1."""
        self.epoch = epoch
        self.position = 0
        self._epoch_bounds = self._bounds
        if offset:
            rest = [(start + offset, end + offset) for start, end in
                    global_batches(self.n - offset, self.batch_size, self.world_size)] if offset < self.n else []
            self._epoch_bounds = [None] * (len(self._bounds) - len(rest)) + rest

    @property
    def first_position(self):
        """The first batch of the current epoch (0, or more after set_epoch with an offset)."""
        return sum(bound is None for bound in self._epoch_bounds)

    def samples_done(self, position):
        """Samples of the current epoch's order trained once `position` batches are done."""
        if position >= len(self._epoch_bounds):
            return self.n
        return self._epoch_bounds[position][0]

    def start_at(self, position):
        """Start the next iteration at batch `position` of the epoch (first_position .. len(self))."""
        if not self.first_position <= position <= len(self):
            raise ValueError(f"sampler position {position} is outside {self.first_position}..{len(self)}")
        self.position = position

    def __len__(self):
        """Batches per epoch (the same on every rank)."""
        return len(self._bounds)

    def batches(self, first=0):
        """This rank's batches of the current epoch, from batch `first` on (a generator)."""
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        for start, end in self._epoch_bounds[max(first, self.first_position):]:
            begin, finish = rank_slice(start, end, self.rank, self.world_size)
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in order[begin:finish]]

    def __iter__(self):
        return self.batches(self.position)

    def global_batch_size(self, position):
        """Records in global batch `position` (all ranks together)."""
        start, end = self._epoch_bounds[position]
        return end - start

    def state_dict(self, epoch=None, position=None):
        """Everything needed to continue the same order: seed, epoch, position (batches done; by
        default the current epoch and start position, or the ones given) and the layout."""
        return {"n": self.n, "seed": self.seed,
                "epoch": self.epoch if epoch is None else epoch,
                "position": self.position if position is None else position,
                "world_size": self.world_size, "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state):
        """Continue from state_dict(); the layout (n, world size, batch size, shuffle) must match."""
        for key in ("n", "world_size", "batch_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler {key} differs: saved {state[key]}, now {getattr(self, key)}")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.start_at(state["position"])
