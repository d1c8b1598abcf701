"""Pretrain the demo's base model: a small CLaMP 3-shaped model whose every weight is trained.

    pip install music21                      # this tool only (an extra: pip install .[demo-tools])
    python tools/make_demo_base.py           # writes demo/base/ (checkpoint, PROVENANCE.md, pieces list)
    python tools/make_demo_base.py --out DIR --epochs 4 --device cuda

What it does, deterministic for a seed on the CPU:
  1. Takes tunes of Aird's Airs (as ABC) and of Ryan's Mammoth Collection and O'Neill's 1850 (rendered
     to MTF) from the music21 corpus, leaving out every piece of demo/'s train and eval files (by id
     and by melody), and writes them with the same kind of English text as the demo
     (tools/make_demo.py) into a work folder as JSON Lines.
  2. Holds out HELD_OUT of them, and trains the "tiny" preset of the project's own model (text encoder,
     symbolic encoder, both projections: every weight) with the project's data pipeline and CLIP loss
     on the rest.
  3. Scores held-out text->music retrieval, and saves the model in the official checkpoint layout
     ({"model": state_dict, "epoch": N}, no audio keys), which `--demo` loads like real weights.

Each demo stage then meets pieces the base never saw in that format: the ABC stage Ryan's and O'Neill's
tunes as ABC (the base knows them only as MTF), the MTF stage Aird's tunes as MTF and Bach's chorales.
demo/base/PROVENANCE.md says what it was trained on and how well it does.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import make_demo  # noqa: E402  (the demo's piece readers and text writers)
from clamp3_lora.data import Collator, MusicTextDataset, SequentialKeys, make_loader, scan_data_file  # noqa: E402
from clamp3_lora.metrics import chance_metrics, retrieval_metrics  # noqa: E402
from clamp3_lora.model import clip_loss, load_model  # noqa: E402

SEED = 0
HELD_OUT = 50             # pieces of each format kept out of pretraining to score the base
N_ABC = 900               # Aird tunes as ABC (all usable ones that are not in demo/ when fewer)
N_MTF = 1200              # Ryan's and O'Neill's tunes rendered as MTF
CHECKPOINT_NAME = "clamp3_demo_base.pth"
PRESET = "tiny"           # the golden tiny sizes; with the bundled 1000-token tokenizer
MAX_PATCHES = 256         # as --demo
MAX_TEXT_TOKENS = 128


def demo_pieces(demo: Path):
    """(ids, melody hashes) of every piece in demo/'s data files, to keep them out of pretraining."""
    ids, hashes = set(), set()
    for data in sorted(demo.glob("*.jsonl")):
        for line in data.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            path = (record.get("filepaths") or [record.get("location")])[0]
            ids.add(record.get("id") or Path(path).stem)
            if path.endswith(".abc"):
                hashes.add(melody_hash((demo / path).read_text(encoding="utf-8")))
    return ids, hashes


def melody_hash(tune):
    return hashlib.sha1(make_demo.abc_body(tune).encode()).hexdigest()


def pretraining_pieces(rng, demo):
    """(ABC pieces, MTF candidates): Aird's Airs tunes as ABC, Ryan's and O'Neill's tunes to be
    rendered as MTF; every piece of demo/ left out (by id and by melody), distinct melodies, seeded order."""
    base = make_demo.corpus_dir()
    taken_ids, taken_hashes = demo_pieces(demo)

    def unused(pieces):
        return [p for p in make_demo.pick(pieces, len(pieces), rng)
                if p.id not in taken_ids and melody_hash(p.abc) not in taken_hashes]
    return unused(make_demo.aird_pieces(base)), unused(make_demo.ryans_pieces(base) + make_demo.oneills_pieces(base))


