"""Helpers of the trainer tests: a tiny tokenizer, small ABC/MTF data sets, and running the real
`train_clamp3_lora.py` in a subprocess (CPU, tiny preset) with a timeout."""
import json
import os
import random
import signal
import subprocess
import time
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"w{i}" for i in range(200)]
NOTES = "CDEFGABcdefgab"


def word_tokenizer(words):
    """An in-memory word-level tokenizer with XLM-R's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3),
    then `words` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", pad_token="<pad>", unk_token="<unk>")


def make_tokenizer(folder):
    """word_tokenizer(WORDS), saved in `folder`."""
    word_tokenizer(WORDS).save_pretrained(str(folder))
    return Path(folder)


def abc_tune(rng, number):
    bars = " | ".join("".join(rng.choice(NOTES) for _ in range(rng.randint(3, 8))) for _ in range(rng.randint(4, 12)))
    return f"X:{number}\nT:Tune {number}\nM:4/4\nL:1/8\nK:C\nV:1 nm=\"Piano\"\n{bars} |]\n"


def mtf_piece(rng):
    lines = ["ticks_per_beat 480"]
    for _ in range(rng.randint(5, 30)):
        lines.append(f"note_on {rng.randint(0, 480)} 0 {rng.randint(40, 90)} {rng.randint(30, 100)}")
    lines.append(f"program_change 0 0 {rng.randint(0, 100)}")
    return "\n".join(lines) + "\n"


def caption(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))


def write_split(folder, name, kind, count, rng):
    """A JSON Lines file of `count` records with their music files; returns its path."""
    music_dir = folder / f"{name}_files"
    music_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        if kind == "abc":
            path = music_dir / f"{i}.abc"
            path.write_text(abc_tune(rng, i))
            lines.append({"filepaths": [f"{name}_files/{i}.abc"], "analysis": caption(rng),
                          "title": caption(rng), "genres": [rng.choice(WORDS)]})
        else:
            path = music_dir / f"{i}.mtf"
            path.write_text(mtf_piece(rng))
            lines.append({"location": f"{name}_files/{i}.mtf", "caption": caption(rng)})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data


def make_workspace(folder, abc_train=16, abc_eval=6, mtf_train=12, mtf_eval=6, seed=0):
    """Tokenizer and the four data files under `folder`; returns {name: path}."""
    folder = Path(folder)
    rng = random.Random(seed)
    return {
        "tokenizer": make_tokenizer(folder / "tokenizer"),
        "abc_train": write_split(folder, "abc_train", "abc", abc_train, rng),
        "abc_eval": write_split(folder, "abc_eval", "abc", abc_eval, rng),
        "mtf_train": write_split(folder, "mtf_train", "mtf", mtf_train, rng),
        "mtf_eval": write_split(folder, "mtf_eval", "mtf", mtf_eval, rng),
    }


def trainer_args(workspace, output, **overrides):
    """Command-line flags of a small CPU run of the tiny model; overrides are flag=value pairs
    (underscores allowed; a value None drops the flag)."""
    settings = {
        "device": "cpu", "preset": "tiny", "text_model": workspace["tokenizer"],
        "abc_train": workspace["abc_train"], "abc_eval": workspace["abc_eval"],
        "mtf_train": workspace["mtf_train"], "mtf_eval": workspace["mtf_eval"],
        "output_dir": output, "stages": "abc", "epochs": 2, "batch_size": 4, "num_workers": 0,
        "checkpoints_per_epoch": 2, "max_patches": 24, "max_text_tokens": 24, "warmup_steps": 2,
        "lr": 5e-3, "seed": 1,
    }
    settings.update(overrides)
    args = []
    for name, value in settings.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def trainer_env(extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CLAMP3_LORA_FAULTS", None)
    env.pop("CLAMP3_LORA_TEST_NO_RNG_RESTORE", None)
    env.update(extra or {})
    return env


def run_trainer(args, env=None, timeout=180):
    """Run `python train_clamp3_lora.py ARGS` in the project root; CompletedProcess with text output."""
    return subprocess.run([sys.executable, "train_clamp3_lora.py", *map(str, args)], cwd=ROOT,
                          env=trainer_env(env), capture_output=True, text=True, timeout=timeout)


def start_trainer(args, env=None):
    """Start `python train_clamp3_lora.py ARGS` without waiting (for signals sent from outside)."""
    return subprocess.Popen([sys.executable, "train_clamp3_lora.py", *map(str, args)], cwd=ROOT,
                            env=trainer_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def torchrun_command(args, nproc=2):
    """`torchrun --standalone --nproc_per_node=NPROC train_clamp3_lora.py ARGS` (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "train_clamp3_lora.py", *map(str, args)]


