"""LoRA fine-tuning for the CLaMP 3 symbolic-music encoder (public API filled in at integration)."""