def build_data(folder, rng, demo, n_abc, n_mtf):
    """Write the pretraining and held-out data files under `folder` (reused when already there):
    n_abc ABC tunes and n_mtf MTF renderings, HELD_OUT of each format held out."""
    files = [folder / f"{name}.jsonl" for name in ("pretrain", "held_out")]
    if all(f.exists() for f in files):
        print(f"reusing the pretraining data in {folder}")
        return files
    import music21
    (folder / "music21_version.txt").write_text(music21.__version__)
    abc, mtf_candidates = pretraining_pieces(rng, demo)
    abc = abc[:n_abc]
    make_demo.write_abc_pieces(abc, folder)
    print(f"rendering {n_mtf} tunes to MIDI and MTF with music21 ...", flush=True)
    mtf = make_demo.write_mtf_pieces(mtf_candidates, n_mtf, make_demo.corpus_dir(), folder, rng)
    held = abc[:HELD_OUT] + mtf[:HELD_OUT]
    used = abc[HELD_OUT:] + mtf[HELD_OUT:]
    for path, pieces in zip(files, (used, held)):
        make_demo.write_jsonl(path, [make_demo.clamp3_record(p, rng) for p in pieces])
    (folder / "pieces.txt").write_text("".join(f"{p.music_path}\t{p.source_file}\t{p.meta['title']}\n"
                                              for p in used + held), encoding="utf-8")
    return files


def features(model, dataset, batch_size=64):
    """(text, music) features of every evaluation sample, in order, without autograd."""
    model.eval()
    texts, musics = [], []
    loader = make_loader(dataset, SequentialKeys(len(dataset)), batch_size, pin_memory=False)
    with torch.no_grad():
        for batch in loader:
            musics.append(model.music_features(batch["patches"], batch["patch_mask"]))
            texts.append(model.text_features(batch["text_ids"], batch["text_mask"]))
    return torch.cat(texts), torch.cat(musics)


