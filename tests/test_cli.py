"""The command line: every TrainConfig field is a flag with its help text, and --help works."""
import dataclasses
import subprocess
import sys
from pathlib import Path

from clamp3_lora.cli import field_docs, parse_config
from config import SpeedConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_field_with_its_text():
    result = subprocess.run([sys.executable, "train_clamp3_lora.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for cls in (TrainConfig, SpeedConfig):
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            if field.name == "speed":     # the SpeedConfig itself: its fields are the flags
                continue
            assert "--" + field.name.replace("_", "-") in text, field.name
            assert field.name in docs, f"{field.name} has no help text in config.py"
            assert " ".join(docs[field.name].split()[:6]) in text, field.name  # a '%' in it is shown as is
    assert "3-6% faster" in text
    # the speed switches come last, in a group of their own, after the settings users need
    assert text.index("speed switches:") > text.index("--dist-timeout-s")
    assert text.index("--fast-encoder, --no-fast-encoder") > text.index("speed switches:")
    # the usage examples keep a line each (not run together into one paragraph)
    assert "\n    python train_clamp3_lora.py --resume auto      # continue after an interruption\n" in result.stdout


def test_boolean_flags_switch_both_ways():
    assert parse_config(["--no-text-ahead"]).speed.text_ahead is False
    assert parse_config(["--fp32-residual"]).speed.fp32_residual is True
    assert parse_config([]) == TrainConfig()


def test_music_root_repeats_and_defaults_to_none():
    assert parse_config([]).music_root == []
    assert parse_config(["--music-root", "a", "--music-root", "/b"]).music_root == ["a", "/b"]
    assert parse_config(["--new-global-batch"]).new_global_batch is True


def test_an_unknown_device_is_one_clear_line():
    import pytest
    from clamp3_lora.distributed import resolve_device
    from clamp3_lora.errors import Clamp3LoraError
    with pytest.raises(Clamp3LoraError, match=r"unknown --device 'gpu': use cuda \(the default; cuda:N for one GPU\) or cpu"):
        resolve_device("gpu")


def test_demo_paths_work_from_any_folder(tmp_path, monkeypatch):
    """--demo started outside the repository root still finds the bundled demo (paths resolved
    against the repository the package lives in); from the root they stay short and relative."""
    from clamp3_lora.config import demo_overrides
    assert demo_overrides()["abc_train"] == "demo/abc_train.jsonl"
    monkeypatch.chdir(tmp_path)
    settings = demo_overrides()
    for name in ("weights", "text_model", "abc_train", "abc_eval", "mtf_train", "mtf_eval"):
        assert Path(settings[name]).is_absolute() and Path(settings[name]).exists(), name
