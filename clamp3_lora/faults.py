"""The fault-injection test hook: faults "KIND@STEP[:RANK][/ATTEMPT]" (--fault-inject or CLAMP3_LORA_FAULTS).

STEP is the stage's global micro-step (batch) index counted from 0 across epochs; RANK limits the
fault to one process; ATTEMPT to one attempt of a job that torchrun restarts (--max-restarts): 0 is
the first, 1 the first restart (torchrun's TORCHELASTIC_RESTART_COUNT), so a fault does not strike
again when the restarted job passes the same step. The step (step.Step) and the trainer's loop ask `due`/`raise_oom`/
`poison_gradient`/`before_batch` at the matching moments; without faults every call is a no-op.
    oom@S       a CUDA out-of-memory error in the forward pass of batch S
    oomback@S   the same in place of the backward pass of batch S
    nan@S       a NaN loss for batch S
    nangrad@S   a NaN LoRA gradient after the backward pass of batch S
    sigint@S, sigterm@S, sigkill@S   that signal sent to the process itself before batch S
    error@S     an unexpected RuntimeError before batch S
    hang@S      stop answering before batch S until a stop signal arrives
"""
import math
import os
import signal
import time

import torch

from .errors import Clamp3LoraError

FAULTS_ENV = "CLAMP3_LORA_FAULTS"
FAULT_KINDS = ("oom", "oomback", "nan", "nangrad", "sigint", "sigterm", "sigkill", "error", "hang")


def restart_count(env=os.environ):
    """How many times torchrun has restarted this job (0 on the first attempt or without torchrun)."""
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class Faults:
    """The fault-injection plan (see the module doc): [(kind, step, rank or None)] of this attempt."""

    def __init__(self, faults=()):
        self.faults = list(faults)

    @classmethod
    def parse(cls, text, attempt=None):
        """The faults of `text` that strike in `attempt` (default: this process's restart_count())."""
        attempt = restart_count() if attempt is None else attempt
        faults = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, where = item.partition("@")
            where, _, only_attempt = where.partition("/")
            step, _, rank = where.partition(":")
            if (kind not in FAULT_KINDS or not step.isdigit() or (rank and not rank.isdigit())
                    or (only_attempt and not only_attempt.isdigit())):
                raise Clamp3LoraError(f"fault injection {item!r}: expected KIND@STEP, KIND@STEP:RANK or "
                                      f"KIND@STEP:RANK/ATTEMPT with KIND one of {', '.join(FAULT_KINDS)}")
            if not only_attempt or int(only_attempt) == attempt:
                faults.append((kind, int(step), int(rank) if rank else None))
        return cls(faults)

    def due(self, kind, step, rank):
        return any(k == kind and s == step and r in (None, rank) for k, s, r in self.faults)

    def raise_oom(self, step, rank, kind="oom"):
        if self.due(kind, step, rank):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by the fault hook at step {step})")

    def poison_gradient(self, step, rank, params):
        if self.due("nangrad", step, rank):
            for param in params:
                if param.grad is not None:
                    param.grad.view(-1)[0] = math.nan
                    return

    def before_batch(self, step, rank, signals):
        """The faults that strike before a batch: a signal to this process, an unexpected error, a
        hang (until `signals` has received a stop signal)."""
        for kind in ("sigint", "sigterm", "sigkill"):
            if self.due(kind, step, rank):
                os.kill(os.getpid(), getattr(signal, kind.upper()))
        if self.due("error", step, rank):
            raise RuntimeError(f"unexpected failure (injected by the fault hook at step {step})")
        if self.due("hang", step, rank):
            while signals.received is None:
                time.sleep(0.05)