def train(model, train_set, held_set, epochs, batch_size, lr, seed, device):
    """AdamW on every weight, linear warm-up then cosine; returns (steps, held-out metrics per epoch).
    Its own few lines, not step.Step: the trainer's step keeps the text side frozen, pretraining trains it."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    per_epoch = math.ceil(len(train_set) / batch_size)
    total, warmup = epochs * per_epoch, per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total - warmup)))))
    history = []
    for epoch in range(epochs):
        order = random.Random(seed * 1000 + epoch).sample(range(len(train_set)), len(train_set))
        keys = [(i, seed * 1_000_003 + epoch * 100_003 + i) for i in order]
        batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=Collator(train_set.tokenizer.pad_token_id))
        model.train()
        losses = []
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            music = model.music_features(batch["patches"], batch["patch_mask"])
            text = model.text_features(batch["text_ids"], batch["text_mask"])
            loss = clip_loss(music, text)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        metrics = retrieval_metrics(*features(model, held_set))
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), **metrics})
        print(f"epoch {epoch + 1}/{epochs}: train loss {history[-1]['train_loss']:.4f}, held-out t2m MRR "
              f"{metrics['t2m_mrr']:.3f}, m2t MRR {metrics['m2t_mrr']:.3f}", flush=True)
    return total, history


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "demo" / "base"), help="output folder (default demo/base)")
    ap.add_argument("--epochs", type=int, default=12, help="pretraining epochs (default 12)")
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step (default 32)")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of AdamW (default 5e-4)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"seed of everything (default {SEED})")
    ap.add_argument("--device", default="cpu", help="cpu (default; deterministic) or cuda")
    ap.add_argument("--work", default="", help="folder for the pretraining data (kept, and reused when it "
                    "already holds it; default: a new temporary folder)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    demo = ROOT / "demo"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="clamp3_demo_base_"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, held_file = build_data(work, rng, demo, N_ABC, N_MTF)
    data_seconds = time.time() - started
    train_scan = scan_data_file(train_file, max_patches=MAX_PATCHES)
    held_scan = scan_data_file(held_file, max_patches=MAX_PATCHES)
    print(f"{len(train_scan.records)} pretraining pairs, {len(held_scan.records)} held out, in {work}")
    model = load_model(None, text_model=str(demo / "tokenizer"), preset=PRESET, device=device)
    sets = [MusicTextDataset(scan.records, model.tokenizer, train=is_train, max_patches=MAX_PATCHES,
                             max_text_tokens=MAX_TEXT_TOKENS)
            for scan, is_train in ((train_scan, True), (held_scan, False))]
    steps, history = train(model, *sets, args.epochs, args.batch_size, args.lr, args.seed, device)
    seconds = time.time() - started
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    checkpoint = out / CHECKPOINT_NAME
    torch.save({"model": state, "epoch": args.epochs}, checkpoint)
    shutil.copyfile(work / "pieces.txt", out / "pieces.tsv")
    write_provenance(out, args, model, len(train_scan.records), len(held_scan.records), steps, history,
                     seconds - data_seconds, (work / "music21_version.txt").read_text().strip(), device)
    print(f"saved {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB) in {seconds / 60:.1f} min")


def machine(device):
    """The machine, in words: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    return f"CPU: {name}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def write_provenance(out, args, model, pairs, held, steps, history, seconds, music21_version, device):
    """demo/base/PROVENANCE.md: what the base was trained on, how, where, and how well it retrieves."""
    c = model.config
    last = history[-1]
    chance = chance_metrics(held)
    rows = "\n".join(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['t2m_mrr']:.3f} | {h['m2t_mrr']:.3f} | "
                     f"{h['t2m_hit@1']:.3f} | {h['t2m_hit@10']:.3f} |" for h in history)
    text = f"""# The demo's pretrained base: provenance

`{CHECKPOINT_NAME}` is made by `python tools/make_demo_base.py --epochs {args.epochs} --batch-size {args.batch_size}
--lr {args.lr} --seed {args.seed} --device {args.device}` (the defaults; music21 {music21_version}). Do not edit by hand.
`python train_clamp3_lora.py --demo` loads it through the same official-checkpoint path as real weights.

## What it was trained on

Music-text pairs from the music21 corpus that are in none of demo/'s train or eval files (checked by id and by
melody), with English text written from each piece's own metadata as for the demo (tools/make_demo.py):

- **ABC**: tunes of Aird's Airs (`airdsAirs/`), as ABC text;
- **MTF**: tunes of Ryan's Mammoth Collection and O'Neill's 1850 (`ryansMammoth/`, `oneills1850/`), rendered to
  MIDI by music21 and to MTF by the project's own converter.

{pairs} pairs trained on and {held} held out ({HELD_OUT} of each format) to score the base. Every piece, with
its corpus file and title, is listed in `pieces.tsv` (the last {held} lines are the held-out ones).

Each LoRA stage of the demo therefore meets something the base never saw: the ABC stage the Ryan's and O'Neill's
tunes as ABC (the base knows them only as MTF), the MTF stage Aird's tunes as MTF (the base knows them only as
ABC) and Bach's chorales (four-part harmony, not in the base's data at all).

## The model

The "tiny" preset of `clamp3_lora.model.PRESETS`, every weight trained (text encoder, symbolic encoder, both
projections) with the project's own model, data pipeline and CLIP loss; the bundled 1000-token tokenizer
(`demo/tokenizer/`).

- text encoder: {c.text_layers} layers, hidden {c.text_hidden_size}, {c.text_heads} heads, feed-forward {c.text_ffn_size}, {c.text_max_positions} positions
- symbolic encoder: {c.symbolic_layers} layers, hidden {c.symbolic_hidden_size}, {c.symbolic_heads} heads, feed-forward {c.symbolic_ffn_size}, {c.symbolic_max_positions} patch positions
- projections: {c.projection_size}; {sum(p.numel() for p in model.parameters()):,} parameters in all, fp32, in the official checkpoint layout
  (`{{"model": state_dict, "epoch": {args.epochs}}}`, no audio keys)

## How it was trained

AdamW (weight decay 0.01), peak learning rate {args.lr}, one epoch of linear warm-up then cosine decay, gradient
clipping at 1.0, batch {args.batch_size}, {args.epochs} epochs = {steps} steps, at most {MAX_PATCHES} patches and {MAX_TEXT_TOKENS} text tokens per sample (CLaMP 3's text dropout and a random patch window, as the trainer).
Training took {seconds / 60:.1f} minutes on this machine ({machine(device)}; torch {torch.__version__}),
{time.strftime("%Y-%m-%d")}; building the data first (music21 rendering the MTF pieces) takes about 6 minutes more
on 2 CPU cores. The same seed on the CPU gives the same checkpoint, bit for bit.

## How well it retrieves, on its {held} held-out pairs

Chance level for {held} pairs: MRR {chance['t2m_mrr']:.3f}, Hit@1 {chance['t2m_hit@1']:.3f}, Hit@10 {chance['t2m_hit@10']:.3f}.
After the last epoch: text→music MRR **{last['t2m_mrr']:.3f}**, music→text MRR {last['m2t_mrr']:.3f}.

| epoch | train loss | t2m MRR | m2t MRR | t2m Hit@1 | t2m Hit@10 |
|---|---|---|---|---|---|
{rows}
"""
    (out / "PROVENANCE.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
