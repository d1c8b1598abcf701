"""The preflight (`python test_lora_setup.py`): check everything a training run needs, before it starts.

Each check prints one line, ✓ (passed), ⚠ (warning: training can start, but look) or ✗ (failed:
training would fail), with a one-line reason and, where useful, indented details. The exit code is 0
only when nothing failed. The checks, top to bottom:

    environment   Python and library versions (minimums from requirements.txt)
    hardware      CUDA, GPU name and memory, bf16 support; NCCL when WORLD_SIZE > 1
    model         tokenizer, base checkpoint (keys and sizes) or preset, tokenizer fits the model,
                  LoRA adapter can be added
    data          every data file of the selected stages, bad records listed as file:line: reason
    outputs       OUTPUT_DIR/adapters and OUTPUT_DIR/logs/lora writable, free disk for checkpoints
    dry step      one forward + backward pass on a real training batch per stage (the trainer's own
                  step code), peak memory and a batch-size hint

The flags are the trainer's (every TrainConfig field), so the preflight checks exactly the set-up a
`python train_clamp3_lora.py` with the same flags would use.

Project modules that import torch, transformers or peft are imported inside the checks, after the
library check, so that a missing library is reported instead of crashing the preflight.
"""
import dataclasses
import importlib.metadata
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path


MIN_PYTHON = (3, 9)
LIBRARIES = ("torch", "transformers", "peft", "tqdm", "mido", "unidecode", "safetensors",
             "matplotlib", "tokenizers", "numpy")
"""Libraries a training run imports (their minimum versions are read from requirements.txt)."""
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
STAGES = ("abc", "mtf")
SCHEDULES = ("cosine", "constant")
SHOWN_BAD_RECORDS = 20
GB = 1024 ** 3
MB = 1024 ** 2
DISK_MARGIN_BYTES = 200 * MB
"""Room on top of the checkpoint estimate: logs, PNGs, history, adapter records."""
GPU_USABLE_SHARE = 0.9
"""Share of a GPU's memory the batch-size hint plans to use (the rest: fragmentation, other work)."""
CPU_FALLBACK_BATCH = 2
"""Batch size of the dry step when it runs on the CPU only because the GPU is missing."""

MARKS = {"ok": "✓", "warn": "⚠", "fail": "✗", "skip": "-"}
COLOURS = {"ok": "\033[32m", "warn": "\033[33m", "fail": "\033[31m", "skip": "\033[2m"}


class Report:
    """Prints each check as it completes and counts the outcomes."""

    def __init__(self, out=None, colour=None):
        self.out = out if out is not None else sys.stdout
        if colour is None:
            colour = hasattr(self.out, "isatty") and self.out.isatty() and "NO_COLOR" not in os.environ
        self.colour = colour
        self.counts = {"ok": 0, "warn": 0, "fail": 0, "skip": 0}

    def section(self, title):
        """A heading for a group of checks."""
        self.print(f"\n{title}")

    def print(self, text):
        """One line of output, flushed (the checks can take a while)."""
        print(text, file=self.out, flush=True)

    def add(self, status, name, message, details=()):
        """Record one outcome: status is ok, warn, fail or skip."""
        self.counts[status] += 1
        mark = MARKS[status]
        if self.colour:
            mark = f"{COLOURS[status]}{mark}\033[0m"
        self.print(f"  {mark} {name}: {message}")
        for line in details:
            self.print(f"      {line}")

    def ok(self, name, message, details=()):
        """✓: the check passed."""
        self.add("ok", name, message, details)

    def warn(self, name, message, details=()):
        """⚠: training can start, but the user should look at this."""
        self.add("warn", name, message, details)

    def fail(self, name, message, details=()):
        """✗: training would fail (or must not start) until this is fixed."""
        self.add("fail", name, message, details)

    def skip(self, name, message):
        """-: the check could not run because an earlier one failed."""
        self.add("skip", name, message)

    @property
    def failed(self):
        """Whether any check failed."""
        return self.counts["fail"] > 0

    def summary(self, command):
        """The closing lines (`command` starts the training); returns the exit code (0 only when
        nothing failed)."""
        c = self.counts
        line = f"{c['ok']} passed, {c['warn']} warnings, {c['fail']} failed"
        if c["skip"]:
            line += f", {c['skip']} skipped"
        self.print("\n" + "=" * 72)
        self.print(line)
        if self.failed:
            self.print(f"{MARKS['fail']} Fix the {MARKS['fail']} items first.")
        else:
            self.print(f"{MARKS['ok']} Ready to train: {command}")
        return 1 if self.failed else 0


