"""Train CLaMP 3's LoRA adapters: stage 1/2 the ABC adapter, stage 2/2 the MTF adapter.

    python train_clamp3_lora.py                    # both stages (CUDA; see --help for every setting)
    python train_clamp3_lora.py --resume auto      # continue after an interruption
    python train_clamp3_lora.py --demo --device cpu
    torchrun --nproc_per_node=4 train_clamp3_lora.py
"""
import os
import signal
import sys


def stopped_while_starting(number, frame):
    """Ctrl+C or SIGTERM before the trainer's own handlers are in place (imports, flags): one line, no
    traceback. os._exit, not sys.exit: an exception raised inside a C extension's import (torch) aborts
    the interpreter; nothing has been written yet, so there is nothing to clean up."""
    print(f"⚠ {signal.Signals(number).name} during start-up: stopped; nothing was trained yet.", file=sys.stderr,
          flush=True)
    os._exit(128 + number)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stopped_while_starting)
    signal.signal(signal.SIGTERM, stopped_while_starting)
    from clamp3_lora.cli import parse_config
    from clamp3_lora.train import main
    sys.exit(main(parse_config(description=__doc__)))
