"""The per-batch math, shared by the trainer, the preflight and the benchmark.

    batch = to_device(batch, device)
    with autocast(device, "bf16"):
        loss, music, text = forward_loss(model, batch, gather=distributed.gather_with_grad)
    loss.backward()

The text encoder is frozen: its features are computed without autograd, and since they do not
depend on the update, the trainer computes the next batch's while the host waits for a step's loss
(`text_ahead`, `read_scalars_during`). The music features keep their graph. With several processes,
`gather` collects the features of every rank so the contrastive loss sees the global batch (global
negatives, as the official CLaMP 3 training does); the gradient still reaches each rank's own samples.
"""
import contextlib

import torch

from .model import clip_loss

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision, cpu_autocast=False):
    """Autocast context for `precision` ("bf16", "fp16" or "fp32") on `device`.

    On CUDA, bf16 and fp16 autocast; fp32 runs without autocast. On the CPU there is no autocast
    (fp32, exact, which the tests rely on) unless cpu_autocast=True and precision is "bf16".
    """
    device = torch.device(device)
    if precision not in AUTOCAST_DTYPES and precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}: use bf16, fp16 or fp32")
    if device.type == "cuda" and precision in AUTOCAST_DTYPES:
        return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])
    if device.type == "cpu" and cpu_autocast and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    """(device batch, text features) of the NEXT batch, or None when they cannot be made early.

    The frozen text side does not depend on the update the current step is about to make, so its
    pass over the next batch can be queued on the GPU while the host waits for this step's loss
    and gradient norm (read_scalars_during): the GPU then has work in the time the host spends
    deciding on and launching the update. With CUDA graphs, the layout of the batch's music
    inputs is queued then too (Clamp3.lay_out_music_ahead). None when the text side is trainable,
    or on an out-of-memory error (the batch's own step then computes its text, and meets the error
    there).
    """
    if not unwrap(model).text_frozen:
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


def packed_of(batch, prefix):
    """(index, cu) of the batch's `prefix` mask ("patch" or "text") when the collate function
    added them (data.add_packing), else None (the fast path then computes them, with a host sync)."""
    index, cu = batch.get(f"{prefix}_index"), batch.get(f"{prefix}_cu")
    return None if index is None or cu is None else (index, cu)


def read_scalars(*values):
    """Python floats of 0-dim tensors, read with ONE device-to-host copy (one sync per call,
    instead of one per .item()). Values keep their float32 value exactly."""
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
