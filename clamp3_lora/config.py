"""Every setting of the trainer, with its default. Each field is also a command-line flag.

`python train_clamp3_lora.py --help` lists them; the text after each field here is its help.
`--demo` swaps in the bundled demo set-up (see `demo_overrides`). The speed switches are one
dataclass of their own, `SpeedConfig` (`TrainConfig.speed`): each field is a flag in the help's
last group, and its name is the name the speed code reads (clamp3_lora/speed/). Adding a switch
means a field here and the code that uses it.
"""
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class SpeedConfig:
    """The speed paths of the training step. Each computes the same function as the plain path
    (tests/test_fast_paths.py) and is measured in BENCHMARKS.md; --plain turns them all off."""

    fast_encoder: bool = True
    """Run both encoders on the packed real tokens (nothing computed on padding) with fused layers and
    varlen flash attention on CUDA; --no-fast-encoder: the plain transformers forward."""
    compile_layers: bool = True
    """torch.compile each layer of the fast encoder as one graph, reused by all layers (CUDA only;
    attention in it is the opaque flash-attention kernel)."""
    bf16_weights: bool = True
    """With --precision bf16 on CUDA, store the frozen weights in bf16 once (no per-step casts, half
    the memory); the LoRA weights stay fp32."""
    shared_lora_dropout: bool = True
    """One LoRA dropout mask per layer input shared by query/key/value (one fused LoRA matmul)
    instead of one mask per projection."""
    fp32_residual: bool = False
    """Keep the fast encoder's residual stream in fp32 (as autocast does); off (default): in the
    compute dtype, bf16 (less memory traffic: 3-6% faster on an H100, BENCHMARKS.md; rounding error
    7e-3 against 6e-3, within the bf16 tolerance)."""
    patch_kernel: bool = True
    """Sum the patch embedding (64 table rows per patch) with a Triton kernel on CUDA instead of
    embedding_bag (the same sums; clamp3_lora/speed/kernels.py)."""
    dense_attention: bool = True
    """Batches whose pieces all fill their rows (e.g. long MTF windows of 512 patches) run cuDNN's
    dense attention on Hopper GPUs instead of flash attention's variable-length kernel (the same
    function, faster; BENCHMARKS.md). Batches of mixed lengths always run the variable-length kernel."""
    keep_masks: bool = True
    """Draw each layer's dropout masks (LoRA input, attention output, feed-forward output) ahead of
    the layer, four elements per random-number call with a Triton kernel on CUDA, instead of inside
    the compiled layer's kernels (the same dropout; BENCHMARKS.md)."""
    text_ahead: bool = True
    """While the host waits for a step's loss and gradient norm, queue the next batch's copy and
    frozen text pass on the GPU (one-batch steps without a GradScaler), so the GPU is not idle while
    the host decides on and launches the update. The same numbers either way."""
    attention: str = "auto"
    """Attention of the fast encoder: auto (cuDNN dense attention for full rows, else flash attention's
    variable-length kernel where they run, else SDPA over padded rows), varlen, or padded."""
    cuda_graphs: bool = True
    """Replay the training step's encoder passes as CUDA graphs, captured once per batch shape (token
    counts rounded up to 8 sizes per doubling; CUDA with the fast encoder only): removes the kernel
    launch overhead that bounds small batches."""

    @classmethod
    def plain(cls):
        """Every speed path off: the transformers forward, eager, fp32 weights (for debugging)."""
        return cls(**{f.name: False for f in fields(cls) if f.type in (bool, "bool")})


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    weights: str = "c2"
    """The base weights: c2 (the official CLaMP 3 C2 release, for symbolic music; downloaded from the
    hub repository sander-wood/clamp3 into the Hugging Face cache on first use), saas (the official
    SAAS release), REPO_ID:FILENAME (any hub file), or a local .pth with a "model" state dict."""
    text_model: str = "FacebookAI/xlm-roberta-base"
    """Hub id or local folder of the XLM-R tokenizer and config (weights come from --weights)."""
    preset: str = ""
    """Build a random model of this preset instead of loading --weights ("tiny"); for tests and the demo."""

    # --- what to train -----------------------------------------------------------------------
    stages: str = "abc,mtf"
    """Stages to run, in order, comma-separated: abc, mtf."""
    abc_train: str = "data/abc_train.jsonl"
    """ABC training data (JSON Lines)."""
    abc_eval: str = "data/abc_eval.jsonl"
    """ABC validation data (JSON Lines)."""
    mtf_train: str = "data/mtf_train.jsonl"
    """MTF training data (JSON Lines; .mid/.midi files are converted on the fly)."""
    mtf_eval: str = "data/mtf_eval.jsonl"
    """MTF validation data (JSON Lines)."""
    output_dir: str = "code"
    """Root of the outputs: adapters go to OUTPUT_DIR/adapters, logs and checkpoints to OUTPUT_DIR/logs/lora."""
    demo: bool = False
    """Run both stages on the bundled demo data from the bundled pretrained demo base and tokenizer
    (offline; demo/base/PROVENANCE.md)."""

    # --- LoRA --------------------------------------------------------------------------------
    lora_r: int = 4
    """LoRA rank."""
    lora_alpha: int = 8
    """LoRA alpha (scaling = alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input."""
    lora_targets: str = "query,key,value"
    """Comma-separated module names of the symbolic BERT that get LoRA."""
    encoder_dropout: float = 0.1
    """Dropout inside the frozen symbolic BERT while training (hidden and attention dropout; 0.1 as in
    CLaMP 3's own training). The frozen text encoder always runs without dropout."""

    # --- optimisation ------------------------------------------------------------------------
    epochs: int = 10
    """Epochs per stage."""
    batch_size: int = 32
    """Samples per optimizer micro-step on each GPU."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up length in optimizer steps."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    precision: str = "bf16"
    """Autocast precision on the GPU: bf16, fp16 (with a GradScaler) or fp32."""
    seed: int = 0
    """Seed of the data order, augmentations and LoRA initialisation."""

    # --- data --------------------------------------------------------------------------------
    max_patches: int = 512
    """Patches per piece (longer pieces: random window in training, head in evaluation)."""
    max_text_tokens: int = 128
    """Tokens per text (longer texts: random window in training, head in evaluation)."""
    instrument_removal_prob: float = 0.9
    """Probability of removing instrument names from a training piece."""
    num_workers: int = 4
    """DataLoader worker processes."""
    patch_cache_mb: int = 256
    """Memory (MiB) each data process may keep for the patches of pieces it has read (and the MTF
    text of MIDI files), so a long piece is not read and cut into patches again for every sample;
    0 turns the cache off. Samples are the same either way."""
    bad_record_limit: float = 0.05
    """Abort when more than this share of a data file's records is bad."""
    music_root: list[str] = field(default_factory=list)
    """A folder music files may lie in besides each data file's own folder (repeatable; symbolic
    links are followed). A music path anywhere else is a bad record, outside_music_root."""

    # --- evaluation and checkpoints ----------------------------------------------------------
    best_metric: str = "eval_loss"
    """Metric that picks the best adapter: eval_loss (lower is better) or one of t2m_mrr, m2t_mrr,
    t2m_hit@1, t2m_hit@5, t2m_hit@10, m2t_hit@1, m2t_hit@5, m2t_hit@10 (higher is better)."""
    report_to: list[str] = field(default_factory=list)
    """Also send every logged scalar (per step and per epoch) to tensorboard or wandb (repeatable;
    default none). Event files go to OUTPUT_DIR/logs/lora/tensorboard; each needs its package (pip
    install .[tracking])."""
    checkpoints_per_epoch: int = 10
    """Periodic checkpoints per epoch (0 disables them)."""
    keep_epoch_checkpoints: int = 3
    """Epoch checkpoints kept per stage; older ones are deleted."""
    resume: str = ""
    """"auto" continues each stage from its newest valid checkpoint (a finished stage is skipped; a
    corrupt newest checkpoint is passed over with a warning); a path continues from that checkpoint
    (its stage; earlier stages are skipped); "fresh" deletes the stages' old checkpoints and starts
    over. Empty (default): start fresh, but refuse if an earlier run left checkpoints."""
    new_global_batch: bool = False
    """With --resume: continue a checkpoint whose global batch (batch size x processes) differs from
    this run's. The data continues at the same sample of the same epoch; the contrastive loss gets
    the new batch's negatives, and the learning-rate schedule continues from the optimizer steps done
    over the new number of steps per epoch. Not needed when the global batch stays the same."""

    # --- guards and hardware -----------------------------------------------------------------
    max_bad_steps_in_row: int = 10
    """Abort (with an emergency checkpoint) after this many skipped batches in a row (OOM or NaN/Inf)."""
    device: str = "cuda"
    """cuda (default; fails without a GPU) or cpu (explicit opt-in)."""
    fault_inject: str = ""
    """Test hook: comma-separated faults "KIND@STEP[:RANK]", STEP the stage's global micro-step (batch)
    counted from 0 across epochs, RANK limiting it to one process. KIND: oom (a CUDA out-of-memory
    error in the forward pass), oomback (the same in the backward pass), nan (NaN loss), nangrad (NaN
    gradient), sigint, sigterm, sigkill (that signal sent to the process itself before the batch), error
    (an unexpected RuntimeError before the batch), hang (stop answering before the batch until a stop
    signal arrives). Also read from CLAMP3_LORA_FAULTS."""
    dist_timeout_s: int = 1800
    """Timeout of collective operations under torchrun, in seconds: a process lost or stuck for longer
    ends the job with an error instead of a hang (raise it if rank 0's data scan takes longer)."""

    # --- speed -------------------------------------------------------------------------------
    plain: bool = False
    """Turn every speed path off (SpeedConfig.plain(): the transformers forward, eager, fp32 weights),
    for debugging; speed flags given explicitly still win."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """The speed switches (SpeedConfig); on the command line each is a flag of its own."""


DEMO_BASE = "demo/base/clamp3_demo_base.pth"
"""The demo's pretrained base (tools/make_demo_base.py; demo/base/PROVENANCE.md), an official-layout checkpoint."""


