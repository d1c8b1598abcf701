"""Preflight: check GPU, libraries, weights, tokenizer, data, output folders and one dry training
step before a run. Takes the trainer's flags; exit code 0 only when training can start.

    python test_lora_setup.py                     # the default set-up (config.py)
    python test_lora_setup.py --demo --device cpu # the bundled demo set-up, on the CPU
"""
import sys

try:
    from clamp3_lora import preflight
    from clamp3_lora.cli import parse_config
except ModuleNotFoundError as error:
    print(f"✗ cannot import {error.name}: install the requirements first (pip install -r requirements.txt)")
    sys.exit(1)


if __name__ == "__main__":
    config = parse_config(description="CLaMP 3 LoRA preflight: check the set-up before training")
    sys.exit(preflight.main(config))
