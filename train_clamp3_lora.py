"""Train CLaMP 3's LoRA adapters: stage 1/2 the ABC adapter, stage 2/2 the MTF adapter.

    python train_clamp3_lora.py                    # both stages (CUDA; see --help for every setting)
    python train_clamp3_lora.py --resume auto      # continue after an interruption
    python train_clamp3_lora.py --demo --device cpu
    torchrun --nproc_per_node=4 train_clamp3_lora.py
"""
import sys

from clamp3_lora.cli import parse_config
from clamp3_lora.train import main

if __name__ == "__main__":
    sys.exit(main(parse_config(description=__doc__)))
