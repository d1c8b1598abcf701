"""The preflight as a user runs it (`python test_lora_setup.py ...` in a real process), against a good
set-up and broken ones, plus its estimates as plain functions.

The broken set-ups are built in a temporary folder: own ABC files and JSON Lines data, an own small
tokenizer (built with the `tokenizers` library) and the random tiny model preset. The runs are started
together (they are independent processes) so that the module stays quick; the other broken set-ups run
`preflight.main` in this process, which is all the script does after parsing the flags.
"""
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from clamp3_lora import preflight
from clamp3_lora.cli import parse_config
from config import TrainConfig
from trainer_fixtures import word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "test_lora_setup.py"
TIMEOUT_S = 240

TUNES = [
    "X:{n}\nT:Tune {n}\nM:4/4\nL:1/8\nK:D\n|:DEFG ABcd|efge dcBA|{note}2 F2 E2 D2:|\n",
    "X:{n}\nT:Reel {n}\nM:6/8\nL:1/8\nK:G\nGAB cde|{note}ed cBA|GAB cBA|G3 G3|]\n",
]
WORDS = ("tune reel jig hornpipe major minor slow fast dance irish collection air in a the "
         "of from is by with transcribed melody").split()


def build_tokenizer(folder):
    """A small XLM-R-like word-level tokenizer (<s>=0, <pad>=1, </s>=2, <unk>=3) saved in `folder`."""
    word_tokenizer(WORDS + [str(n) for n in range(20)]).save_pretrained(str(folder))


def write_records(path, records):
    """A JSON Lines file; str items are written as they are (to make broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small good set-up plus the pieces of broken ones; returns a dict of paths."""
    base = tmp_path_factory.mktemp("preflight")
    build_tokenizer(base / "tokenizer")
    (base / "abc").mkdir()
    good = []
    for n in range(10):
        name = f"abc/tune{n}.abc"
        (base / name).write_text(TUNES[n % 2].format(n=n, note="ABcdefg"[n % 7]), encoding="utf-8")
        good.append({"filepaths": [name], "analysis": f"a {['slow', 'fast'][n % 2]} irish tune {n}",
                     "title": f"tune {n}", "tags": ["reel" if n % 2 else "jig"]})
    write_records(base / "train.jsonl", good[:8])
    write_records(base / "eval.jsonl", good[8:] + good[:2])
    bad = list(good[:8])
    bad.insert(2, '{"filepaths": ["abc/tune0.abc"], "analysis": ')             # line 3: invalid JSON
    bad.insert(5, {"filepaths": ["abc/nowhere.abc"], "analysis": "lost tune"})  # line 6: missing file
    write_records(base / "bad.jsonl", bad)
    (base / "not_a_folder").write_text("a regular file where the output folder should be\n")
    return {"base": base, "tokenizer": base / "tokenizer", "train": base / "train.jsonl",
            "eval": base / "eval.jsonl", "bad": base / "bad.jsonl", "file": base / "not_a_folder"}


def own_setup_args(setup, out, train=None, **flags):
    """Flags of a small CPU run on the set-up of the `setup` fixture (flags override, e.g. weights=)."""
    args = {"preset": "tiny", "text_model": setup["tokenizer"], "stages": "abc",
            "abc_train": train or setup["train"], "abc_eval": setup["eval"], "device": "cpu",
            "batch_size": 4, "max_patches": 64, "num_workers": 0, "output_dir": out}
    args.update(flags)
    argv = []
    for name, value in args.items():
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def preflight_process(argv, env=None):
    """Run `python test_lora_setup.py ARGV` from the repository root; (exit code, output)."""
    full_env = dict(os.environ, PYTHONIOENCODING="utf-8", NO_COLOR="1", HF_HUB_OFFLINE="1",
                    TOKENIZERS_PARALLELISM="false", **(env or {}))
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT_S)
    return done.returncode, done.stdout + done.stderr


