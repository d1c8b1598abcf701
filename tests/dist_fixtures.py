"""Helpers of the tests that run several real processes on the CPU (gloo): starting them with a
deadline, joining their process group, and the tiny model as the trainer builds it."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from clamp3_lora import train
from clamp3_lora.distributed import sample_seed
from clamp3_lora.data import Collator, MusicTextDataset
from clamp3_lora.speed import accelerate
from clamp3_lora.model import load_model
from config import TrainConfig


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(worker, args, nprocs=2, timeout=60):
    """worker(rank, *args) in `nprocs` forked processes; fails the test (after killing them) when
    they are not all done within `timeout` seconds, so a hang fails instead of blocking. A worker's
    exception is raised here (torch.multiprocessing.ProcessRaisedException).

    fork: the children reuse this process's imports (CPU only, no CUDA state to inherit)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"{nprocs} processes of {worker.__name__} did not finish within {timeout} s")


def join_group(rank, world_size, port, timeout_s=30):
    """Join a gloo process group of `world_size` processes on this machine (collectives time out)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=timeout_s))


def tiny_training_model(tokenizer, seed=0):
    """The tiny random model as the trainer builds it (adapter, fast paths from the default config),
    without dropout (so several processes compute what one does), with random LoRA weights (a fresh
    adapter's B is zero, which would make the A gradients zero), in training mode."""
    torch.manual_seed(seed)
    model = load_model(None, text_model=str(tokenizer), preset="tiny")
    train.set_encoder_dropout(model, 0.0)
    model.add_adapter(r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    accelerate(model, "fp32", TrainConfig().speed)
    model.train()
    model.text_model.eval()
    return model


def training_batch(model, records, indices, seed=1, epoch=0):
    """The collated training batch of `records[i]` for i in indices, keyed as the trainer keys them."""
    dataset = MusicTextDataset(records, model.tokenizer, train=True, max_patches=24, max_text_tokens=24)
    items = [dataset[(i, sample_seed(seed, epoch, i))] for i in indices]
    return Collator(model.tokenizer.pad_token_id)(items)
