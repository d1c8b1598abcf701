"""The trainer's settings and their defaults: the user's file named by the design.

The settings live in the package (clamp3_lora/config.py), so the package works from anywhere; this
file re-exports them. Every field of TrainConfig (and of its SpeedConfig) is a command-line flag:
`python train_clamp3_lora.py --help` lists them, with the text that follows each field as its help.
Change a default there, or give the flag.
"""
from clamp3_lora.config import DEMO_BASE, SpeedConfig, TrainConfig, demo_overrides

__all__ = ["TrainConfig", "SpeedConfig", "demo_overrides", "DEMO_BASE"]
