"""The speed machinery of the training step, kept apart from the plain model (clamp3_lora/model.py).

    from clamp3_lora.speed import accelerate
    accelerate(model, "bf16", cfg.speed)      # after add_adapter/load_adapter, on the final device

One entry point wires the speed paths onto a built model; the model itself only calls what it finds
in its `fast` and `graphs` slots. The pieces:
    fast.py      the encoders over packed real tokens, fused layers, flash/cuDNN attention
    graphs.py    the training passes replayed as CUDA graphs
    kernels.py   Triton kernels (patch-embedding gather-sum, dropout masks drawn ahead)
    packing.py   where a batch's real tokens are (computed on the CPU by the collate function)
Each path computes the same function as the plain one (tests/test_fast_paths.py, test_graphs.py).
"""
import dataclasses

import torch

from ..config import SpeedConfig
from ..errors import Clamp3LoraError
from ..precision import DTYPES
from . import kernels
from .fast import ATTENTION_MODES, FastPaths, check_encoder, dense_available, store_frozen_weights
from .graphs import EncoderGraphs


def accelerate(model, precision="bf16", speed=None, **switches):
    """Switch the speed paths of `speed` (a SpeedConfig; default: every default switch) on for
    `model`, with `switches` (SpeedConfig field names) overriding single fields. Call it after the
    adapter is on, on the model's final device, before DistributedDataParallel wraps the model.

    bf16_weights stores the frozen matrices in bf16 (with precision "bf16" on CUDA); run the model
    inside precision.autocast(device, precision) afterwards, as the trainer does. text_ahead is a
    switch of the step (step.Step), not of the model. Returns {switch: what runs here} for the log
    (every SpeedConfig field: a new switch shows there as it is).
    """
    unknown = set(switches) - {f.name for f in dataclasses.fields(SpeedConfig)}
    if unknown:
        raise Clamp3LoraError(f"unknown speed switch(es) {', '.join(sorted(unknown))}: the switches are the "
                              f"fields of SpeedConfig (clamp3_lora/config.py)")
    speed = dataclasses.replace(speed or SpeedConfig(), **switches)
    if speed.attention not in ATTENTION_MODES:
        raise Clamp3LoraError(f"unknown attention mode {speed.attention!r}: use {', '.join(ATTENTION_MODES)}")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.fast = model.graphs = None
    if speed.fast_encoder:
        check_encoder(model.symbolic_model.bert, "symbolic encoder")
        check_encoder(model.text_model, "text encoder")
        model.fast = FastPaths(speed, compile="layer" if speed.compile_layers and cuda else "none")
        if model.fast.compile != "none":
            # One compiled layer serves every layer, yet it is specialised on a few things (music or
            # text, the first layer or not, dense or varlen attention, training or evaluation):
            # allow more variants than dynamo's default before it falls back to eager code.
            torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
        if speed.cuda_graphs and cuda:
            model.graphs = EncoderGraphs(model)
    stored_bf16 = speed.bf16_weights and precision == "bf16" and cuda
    if stored_bf16:
        store_frozen_weights(model, torch.bfloat16)
    fast = model.fast is not None
    bert = model.symbolic_model.bert.config
    dense = dense_available(device, DTYPES[precision], bert.hidden_size // bert.num_attention_heads)
    runs = {name: fast and value for name, value in dataclasses.asdict(speed).items()}  # off without the fast encoder
    runs.update(fast_encoder=fast, compile_layers=model.fast.compile if fast else "none", bf16_weights=stored_bf16,
                patch_kernel=runs["patch_kernel"] and kernels.available(device),
                attention=speed.attention if fast else "transformers",
                dense_attention=runs["dense_attention"] and dense, text_ahead=speed.text_ahead,
                cuda_graphs=model.graphs is not None)
    return runs

__all__ = ["accelerate", "SpeedConfig"]