def run_torchrun(args, nproc=2, env=None, timeout=180):
    """Run the trainer under torchrun with `nproc` processes; CompletedProcess with text output.
    subprocess.TimeoutExpired (the launcher killed) when it is not done within `timeout` seconds."""
    return subprocess.run(torchrun_command(args, nproc), cwd=ROOT, env=trainer_env(env), capture_output=True,
                          text=True, timeout=timeout)


def start_torchrun(args, nproc=2, env=None):
    """Start the trainer under torchrun without waiting, in a session of its own (so that every
    process it starts can be found, and killed by stop_session, afterwards)."""
    return subprocess.Popen(torchrun_command(args, nproc), cwd=ROOT, env=trainer_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def torchrun_workers(launcher, nproc=2, timeout=60):
    """Pids of the trainer processes a running torchrun launcher started. torchrun starts each in a
    session of its own, so they must be looked up as its children while it runs."""
    deadline = time.time() + timeout
    while True:
        found = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        if len(found) >= nproc or launcher.poll() is not None or time.time() > deadline:
            return [int(pid) for pid in found]
        time.sleep(0.05)


def _alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def session_survivors(process, workers=()):
    """Ids of the processes still alive in the session `process` started (start_torchrun), and of
    the `workers` (torchrun_workers) still alive."""
    found = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True)
    return found.stdout.split() + [str(pid) for pid in workers if _alive(pid)]


def stop_session(process, workers=()):
    """SIGKILL every process of the session `process` started and every worker, if any is left
    (test clean-up)."""
    if subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True).returncode == 0:
        os.killpg(process.pid, signal.SIGKILL)
    for pid in workers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def log_dir(output):
    return Path(output) / "logs" / "lora"


def read_history(output, stage="ABC"):
    return json.loads((log_dir(output) / f"{stage}_history.json").read_text())


def read_steps(output, stage="ABC"):
    path = log_dir(output) / f"{stage}_steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def adapter_weights(output, adapter="lora_abc_adapter"):
    from safetensors.torch import load_file
    return load_file(str(Path(output) / "adapters" / adapter / "adapter_model.safetensors"))


def max_difference(a, b):
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def explain(result):
    """Both output streams of a finished subprocess, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"


def reference_run(tmp_path_factory):
    """(workspace, output) of the uninterrupted reference run that the resume, signal and stage
    tests compare against: ABC only, 2 epochs of 4 batches, 2 checkpoints per epoch. Run once per
    test session (cached in the session's temporary folder)."""
    root = tmp_path_factory.getbasetemp() / "trainer_reference"
    workspace = {"tokenizer": root / "tokenizer", "abc_train": root / "abc_train.jsonl",
                 "abc_eval": root / "abc_eval.jsonl", "mtf_train": root / "mtf_train.jsonl",
                 "mtf_eval": root / "mtf_eval.jsonl"}
    output = root / "output"
    if not (root / "done").exists():
        root.mkdir(parents=True, exist_ok=True)
        workspace = make_workspace(root)
        result = run_trainer(trainer_args(workspace, output))
        assert result.returncode == 0, explain(result)
        (root / "done").touch()
    return workspace, output


def final_lora(output, stage="ABC", epoch=2):
    """LoRA weights at the end of `epoch` (from its epoch checkpoint)."""
    return load_checkpoint(log_dir(output) / f"{stage}_checkpoint_epoch{epoch}.pth")["lora"]


def comparable_history(output, stage="ABC"):
    """The history without wall-clock fields (time, timestamps, throughput, memory)."""
    volatile = {"time", "timestamp", "train_time", "samples_per_s", "gpu_memory"}
    return [{k: v for k, v in entry.items() if k not in volatile} for entry in read_history(output, stage)]
