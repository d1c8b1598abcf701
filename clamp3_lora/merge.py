"""Merge an adapter into its base: a checkpoint in the official layout that needs no peft.

    python -m clamp3_lora.merge --weights BASE.pth --adapter code/adapters/lora_abc_adapter --out merged.pth
    python -m clamp3_lora.merge --demo --adapter code/adapters/lora_abc_adapter --out merged.pth

The output is the input checkpoint with the adapter added into the query/key/value weights of the
symbolic encoder (W + B A * alpha / r): every key of the input is kept, with its shape and dtype, audio
keys and any other entry of the file ("epoch", ...) pass through unchanged. The official CLaMP 3 code,
and this project's `load_model`, load it as plain weights and compute base + adapter.
"""
import argparse
import re
import sys
from pathlib import Path

import torch

from .config import DEMO_BASE, demo_path
from .errors import CheckpointError, Clamp3LoraError
from .logs import atomic_torch_save
from .model import load_model, read_adapter
from .weights import resolve as resolve_weights

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def adapter_sizes(state_dict):
    """(layers, hidden size) the LoRA tensors of an adapter were trained for."""
    layers = {int(m.group(1)) for key in state_dict if (m := _LAYER.search(key))}
    hidden = {tensor.shape[1] for key, tensor in state_dict.items() if "lora_A" in key}
    return (max(layers) + 1 if layers else 0), (hidden.pop() if len(hidden) == 1 else sorted(hidden))


def check_adapter_fits(adapter, state_dict, config):
    """CheckpointError naming both sizes when the adapter was trained for another base."""
    layers, hidden = adapter_sizes(state_dict)
    if (layers, hidden) != (config.symbolic_layers, config.symbolic_hidden_size):
        raise CheckpointError(
            f"adapter {adapter} was trained for a symbolic encoder of {layers} layers and hidden size {hidden}; "
            f"these weights have {config.symbolic_layers} layers and hidden size {config.symbolic_hidden_size}. "
            f"Merge it into the base it was trained on (its training_record.json names it).")


def merged_checkpoint(weights, adapter):
    """The input checkpoint dict with the adapter merged into its symbolic encoder's weights."""
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    model = load_model(weights, text_model=None)
    _, lora_weights = read_adapter(adapter)
    check_adapter_fits(adapter, lora_weights, model.config)
    model.load_adapter(adapter)
    model.symbolic_model.base = model.symbolic_model.base.merge_and_unload()
    merged = model.state_dict()
    state = dict(checkpoint["model"])
    changed = []
    for key, tensor in state.items():
        if key.startswith("symbolic_model.") and key in merged and not torch.equal(merged[key].to(tensor.dtype), tensor):
            state[key] = merged[key].to(tensor.dtype).contiguous()
            changed.append(key)
    return dict(checkpoint, model=state), changed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clamp3_lora.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="the base the adapter was trained on: c2, saas, REPO_ID:FILENAME or a "
                                          "local .pth (official layout)")
    parser.add_argument("--demo", action="store_true", help=f"use the demo base ({DEMO_BASE}) as --weights")
    parser.add_argument("--adapter", required=True, help="adapter directory (peft format)")
    parser.add_argument("--out", required=True, help="the merged checkpoint to write (.pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    weights = args.weights or (demo_path(DEMO_BASE) if args.demo else None)
    try:
        if weights is None:
            raise Clamp3LoraError("give --weights (the base checkpoint the adapter was trained on) or --demo")
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise Clamp3LoraError(f"{out} exists; choose another --out or add --overwrite")
        weights = resolve_weights(weights)
        if not Path(weights).is_file():
            raise CheckpointError(f"checkpoint not found: {weights}")
        checkpoint, changed = merged_checkpoint(weights, args.adapter)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(out, checkpoint)
    except Clamp3LoraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"✓ {out}: {args.adapter} merged into {weights} ({len(changed)} weight tensors of the symbolic encoder "
          f"changed, every other entry as it was)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