# --------------------------------------------------------------------------------------------
# environment


def minimum_versions(path=REQUIREMENTS):
    """{library: minimum version} from `name>=version` lines of requirements.txt ({} if absent)."""
    minimums = {}
    if not path.is_file():
        return minimums
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^\s,;#]*)", line)
        if match:
            minimums[match.group(1).lower()] = match.group(2)
    return minimums


def version_tuple(text):
    """Leading numeric components of a version string: "2.13.0+cpu" -> (2, 13, 0)."""
    parts = []
    for piece in re.split(r"[.+\-]", text):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def check_environment(report):
    """Python and library versions; returns False when a library is missing (nothing else can run)."""
    report.section("Environment")
    python = platform.python_version()
    if sys.version_info[:2] < MIN_PYTHON:
        report.fail("Python", f"{python} is too old; Python >= {'.'.join(map(str, MIN_PYTHON))} is needed")
    else:
        report.ok("Python", f"{python} ({sys.executable})")
    minimums = minimum_versions()
    complete = True
    for library in LIBRARIES:
        try:
            found = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            report.fail(library, "not installed (pip install -r requirements.txt)")
            complete = False
            continue
        minimum = minimums.get(library)
        if minimum and version_tuple(found) < version_tuple(minimum):
            report.warn(library, f"{found} is older than the tested minimum {minimum} "
                                 f"(pip install -U '{library}>={minimum}')")
        else:
            report.ok(library, found)
    return complete


