"""One training step, in one place: the trainer, the preflight's dry step and the benchmark call it.

    step = Step(model, optimizer, scheduler, scaler, precision="bf16", max_grad_norm=1.0)
    result = step.run(batch)                  # forward, guards, backward, clip, update
    result.loss, result.grad_norm, result.skip

`Step.run(batch)` takes one micro-batch (a collated CPU batch) through

    forward (music with grad, frozen text without) -> the guards every rank agrees on (an OOM or a
    non-finite loss skips the batch) -> backward (scaled for fp16; divided by the window length
    with gradient accumulation) -> at the window's last batch: clip, the non-finite-gradient guard,
    optimizer and scaler step, scheduler step, zero_grad

and, for a one-batch window without a GradScaler, reads loss and gradient norm with ONE host sync
after the backward pass, queuing the next batch's copy and frozen text pass on the GPU first
(`following`), so the GPU is busy while the host decides on the update. The guards decide exactly
as the separate reads would. With several processes, `gather` collects the features of every rank
for the contrastive loss (global negatives), and every guard is all-reduced, so all ranks skip
together and none waits in a collective alone.
"""
import gc
import math
from dataclasses import dataclass, field

import torch

from . import distributed
from .data import has_samples
from .faults import Faults
from .model import clip_loss
from .precision import autocast

SKIP_REASONS = ("no_samples", "oom", "nonfinite_loss", "nonfinite_grad")
"""Why a batch is skipped: every sample dropped (data.collate), out of memory, NaN/Inf loss or gradient."""


FORWARD_SKIPS = (None, "no_samples", "oom")
"""Skips the forward pass can agree on, by rank: the largest any process reports wins."""


class BackwardOutOfMemory(RuntimeError):
    """An OOM in the backward pass with several processes: the other ranks are inside the gradient
    all-reduce, so the batch cannot be skipped by all of them together; the run must stop."""


@dataclass
class StepResult:
    """What one micro-batch did. `loss` is None when the batch was skipped (`skip` says why). At a
    window's last batch: `updated` (the optimizer stepped), `grad_norm`, `window_losses` (the losses
    that went into that update), or `skip_window` "nonfinite_grad" with `window_batches` batches lost."""
    loss: float = None
    skip: str = None
    updated: bool = False
    grad_norm: float = None
    window_losses: list = field(default_factory=list)
    skip_window: str = None
    window_batches: int = 0


