"""The console commands of `pip install .` (pyproject.toml [project.scripts]); each does what the
repository's script or module does:

    clamp3-train      python train_clamp3_lora.py
    clamp3-preflight  python test_lora_setup.py
    clamp3-prepare    python -m clamp3_lora.prepare
    clamp3-evaluate   python -m clamp3_lora.evaluate
    clamp3-merge      python -m clamp3_lora.merge
    clamp3-search     python -m clamp3_lora.search
"""
import sys

from . import preflight, train
from .cli import parse_config

TRAIN = "Train CLaMP 3's LoRA adapters: stage 1/2 the ABC adapter, stage 2/2 the MTF adapter."
PREFLIGHT = "CLaMP 3 LoRA preflight: check the set-up before training"


def train_command():
    """clamp3-train: the trainer (its flags as train_clamp3_lora.py's)."""
    sys.exit(train.main(parse_config(description=TRAIN)))


def preflight_command():
    """clamp3-preflight: the preflight (the trainer's flags)."""
    sys.exit(preflight.main(parse_config(description=PREFLIGHT)))