def check_config(report, cfg):
    """Values of the configuration that would stop a run at once; returns the selected stages."""
    from . import precision
    from .metrics import METRIC_NAMES

    stages = [s.strip().lower() for s in cfg.stages.split(",") if s.strip()]
    problems = []
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        problems.append(f"--stages {cfg.stages!r}: use abc, mtf or abc,mtf")
    if cfg.precision not in precision.PRECISIONS:
        problems.append(f"--precision {cfg.precision!r}: use one of {', '.join(precision.PRECISIONS)}")
    if cfg.schedule not in SCHEDULES:
        problems.append(f"--schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    if cfg.best_metric not in ("eval_loss",) + METRIC_NAMES:
        problems.append(f"--best-metric {cfg.best_metric!r}: use eval_loss or one of {', '.join(METRIC_NAMES)}")
    if not 0.0 <= cfg.bad_record_limit <= 1.0:
        problems.append(f"--bad-record-limit {cfg.bad_record_limit}: a share between 0 and 1")
    for name in ("batch_size", "grad_accum", "epochs", "lora_r", "max_patches", "max_text_tokens"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if problems:
        report.fail("configuration", f"{len(problems)} invalid setting(s)", problems)
    else:
        used = cfg.precision if cfg.device.startswith("cuda") else "fp32 (every CPU run is fp32)"
        report.ok("configuration", f"stages {','.join(stages)}, device {cfg.device}, precision "
                                   f"{used}, batch {cfg.batch_size} x {cfg.grad_accum} accumulation")
    return [s for s in stages if s in STAGES]


# --------------------------------------------------------------------------------------------
# hardware


def check_hardware(report, cfg):
    """CUDA, GPU, bf16 and NCCL; returns the torch.device the dry step should use (None: no device)."""
    import torch

    report.section("Hardware")
    wants_cuda = cfg.device.startswith("cuda")
    if not wants_cuda and cfg.device != "cpu":
        report.fail("device", f"--device {cfg.device!r}: use cuda (default), cuda:N or cpu")
        return None
    if not torch.cuda.is_available():
        reason = f"no CUDA GPU visible to torch {torch.__version__}"
        if torch.version.cuda is None:
            reason += " (a CPU-only torch build: install the CUDA build for your driver)"
        if wants_cuda:
            report.fail("CUDA", reason, ["training needs a GPU; run on a GPU machine, or pass "
                                         "--device cpu for a (slow) CPU run such as the demo"])
            return None
        report.warn("CUDA", reason + "; training on the CPU (--device cpu) is slow, fine for the demo and tests")
        return torch.device("cpu")

    count = torch.cuda.device_count()
    if not wants_cuda:
        report.warn("device", f"--device cpu although {count} GPU(s) are available; training will be slow")
        return torch.device("cpu")
    device = torch.device(cfg.device)
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    if device.index >= count:
        report.fail("CUDA", f"{device} requested but only {count} GPU(s) are visible")
        return None
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    report.ok("CUDA", f"torch {torch.__version__}, CUDA {torch.version.cuda}, {count} GPU(s) visible")
    message = (f"{device}: {props.name}, {total / GB:.1f} GB total, {free / GB:.1f} GB free, "
               f"compute capability {props.major}.{props.minor}")
    if free < 0.5 * total:
        report.warn("GPU", message + " — more than half of its memory is in use by other processes")
    else:
        report.ok("GPU", message)
    bf16 = torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not bf16:
        report.fail("bf16", f"{props.name} does not support bf16; pass --precision fp16 (with a GradScaler)")
    else:
        report.ok("bf16", ("supported" if bf16 else "not supported")
                  + f"; training uses --precision {cfg.precision}")
    check_distributed(report, count)
    return device


def check_distributed(report, gpu_count):
    """NCCL and enough GPUs when this is a multi-process run (WORLD_SIZE > 1)."""
    import torch.distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        report.ok("distributed", "single process (WORLD_SIZE unset or 1); use torchrun for several GPUs")
        return
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        report.fail("NCCL", f"WORLD_SIZE={world} but this torch build has no NCCL backend")
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local > gpu_count:
        report.fail("NCCL", f"{local} processes on this node but only {gpu_count} GPU(s) visible")
        return
    version = torch.cuda.nccl.version()
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    report.ok("NCCL", f"available (NCCL {version}), "
                      f"WORLD_SIZE={world}, {local} process(es) on this node")


# --------------------------------------------------------------------------------------------
# model


def uses_preset(cfg):
    """Whether the run builds a random preset model instead of loading --weights: as the trainer
    does, a preset (--preset, or --demo) wins and --weights is not read."""
    return bool(cfg.preset)


def check_tokenizer(report, cfg):
    """Load the text tokenizer (local folder or hub id); returns it or None."""
    from .errors import Clamp3LoraError
    from .model import load_tokenizer
    from .weights import hub_unreachable

    report.section("Model")
    start = time.perf_counter()
    local = Path(cfg.text_model).is_dir()
    if not local and not tokenizer_cached(cfg.text_model):
        unreachable = hub_unreachable()
        if unreachable:
            report.fail("tokenizer", f"{cfg.text_model!r} is not a folder here ({Path.cwd()}), not in the "
                                     f"Hugging Face cache, and the hub cannot be reached ({unreachable})",
                        ["offline: download the tokenizer once on a machine with network access "
                         f"(hf download {cfg.text_model} --local-dir tokenizer/) and pass "
                         "--text-model tokenizer/, or fill the cache there and copy ~/.cache/huggingface"])
            return None
    try:
        tokenizer = load_tokenizer(cfg.text_model)
    except Clamp3LoraError as error:
        report.fail("tokenizer", str(error))
        return None
    where = "local folder" if local else "Hugging Face hub id (cached or downloaded)"
    report.ok("tokenizer", f"{cfg.text_model} ({where}): {len(tokenizer)} tokens, pad id "
                           f"{tokenizer.pad_token_id}, sep {tokenizer.sep_token!r}, "
                           f"{time.perf_counter() - start:.1f}s")
    return tokenizer


def tokenizer_cached(name):
    """Whether the Hugging Face cache holds the tokenizer config of hub id `name`."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "tokenizer_config.json")
    except HFValidationError:
        return False
    return isinstance(found, str)


def weights_source(report, name):
    """For a hub name (c2, saas, REPO:FILE): say where the weights come from and whether they are
    cached, fetch them when not (the dry step needs them); the local path, or None after a failure
    (reported). A local path: None (the caller checks it)."""
    from . import weights
    from .errors import Clamp3LoraError
    found = weights.hub_file(name)
    if found is None:
        return None
    repo, filename = found
    cached = weights.cached(name)
    if cached:
        report.ok("weights", f"{name} = hub file {repo}:{filename}, in the Hugging Face cache: {cached}")
        return cached
    unreachable = weights.hub_unreachable()
    if not unreachable:
        size, free = weights.download_plan(name)
        if size is not None and size > free:
            report.fail("weights", f"{name} = hub file {repo}:{filename} needs {size / GB:.2f} GB; the disk of the "
                                   f"Hugging Face cache has {free / GB:.2f} GB free (set HF_HOME to a larger disk)")
            return None
        report.ok("disk for weights", f"{name}: {'?' if size is None else f'{size / GB:.2f}'} GB to download, "
                                      f"{free / GB:.1f} GB free on the cache's disk")
    start = time.perf_counter()
    try:
        path = weights.resolve(name)
    except Clamp3LoraError as error:
        report.fail("weights", str(error))
        return None
    report.ok("weights", f"{name} = hub file {repo}:{filename}: downloaded in {time.perf_counter() - start:.0f}s "
                         f"({Path(path).stat().st_size / GB:.2f} GB of disk) into the Hugging Face cache: {path}")
    return path


def check_model(report, cfg, tokenizer):
    """Load the base checkpoint (or build the preset), check the tokenizer fits it and that a LoRA
    adapter can be added; returns the model (with the adapter, on the CPU) or None."""
    import torch

    from .errors import Clamp3LoraError
    from .model import _check_tokenizer, load_model

    start = time.perf_counter()
    if uses_preset(cfg):
        torch.manual_seed(cfg.seed)
        try:
            model = load_model(None, text_model=None, preset=cfg.preset)
        except Clamp3LoraError as error:
            report.fail("base model", str(error))
            return None
        report.ok("base model", f"random {cfg.preset} model (preset '{cfg.preset}'; --weights not used), "
                                f"{count_parameters(model) / 1e6:.1f}M parameters")
    else:
        weights = Path(weights_source(report, cfg.weights) or cfg.weights)
        if not weights.is_file():
            report.fail("base model", f"checkpoint not found: {weights}",
                        [f"absolute path: {weights.resolve()}",
                         "pass --weights c2 (the official C2 release, fetched from the hub), saas, "
                         "REPO_ID:FILENAME or the path of a checkpoint (--preset tiny builds a random model for tests)"])
            return None
        try:
            model = load_model(str(weights), text_model=None)
        except Clamp3LoraError as error:
            report.fail("base model", str(error))
            return None
        c = model.config
        report.ok("base model", f"{weights} ({weights.stat().st_size / GB:.2f} GB) loaded in "
                                f"{time.perf_counter() - start:.1f}s: keys and sizes match",
                  [f"text: hidden {c.text_hidden_size}, {c.text_layers} layers, vocab {c.text_vocab_size}; "
                   f"symbolic: hidden {c.symbolic_hidden_size}, {c.symbolic_layers} layers, "
                   f"{c.symbolic_max_positions} patches; projection {c.projection_size}"])
    if tokenizer is not None:
        try:
            _check_tokenizer(tokenizer, model.config, cfg.text_model)
        except Clamp3LoraError as error:
            report.fail("tokenizer fits model", str(error))
        else:
            report.ok("tokenizer fits model", f"{len(tokenizer)} tokens <= text vocabulary "
                                              f"{model.config.text_vocab_size}, pad id {tokenizer.pad_token_id}")
            model.tokenizer = tokenizer
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    try:
        model.add_adapter(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets)
    except (ValueError, Clamp3LoraError) as error:
        report.fail("LoRA", f"cannot add the adapter (targets {cfg.lora_targets!r}): {error}")
        return None
    trainable = count_parameters(model, trainable_only=True)
    symbolic = count_parameters(model.symbolic_model)
    report.ok("LoRA", f"r={cfg.lora_r}, alpha={cfg.lora_alpha} on {', '.join(targets)}: {trainable:,} trainable "
                      f"parameters ({100 * trainable / max(symbolic, 1):.2f}% of the symbolic encoder)")
    return model


def count_parameters(module, trainable_only=False):
    """Number of parameters of a module (only those that require grad with trainable_only)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# data


def stage_files(cfg, stages):
    """[(stage, split, path)] of the data files the selected stages read."""
    return [(stage, split, getattr(cfg, f"{stage}_{split}")) for stage in stages for split in ("train", "eval")]


def check_data(report, cfg, stages):
    """Scan every data file of the selected stages; returns {(stage, split): ScanResult} of the usable ones."""
    from .data import scan_data_file
    from .errors import DataError

    report.section("Data")
    scans = {}
    progress = sys.stderr.isatty()
    for stage, split, path in stage_files(cfg, stages):
        name = f"{stage.upper()} {split}"
        start = time.perf_counter()
        try:
            # limit 1.0: get the full list of bad records; the configured limit is applied below
            result = scan_data_file(path, limit=1.0, check_music=True, progress=progress,
                                    max_patches=cfg.max_patches, music_roots=cfg.music_root)
        except DataError as error:
            first, *rest = str(error).splitlines()
            report.fail(name, first, rest)
            continue
        elapsed = time.perf_counter() - start
        head, *details = result.summary(show=SHOWN_BAD_RECORDS).splitlines()
        if result.bad_share > cfg.bad_record_limit:
            report.fail(name, f"{head}; more than the bad-record limit {cfg.bad_record_limit:.1%} "
                              f"(--bad-record-limit): training would stop", details)
        elif result.bad or result.dropped_paths:
            report.warn(name, f"{head}; within the limit {cfg.bad_record_limit:.1%}, "
                              f"bad records are skipped in training", details)
        else:
            report.ok(name, f"{head} ({elapsed:.1f}s)")
        if split == "eval" and len(result.records) < 2:
            report.warn(name, "fewer than 2 usable evaluation records: retrieval metrics mean nothing")
        scans[(stage, split)] = result
    return scans


# --------------------------------------------------------------------------------------------
# outputs


def output_folders(cfg):
    """The folders a run writes: adapters, then logs and checkpoints."""
    root = Path(cfg.output_dir)
    return [root / "adapters", root / "logs" / "lora"]


def check_outputs(report, cfg, stages, lora_parameters):
    """Create the output folders, really write and delete a probe file in each, and compare free disk
    with the checkpoints the run keeps."""
    report.section("Outputs")
    writable = []
    for folder in output_folders(cfg):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe_write(folder)
        except OSError as error:
            report.fail(str(folder), f"not writable: {error.strerror or error} ({type(error).__name__})",
                        [f"--output-dir {cfg.output_dir}: pick a folder you can write"])
            continue
        report.ok(str(folder), "created and writable (probe file written and deleted)")
        writable.append(folder)
    if not writable:
        report.skip("disk space", "no writable output folder")
        return
    if lora_parameters is None:
        report.skip("disk space", "needs the model (to count the LoRA parameters)")
        return
    needed = checkpoint_bytes(cfg, len(stages), lora_parameters)
    free = shutil.disk_usage(writable[-1]).free
    message = (f"{free / GB:.1f} GB free at {writable[-1]}; the run keeps about "
               f"{(needed - DISK_MARGIN_BYTES) / MB:.1f} MB of checkpoints "
               f"(+{DISK_MARGIN_BYTES / MB:.0f} MB margin)")
    if free < needed:
        report.fail("disk space", message + ": not enough")
    else:
        report.ok("disk space", message)


def probe_write(folder):
    """Write, fsync and delete a small file in `folder` (raises OSError when that is not possible)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".preflight-probe-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"clamp3-lora preflight probe\n")
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        os.unlink(name)


def checkpoint_bytes(cfg, stage_count, lora_parameters):
    """Disk a run needs for its checkpoints, with margin.

    One training checkpoint holds the LoRA weights and AdamW's two moments (fp32): 3 x 4 bytes per
    LoRA parameter (RNG states, history and config are small). Per stage the run keeps
    keep_epoch_checkpoints epoch checkpoints, the latest periodic one plus its successor while it is
    written, an emergency checkpoint and the best adapter (weights only).
    """
    per_checkpoint = lora_parameters * 4 * 3
    periodic = 2 if cfg.checkpoints_per_epoch > 0 else 0
    kept = cfg.keep_epoch_checkpoints + periodic + 1
    per_stage = kept * per_checkpoint + lora_parameters * 4
    return stage_count * per_stage + DISK_MARGIN_BYTES


# --------------------------------------------------------------------------------------------
# dry step


def check_dry_step(report, cfg, model, scans, stages, device):
    """One forward + backward pass per stage on a real training batch, with the trainer's step code."""
    report.section("Dry step")
    if model is None or model.tokenizer is None:
        report.skip("dry step", "needs the model and a tokenizer that fits it (see above)")
        return
    fallback = device is None
    if fallback:
        import torch
        device = torch.device("cpu")
    model.to(device)
    for stage in stages:
        scan = scans.get((stage, "train"))
        name = f"{stage.upper()} step"
        if scan is None:
            report.skip(name, "needs the training data (see above)")
            continue
        batch_size = min(cfg.batch_size, CPU_FALLBACK_BATCH) if fallback else cfg.batch_size
        dry_step(report, name, cfg, model, scan.records, device, batch_size, fallback)


def real_batch(cfg, tokenizer, records, batch_size):
    """A collated training batch of `batch_size` samples of the first records (repeated when the file
    has fewer), built exactly as the trainer builds them."""
    from .data import Collator, MusicTextDataset

    dataset = MusicTextDataset(records, tokenizer, train=True, max_patches=cfg.max_patches,
                               max_text_tokens=cfg.max_text_tokens,
                               instrument_removal_prob=cfg.instrument_removal_prob)
    items = [dataset[(i % len(dataset), cfg.seed + i)] for i in range(batch_size)]
    return Collator(tokenizer.pad_token_id)(items)


def dry_step(report, name, cfg, model, records, device, batch_size, fallback):
    """Run and report one training step (no optimizer update) on `device`."""
    import torch

    from . import precision, step
    from .errors import MusicFormatError

    try:
        batch = real_batch(cfg, model.tokenizer, records, batch_size)
    except (MusicFormatError, ValueError) as error:
        report.fail(name, f"cannot build a batch: {error}")
        return
    longest, tokens = batch["patches"].shape[1], batch["text_ids"].shape[1]
    cuda = device.type == "cuda"
    model.train()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if cuda else 0
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr)   # never stepped: a dry run
    dry = step.Step(model, optimizer, None, precision.grad_scaler(device, cfg.precision), cfg.precision,
                    cfg.max_grad_norm, device)
    start = time.perf_counter()
    try:
        result = dry.run(batch, last=False)    # the trainer's step: forward, guards, backward, no update
        if cuda:
            torch.cuda.synchronize(device)
    except (RuntimeError, ValueError) as error:
        model.zero_grad(set_to_none=True)
        first, *rest = str(error).splitlines() or [""]
        report.fail(name, f"forward+backward failed: {type(error).__name__}: {first}", rest[:10])
        return
    if result.skip == "oom":
        model.zero_grad(set_to_none=True)
        report.fail(name, f"out of GPU memory with batch {batch_size} (longest piece {longest} patches)",
                    [f"try --batch-size {max(1, batch_size // 2)} --grad-accum {cfg.grad_accum * 2} "
                     f"(same effective batch)"])
        return
    elapsed = time.perf_counter() - start
    value = math.nan if result.skip == "nonfinite_loss" else result.loss
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    where = f"batch {batch_size}, longest piece {longest} patches, text {tokens} tokens"
    if not math.isfinite(value):
        report.fail(name, f"loss is {value} ({where}): check the weights and --precision")
    elif any(g is None for g in grads) or not grads:
        report.fail(name, f"some LoRA parameters got no gradient ({where})")
    elif not all(torch.isfinite(g).all() for g in grads):
        report.fail(name, f"non-finite LoRA gradients ({where}): try --precision fp32 or bf16")
    elif not any(g.abs().sum() > 0 for g in grads):
        report.fail(name, f"all LoRA gradients are zero ({where})")
    elif cuda:
        report_gpu_step(report, name, cfg, device, batch_size, longest, value, elapsed, baseline, where)
    else:
        note = " (on the CPU, because the GPU is missing)" if fallback else ""
        report.ok(name, f"loss {value:.4f}, first forward+backward {elapsed:.2f}s{note} ({where}); "
                        f"peak process memory {peak_process_memory_gb():.2f} GB")
    model.zero_grad(set_to_none=True)


def report_gpu_step(report, name, cfg, device, batch_size, longest, loss, elapsed, baseline, where):
    """Report a GPU step with its peak memory and a hint on how large a batch fits."""
    import torch

    peak = torch.cuda.max_memory_allocated(device)
    total = torch.cuda.get_device_properties(device).total_memory
    fits = batch_size_hint(batch_size, longest, cfg.max_patches, baseline, peak, total)
    message = (f"loss {loss:.4f}, first forward+backward {elapsed:.2f}s ({where}); peak GPU memory "
               f"{peak / GB:.2f} GB of {total / GB:.1f} GB (model {baseline / GB:.2f} GB)")
    hint = (f"about {fits} samples of {cfg.max_patches} patches fit per GPU "
            f"(estimate from this step's peak memory, using {GPU_USABLE_SHARE:.0%} of the GPU)")
    if fits < batch_size:
        report.warn(name, message, [hint, f"batch {batch_size} may run out of memory on long pieces: "
                                          f"try --batch-size {max(1, fits)} with --grad-accum to keep "
                                          f"the effective batch"])
    else:
        report.ok(name, message, [hint])


def batch_size_hint(batch_size, longest, max_patches, baseline, peak, total):
    """How many samples of max_patches patches fit, from one step's memory: the step's memory above
    the model's (activations, gradients) grows about linearly with samples x patches."""
    per_sample = (peak - baseline) / batch_size * (max_patches / max(longest, 1))
    room = GPU_USABLE_SHARE * total - baseline
    if per_sample <= 0:
        return batch_size
    return max(0, int(room // per_sample))


def peak_process_memory_gb():
    """Peak resident memory of this process in GB (0 where the resource module is missing)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


# --------------------------------------------------------------------------------------------
# main


def main(cfg, out=None, argv=None):
    """Run every check for the set-up `cfg` describes; print a report; return the exit code
    (0: ready to train, 1: something failed). `argv` (default: sys.argv[1:]) only shapes the
    training command printed at the end."""
    report = Report(out)
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    report.print("CLaMP 3 LoRA preflight" + (" (demo set-up)" if cfg.demo else ""))
    report.print("settings: " + (", ".join(f"{k}={v!r}" for k, v in changed.items()) or "all defaults"))
    command = training_command(sys.argv[1:] if argv is None else argv)
    if not check_environment(report):
        report.print("\nA library is missing: the other checks need it.")
        return report.summary(command)
    stages = check_config(report, cfg)
    device = check_hardware(report, cfg)
    tokenizer = check_tokenizer(report, cfg)
    model = check_model(report, cfg, tokenizer)
    scans = check_data(report, cfg, stages)
    lora_parameters = count_parameters(model, trainable_only=True) if model is not None else None
    check_outputs(report, cfg, stages, lora_parameters)
    if earlier_run(report, cfg, stages):
        command += " --resume auto   (continues the earlier run; --resume fresh deletes its checkpoints and starts over)"
    check_dry_step(report, cfg, model, scans, stages, device)
    return report.summary(command)


def earlier_run(report, cfg, stages):
    """Whether the logs folder holds checkpoints of an earlier run that the command, without
    --resume, would refuse to overwrite (a warning names the choices)."""
    from . import checkpoint
    if cfg.resume:
        return False
    log_dir = Path(cfg.output_dir) / "logs" / "lora"
    found = [path.name for stage in stages for path in checkpoint.stage_checkpoints(log_dir, stage.upper())]
    found += [checkpoint.finished_path(log_dir, stage.upper()).name for stage in stages
              if checkpoint.finished_path(log_dir, stage.upper()).exists()]
    if found:
        report.warn("earlier run", f"{log_dir} holds {len(found)} checkpoint file(s) of an earlier run "
                                   f"({', '.join(sorted(found)[:3])}{' ...' if len(found) > 3 else ''}): training "
                                   f"needs --resume auto (continue it) or --resume fresh (start over)")
    return bool(found)


def training_command(argv):
    """The training command with the same flags as this preflight."""
    return " ".join(["python train_clamp3_lora.py"] + [shlex.quote(a) for a in argv])