def demo_path(relative):
    """A demo file as seen from here: the relative path when the folder run from holds demo/ (the
    repository root), else the path inside the repository this package lives in, so --demo works
    from any folder of a checkout."""
    if Path(relative).exists():
        return relative
    beside = Path(__file__).resolve().parent.parent / relative
    return str(beside) if beside.exists() else relative


def demo_overrides():
    """Settings that --demo applies over the defaults (explicit flags still win)."""
    return dict(
        weights=demo_path(DEMO_BASE),
        preset="",
        text_model=demo_path("demo/tokenizer"),
        abc_train=demo_path("demo/abc_train.jsonl"),
        abc_eval=demo_path("demo/abc_eval.jsonl"),
        mtf_train=demo_path("demo/mtf_train.jsonl"),
        mtf_eval=demo_path("demo/mtf_eval.jsonl"),
        epochs=20,
        batch_size=16,
        warmup_steps=5,
        lr=1e-2,
        lora_dropout=0.0,      # 182 / 175 training pieces and 20 short epochs: dropout only slows the
        encoder_dropout=0.0,   # gain (held-out t2m MRR x1.66 / x1.56 over the base without, x1.5 / x1.4 with)
        best_metric="t2m_mrr",
        max_patches=256,
        num_workers=0,
        checkpoints_per_epoch=2,
    )
