"""LoRA fine-tuning for the CLaMP 3 symbolic-music encoder.

The public API (stable, documented in README.md):

    import clamp3_lora
    model = clamp3_lora.load_model("weights.pth", text_model="FacebookAI/xlm-roberta-base")
    model.load_adapter("code/adapters/lora_abc_adapter")
    model.text_features(input_ids, attention_mask)
    model.music_features(patches, patch_mask)
    clamp3_lora.patchify(text)
    clamp3_lora.midi_to_mtf(path)
"""
from .errors import CheckpointError, Clamp3LoraError, DataError, MusicFormatError
from .model import PRESETS, Clamp3, ModelConfig, clip_loss, load_model
from .mtf import midi_to_mtf, read_music
from .patches import patchify, remove_instrument_info

__all__ = [
    "CheckpointError", "Clamp3", "Clamp3LoraError", "DataError", "ModelConfig", "MusicFormatError",
    "PRESETS", "clip_loss", "load_model", "midi_to_mtf", "patchify", "read_music",
    "remove_instrument_info",
]
