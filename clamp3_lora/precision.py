"""Precision in one place: what "bf16", "fp16" and "fp32" mean for autocast, the GradScaler and dtypes.

The trainer, the evaluation, the preflight, the speed paths and the benchmark all ask here.
On CUDA, bf16 and fp16 run under autocast (fp16 with a GradScaler); fp32 runs without autocast.
On the CPU every run is fp32 (exact; the tests rely on it), whatever the setting says.
"""
import contextlib

import torch

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check(precision):
    """Raise ValueError for anything but bf16, fp16 or fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")


def default_for(device):
    """The precision to use when none is given: bf16 on CUDA, fp32 on the CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device, precision, cpu_autocast=False):
    """Autocast context for `precision` on `device`: bf16/fp16 autocast on CUDA, none for fp32.
    On the CPU there is no autocast (fp32, exact) unless cpu_autocast=True and precision is "bf16"."""
    check(precision)
    device = torch.device(device)
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=DTYPES[precision])
    if device.type == "cpu" and cpu_autocast and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(device, precision):
    """The GradScaler of a run: enabled for fp16 on CUDA only (a no-op object otherwise)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
