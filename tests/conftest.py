"""Shared test helpers. Golden data lives in ../shared/golden beside the checkout; tests that need it
skip cleanly when it is absent (GOLDEN_DIR overrides the location)."""
import os
from pathlib import Path

import pytest

# Tests never touch the network: the Hugging Face hub is off for them and their subprocesses.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(os.environ.get("GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


@pytest.fixture
def golden():
    """Path of the golden folder; skips the test when it is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return GOLDEN