class Step:
    """The training step of a model (see the module doc). `train_model` is what the forward pass
    goes through (the model, or DistributedDataParallel around it); `scheduler` may be None."""

    def __init__(self, model, optimizer, scheduler, scaler, precision, max_grad_norm, device=None,
                 train_model=None, gather=None, text_ahead=True, faults=None, rank=0):
        self.model = model
        self.train_model = train_model or model
        self.params = model.trainable_parameters()
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.gather = gather
        self.text_ahead = text_ahead
        self.faults = faults or Faults()
        self.rank = rank
        self.ahead = None            # (key, device batch, text features) of the next batch
        self.window_losses = []      # losses of the window's batches that went through backward
        self.window_grads = 0

    def run(self, batch, window=1, last=True, key=None, following=None, fault_step=None):
        """One micro-batch (see the module doc). `window`: batches in this optimizer step; `last`:
        whether this batch ends it; `key`: this batch's key, `following`: (key, CPU batch) of the
        next one (for its text pass ahead); `fault_step`: the fault-injection index."""
        batch, text = self._take(batch, key)
        fused = window == 1 and not self.scaler.is_enabled()
        result = StepResult()
        music, result.skip = self._forward(batch, text, fault_step)
        loss = None
        if result.skip is None:
            with autocast(self.device, self.precision):
                loss = contrastive_loss(*music, self.gather)
            if self.faults.due("nan", fault_step, self.rank):
                loss = loss * float("nan")
            if not fused:
                result.loss = loss.item()
                if distributed.all_reduce_flag(not math.isfinite(result.loss)):
                    result.skip, result.loss = "nonfinite_loss", None
        norm = None
        if result.skip is None:
            result.skip = self._backward(loss, window, result.loss, fault_step)
            if fused and result.skip is None:
                result.loss, norm = self._read(loss, following)
                if distributed.all_reduce_flag(not math.isfinite(result.loss)):
                    result.skip, result.loss, norm = "nonfinite_loss", None, None
                    self._drop_window()
                else:
                    self.window_losses = [result.loss]
        if result.skip == "oom":
            self._drop_window()
            release_memory(self.device)
        if last:
            self._update(result, norm)
        return result

    def _take(self, batch, key):
        """The device batch and its text features when they were made ahead, else (copy, None)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and key is not None and ahead[0] == key:
            return ahead[1], ahead[2]
        return to_device(batch, self.device), None

    def _forward(self, batch, text, fault_step):
        """((music, text) features, None), or (None, reason) on every rank when one ran out of memory
        ("oom") or had no sample left ("no_samples"; an OOM elsewhere names the reason first)."""
        features, skip = None, None
        if not has_samples(batch):
            skip = "no_samples"
        else:
            try:
                with autocast(self.device, self.precision):
                    features = local_features(self.train_model, batch, text)
                    self.faults.raise_oom(fault_step, self.rank)
            except RuntimeError as error:
                if not is_oom(error):
                    raise
                skip = "oom"
        agreed = distributed.all_reduce_max(FORWARD_SKIPS.index(skip))   # every rank skips together
        if agreed:
            return None, FORWARD_SKIPS[agreed]
        return features, None

    def _backward(self, loss, window, loss_value, fault_step):
        """Backpropagate loss / window; "oom" when it ran out of memory (one process only)."""
        try:
            self.faults.raise_oom(fault_step, self.rank, kind="oomback")
            self.scaler.scale(loss / window).backward()
        except RuntimeError as error:
            if not is_oom(error):
                raise
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise BackwardOutOfMemory(str(error)) from error
            return "oom"                                     # a half-done backward: drop the window
        self.window_grads += 1
        self.window_losses.append(loss_value)
        self.faults.poison_gradient(fault_step, self.rank, self.params)
        return None

    def _read(self, loss, following):
        """(loss, gradient norm) with one host sync, the gradients clipped on the device first; the
        next batch's text pass queued behind the read when `following` is given."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf)
        if following is None or not self.text_ahead:
            return read_scalars(loss, norm)
        (value, norm), made = read_scalars_during(
            lambda: text_ahead(self.train_model, following[1], self.device, self.precision), loss, norm)
        if made is not None:
            self.ahead = (following[0], *made)
        return value, norm

    def _update(self, result, norm):
        """The window's end: clip (unless done), the gradient guard, optimizer/scaler/scheduler step."""
        if self.window_grads:
            if norm is None:
                self.scaler.unscale_(self.optimizer)
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf))
            result.grad_norm = norm
            if distributed.all_reduce_flag(not math.isfinite(norm)):
                result.skip_window, result.window_batches = "nonfinite_grad", self.window_grads
                self.scaler.update()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.scheduler is not None:
                    self.scheduler.step()
                result.updated, result.window_losses = True, list(self.window_losses)
        self._drop_window()

    def _drop_window(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.window_grads, self.window_losses = 0, []


# --------------------------------------------------------------------------------------------
# The per-batch math


def to_device(batch, device):
    """The collated batch with every tensor on `device` (non-blocking copies from pinned memory)."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def unwrap(model):
    """The Clamp3 model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def local_features(model, batch, text=None):
    """(music features with grad, text features without) of this process's samples.

    `model` is a Clamp3 or a DistributedDataParallel around one: the music side goes through
    `model(...)` so that DDP sees the forward pass it must synchronise; the frozen text side runs
    under torch.no_grad(). `text`: the batch's text features computed earlier (text_ahead).
    """
    if text is None:
        text = text_features(model, batch)
    music, _ = model(batch["patches"], batch["patch_mask"], packed=packed_of(batch, "patch"))
    return music, text


def text_features(model, batch):
    """The batch's text features, without autograd (the frozen text side)."""
    with torch.no_grad():
        return unwrap(model).text_features(batch["text_ids"], batch["text_mask"], packed_of(batch, "text"))


def text_ahead(model, cpu_batch, device, precision):
    """(device batch, text features) of the NEXT batch, or None when they cannot be made early:
    the frozen text side does not depend on the update the current step is about to make. With
    CUDA graphs, the layout of the batch's music inputs is queued then too. None when the text side
    is trainable, or on an out-of-memory error (the batch's own step then meets it)."""
    if not unwrap(model).text_frozen or not has_samples(cpu_batch):
        return None
    batch = to_device(cpu_batch, device)
    try:
        with autocast(device, precision):
            text = text_features(model, batch)
        unwrap(model).lay_out_music_ahead(batch["patches"], batch["patch_mask"], packed_of(batch, "patch"))
        return batch, text
    except RuntimeError as error:
        if not is_oom(error):
            raise
        return None


def is_oom(error):
    """Whether a RuntimeError is an out-of-memory error."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def release_memory(device):
    """Free what Python still holds and return cached GPU memory (between epochs, stages, after OOM)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def packed_of(batch, prefix):
    """(index, cu) of the batch's `prefix` mask ("patch" or "text") when the collate function
    added them (data.add_packing), else None (the fast path then computes them, with a host sync)."""
    index, cu = batch.get(f"{prefix}_index"), batch.get(f"{prefix}_cu")
    return None if index is None or cu is None else (index, cu)


def read_scalars(*values):
    """Python floats of 0-dim tensors, read with ONE device-to-host copy."""
    return torch.stack([v.detach().float().reshape(()) for v in values]).tolist()


def read_scalars_during(work, *values):
    """(read_scalars(*values), work()): on CUDA the copy of the values to the host is queued first
    (into pinned memory, without waiting), then work() queues its GPU work, then the host waits for
    the copy alone, while the GPU goes on with work()'s kernels."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    if not stacked.is_cuda:
        return stacked.tolist(), work()
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    result = work()
    copied.synchronize()
    return host.tolist(), result


def contrastive_loss(music, text, gather=None):
    """CLIP loss over the global batch: `gather` (e.g. distributed.gather_with_grad) collects every
    rank's features first; None means this process's batch is the whole batch."""
    if gather is not None:
        music, text = gather(music), gather(text)
    return clip_loss(music, text)


def forward_loss(model, batch, gather=None):
    """(loss, music features, text features) of one batch; see local_features and contrastive_loss."""
    music, text = local_features(model, batch)
    return contrastive_loss(music, text, gather), music, text