def preflight_in_process(argv):
    """What the script does, in this process (quicker for the variants): (exit code, report)."""
    out = io.StringIO()
    code = preflight.main(parse_config(argv), out=out, argv=argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def runs(setup):
    """The preflight runs in real processes, started together; {name: future of (code, output)}."""
    out = setup["base"] / "out"
    plans = {
        "good": own_setup_args(setup, out),
        "missing_weights": own_setup_args(setup, out, preset="", weights=setup["base"] / "nope.pth"),
    }
    if (ROOT / "demo" / "abc_train.jsonl").exists():
        plans["demo"] = ["--demo", "--device", "cpu", "--output-dir", str(setup["base"] / "demo_out")]
    pool = ThreadPoolExecutor(max_workers=len(plans))
    futures = {name: pool.submit(preflight_process, argv) for name, argv in plans.items()}
    yield futures
    pool.shutdown(wait=True)


def result(runs, name):
    """(exit code, output) of one run."""
    return runs[name].result(timeout=TIMEOUT_S)


def marked(output, mark):
    """The check lines that carry `mark` (✓, ⚠ or ✗)."""
    return [line.strip() for line in output.splitlines() if line.strip().startswith(mark)]


def test_good_setup_is_ready(runs):
    code, output = result(runs, "good")
    assert code == 0, output
    assert marked(output, "✗") == [], output
    assert "Ready to train" in output
    assert any(line.startswith("✓ ABC step: loss") for line in marked(output, "✓")), output
    assert "random tiny model (preset 'tiny'" in output
    assert "0 failed" in output


def test_demo_setup_is_ready(runs):
    if "demo" not in runs:
        pytest.skip("demo/ not present")
    code, output = result(runs, "demo")
    assert code == 0, output
    assert marked(output, "✗") == [], output
    for stage in ("ABC", "MTF"):
        assert any(line.startswith(f"✓ {stage} step: loss") for line in marked(output, "✓")), output


def test_an_earlier_run_and_the_cpu_precision_are_named(setup, tmp_path):
    """The preflight does not promise a command that would refuse: with checkpoints of an earlier run
    in the logs folder it warns and prints the command with --resume auto (naming --resume fresh);
    on the CPU it reports the fp32 the trainer will use, not the bf16 default."""
    out = tmp_path / "out"
    (out / "logs" / "lora").mkdir(parents=True)
    (out / "logs" / "lora" / "ABC_checkpoint_epoch1.pth").write_bytes(b"x")
    code, output = preflight_in_process(own_setup_args(setup, out))
    assert code == 0, output
    assert "earlier run" in output and "needs --resume auto (continue it) or --resume fresh" in output
    assert output.rstrip().splitlines()[-1].startswith("✓ Ready to train: python train_clamp3_lora.py")
    assert "--resume auto   (continues the earlier run; --resume fresh" in output
    assert "precision fp32 (every CPU run is fp32)" in output and "precision bf16" not in output


def test_missing_weights_fail_naming_the_file(runs, setup):
    code, output = result(runs, "missing_weights")
    assert code != 0
    failures = marked(output, "✗")
    assert any("base model" in line and "nope.pth" in line and "not found" in line for line in failures), output
    assert "Fix the ✗ items first" in output


def test_bad_data_lines_within_the_limit_warn(setup):
    argv = own_setup_args(setup, setup["base"] / "out", train=setup["bad"], bad_record_limit=0.5)
    code, output = preflight_in_process(argv)
    assert code == 0, output
    assert any(line.startswith("⚠ ABC train") and "2 bad" in line for line in marked(output, "⚠")), output
    assert f"{setup['bad']}:3: invalid_json" in output
    assert f"{setup['bad']}:6: missing_file" in output
    assert "invalid_json 1, missing_file 1" in output


def test_bad_data_lines_over_the_limit_fail(setup):
    argv = own_setup_args(setup, setup["base"] / "out", train=setup["bad"], bad_record_limit=0.1)
    code, output = preflight_in_process(argv)
    assert code != 0
    assert any(line.startswith("✗ ABC train") and "bad-record limit" in line
               for line in marked(output, "✗")), output
    assert f"{setup['bad']}:3: invalid_json" in output
    assert f"{setup['bad']}:6: missing_file" in output


def test_unwritable_output_folder_fails(setup):
    # The output "folder" is a regular file: no user, root included, can create folders inside it.
    code, output = preflight_in_process(own_setup_args(setup, setup["file"]))
    assert code != 0
    failures = marked(output, "✗")
    assert any(str(setup["file"] / "adapters") in line and "not writable" in line for line in failures), output
    assert any(str(setup["file"] / "logs" / "lora") in line for line in failures), output


def test_no_gpu_with_the_default_device_fails(setup, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, output = preflight_in_process(own_setup_args(setup, setup["base"] / "out", device=None))
    assert code != 0
    assert any(line.startswith("✗ CUDA: no CUDA GPU") for line in marked(output, "✗")), output
    assert "--device cpu" in output
    # the dry step still runs, on the CPU, to check the rest of the set-up
    assert any(line.startswith("✓ ABC step: loss") and "GPU is missing" in line
               for line in marked(output, "✓")), output


def test_batch_size_hint_scales_with_memory():
    gb = 1024 ** 3
    # model 2 GB, a batch of 8 pieces of 128 patches peaks at 4 GB -> 0.25 GB/sample, 1 GB at 512
    assert preflight.batch_size_hint(8, 128, 512, 2 * gb, 4 * gb, 80 * gb) == 70
    assert preflight.batch_size_hint(8, 512, 512, 2 * gb, 4 * gb, 80 * gb) == 280


def test_checkpoint_estimate_counts_kept_checkpoints():
    cfg = TrainConfig(keep_epoch_checkpoints=3, checkpoints_per_epoch=10)
    params = 1_000_000
    per_stage = (3 + 2 + 1) * params * 12 + params * 4
    assert preflight.checkpoint_bytes(cfg, 2, params) == 2 * per_stage + preflight.DISK_MARGIN_BYTES


def test_minimum_versions_are_read_from_requirements(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\ntorch>=2.4\nUnidecode >= 1.3  # text\npytest\n")
    assert preflight.minimum_versions(requirements) == {"torch": "2.4", "unidecode": "1.3"}
    assert preflight.version_tuple("2.13.0+cpu") > preflight.version_tuple("2.4")
    assert preflight.version_tuple("0.9.1") < preflight.version_tuple("0.13")


def test_a_preset_wins_over_weights_as_in_the_trainer():
    assert preflight.uses_preset(TrainConfig(preset="tiny"))
    assert preflight.uses_preset(TrainConfig(preset="tiny", weights="my.pth"))
    assert not preflight.uses_preset(TrainConfig())


def test_corrupt_checkpoint_fails_with_the_reason(setup, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"this is not a torch checkpoint" * 10)
    code, output = preflight_in_process(own_setup_args(setup, tmp_path / "out", preset="", weights=broken))
    assert code != 0
    assert any(line.startswith("✗ base model") and "broken.pth" in line for line in marked(output, "✗")), output


def test_official_layout_checkpoint_loads(setup, golden, tmp_path):
    weights = golden / "tiny_official_checkpoint.pth"
    code, output = preflight_in_process(own_setup_args(setup, tmp_path / "out", preset="", weights=weights))
    assert code == 0, output
    assert any(line.startswith("✓ base model") and "keys and sizes match" in line
               for line in marked(output, "✓")), output
    assert any(line.startswith("✓ ABC step: loss") for line in marked(output, "✓")), output


class FakeGpu:
    """What torch.cuda.get_device_properties returns, for the checks that read it."""
    name = "Fake GPU 80GB"
    major, minor = 8, 0
    total_memory = 80 * 1024 ** 3


def fake_cuda(monkeypatch, bf16):
    """Make torch report one GPU (without touching a real one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: FakeGpu())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * 1024 ** 3, 80 * 1024 ** 3))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)


@pytest.mark.parametrize("bf16", [True, False])
def test_gpu_checks_report_name_memory_and_bf16(monkeypatch, bf16):
    fake_cuda(monkeypatch, bf16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = io.StringIO()
    report = preflight.Report(out)
    device = preflight.check_hardware(report, TrainConfig())
    text = out.getvalue()
    assert device == torch.device("cuda", 0)
    assert "✓ GPU: cuda:0: Fake GPU 80GB, 80.0 GB total, 70.0 GB free" in text
    assert report.failed is not bf16
    if not bf16:
        assert "✗ bf16" in text and "--precision fp16" in text


def test_several_processes_need_nccl(monkeypatch):
    fake_cuda(monkeypatch, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    out = io.StringIO()
    report = preflight.Report(out)
    preflight.check_hardware(report, TrainConfig())
    assert report.failed   # no NCCL in a CPU build, and 2 processes on 1 GPU
    assert "✗ NCCL" in out.getvalue()
