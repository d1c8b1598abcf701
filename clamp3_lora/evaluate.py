"""Evaluating adapters: text<->music retrieval of the base model and of each adapter, side by side;
and `embed`: global features of music and text files to .npy.

    python -m clamp3_lora.evaluate --data test.jsonl --adapter code/adapters/lora_abc_adapter
    python -m clamp3_lora.evaluate embed music/ queries.txt --out-dir features/ [--adapter DIR]

Long inputs are encoded as official CLaMP 3 feature extraction does: the whole sequence (patches with
the BOS and EOS patches; tokens with <s> and </s>) is cut into consecutive segments of 512 patches
(128 tokens), the last segment being the final 512 patches (128 tokens), so it overlaps the one before
it; each segment is encoded on its own and the segment features are averaged with weights equal to
the number of new positions each segment adds (512 for a full segment, the remainder for the last
one), so the weights sum to the sequence length. Features are the projected global features (the
model's text_features / music_features), not L2-normalised; retrieval scores are cosine similarities.
The adapters sit on the symbolic encoder only, so text features are computed once, by the base model.
"""
import argparse
import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from .config import TrainConfig, demo_overrides
from .data import evaluation_text, scan_data_file, special_token_ids
from .errors import Clamp3LoraError, MusicFormatError
from .logs import atomic_write_bytes, atomic_write_json, atomic_write_text
from .metrics import METRIC_NAMES, chance_metrics, retrieval_metrics
from .model import TRAINING_RECORD, load_model
from .mtf import MIDI_SUFFIXES, NOT_MUSIC, music_kind, read_music
from .patches import patchify
from .prepare import default_workers, find_files, run_parallel
from .precision import PRECISIONS, autocast, default_for
from .weights import resolve as resolve_weights
from .step import to_device

MUSIC_SUFFIXES = (".abc", ".mtf") + MIDI_SUFFIXES
TEXT_SUFFIXES = (".txt",)
EMBED_CHUNK = 1024
"""embed reads, encodes and writes this many files at a time (bounds memory for large folders)."""
POOL_MIN_FILES = 256
"""Music files are read in worker processes only when there are at least this many."""
CHART_METRICS = (("mrr", "MRR"), ("hit@1", "Hit@1"), ("hit@5", "Hit@5"), ("hit@10", "Hit@10"))


# --------------------------------------------------------------------------------------------
# Long sequences: segments and their weighted average


def segment_bounds(length, segment_length):
    """[(start, stop, weight)] of the segments that encode a sequence of `length` positions.

    Consecutive segments of segment_length; the last one is the final segment_length positions
    (overlapping the one before it). Weights: segment_length for every segment but the last, whose
    weight is the number of positions it adds (length % segment_length, or segment_length when that
    is 0). A sequence that fits is one segment weighted by its length.
    """
    if length < 1 or segment_length < 1:
        raise ValueError(f"need a non-empty sequence and segment length, got {length} and {segment_length}")
    if length <= segment_length:
        return [(0, length, length)]
    bounds = [(start, start + segment_length, segment_length) for start in range(0, length, segment_length)]
    bounds[-1] = (length - segment_length, length, length % segment_length or segment_length)
    return bounds


def length_mask(lengths, width):
    """[B, width] long mask: 1 inside each sequence's length."""
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()


def encode_sequences(encode_batch, sequences, segment_length, batch_size, pad_value, device,
                     precision, desc="encoding", progress=True):
    """Global features [N, D] (float32, CPU) of N sequences of any length.

    sequences: tensors [L] (token ids) or [L, 64] (patches, any integer dtype). Every sequence is cut
    by segment_bounds; the segments of all sequences are encoded longest first in batches of
    `batch_size` (padded with pad_value to the batch's longest, with an attention mask) by
    `encode_batch(ids, mask)` (e.g. model.music_features), under inference mode and autocast; each
    sequence's feature is the weighted average of its segments' features.
    """
    segments = [(index, start, stop, weight) for index, sequence in enumerate(sequences)
                for start, stop, weight in segment_bounds(len(sequence), segment_length)]
    order = sorted(range(len(segments)), key=lambda k: segments[k][2] - segments[k][1], reverse=True)
    features = [None] * len(segments)
    with torch.inference_mode(), tqdm(total=len(segments), desc=desc, unit="segment",
                                      disable=not progress) as bar:
        for first in range(0, len(order), batch_size):
            chosen = order[first:first + batch_size]
            parts = [sequences[segments[k][0]][segments[k][1]:segments[k][2]] for k in chosen]
            ids = pad_sequence(parts, batch_first=True, padding_value=pad_value)
            mask = length_mask([len(part) for part in parts], ids.shape[1])
            batch = to_device({"ids": ids, "mask": mask}, device)
            with autocast(device, precision):
                output = encode_batch(batch["ids"].long(), batch["mask"])
            for k, row in zip(chosen, output.float().cpu()):
                features[k] = row
            bar.update(len(chosen))
    return average_segments(features, segments, len(sequences))


def average_segments(features, segments, count):
    """Weighted average per sequence: sum(weight * feature) / sum(weight) over each sequence's
    segments; segments are (index, start, stop, weight) in the order of `features`."""
    dim = features[0].shape[-1]
    total = torch.zeros(count, dim, dtype=torch.float64)
    weights = torch.zeros(count, dtype=torch.float64)
    for (index, _, _, weight), feature in zip(segments, features):
        total[index] += weight * feature.double()
        weights[index] += weight
    return (total / weights[:, None]).float()


# --------------------------------------------------------------------------------------------
# Inputs: music patches and text token ids


def piece_patches(path):
    """All patches of a music file (BOS and EOS patches included, nothing cut) as a uint8 array
    [L, 64]; raises MusicFormatError naming the file, also for a file that is not music
    (mtf.music_kind). Top-level for worker processes."""
    text = read_music(path)
    if music_kind(text) is None:
        raise MusicFormatError(f"{path}: {NOT_MUSIC}")
    return np.asarray(patchify(text, truncate=None, source=str(path)), dtype=np.uint8)


def read_pieces(paths, workers=None, progress=True):
    """{path: uint8 tensor [L, 64] or the MusicFormatError message} for every music file, read in
    worker processes when there are many."""
    if workers is None:
        workers = default_workers() if len(paths) >= POOL_MIN_FILES else 0
    return {path: torch.from_numpy(outcome) if isinstance(outcome, np.ndarray) else outcome
            for (path,), outcome in run_parallel(_read_piece_or_error, [(p,) for p in paths], workers,
                                                 "reading music", progress)}


def _read_piece_or_error(path):
    """piece_patches, or the error message for a file that cannot be used."""
    try:
        return piece_patches(path)
    except MusicFormatError as error:
        return str(error)


def text_token_ids(tokenizer, texts):
    """Token id tensors of texts, all of each text: <s> + tokens + </s> (as the tokenizer's own
    special tokens wrap a text), for segmenting."""
    begin, end = special_token_ids(tokenizer)
    bodies = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return [torch.tensor(([begin] if begin is not None else []) + body + ([end] if end is not None else []),
                         dtype=torch.long) for body in bodies]


def query_text(text, sep):
    """A text query file's content as CLaMP 3 feature extraction takes it: lines stripped, empty and
    repeated lines dropped (first kept), joined with the tokenizer's separator token."""
    lines = (line.strip() for line in text.splitlines())
    return sep.join(dict.fromkeys(line for line in lines if line))


# --------------------------------------------------------------------------------------------
# Model set-up


def resolve_device(name):
    """torch.device of `name`; a CUDA device must exist (CPU is an explicit choice, never a fallback)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Clamp3LoraError(f"device {name!r} asked for but CUDA is not available here; "
                              "pass --device cpu to run on the CPU (slow for the full-size model)")
    return device


def build_model(args, device):
    """The base model of the command line: --weights (official checkpoint), or a random --preset
    model seeded with --seed when no weights are given; tokenizer from --text-model."""
    weights = args.weights
    if weights is None and not args.preset:
        weights = TrainConfig().weights
    if weights is None:
        torch.manual_seed(args.seed)
    else:
        weights = resolve_weights(weights)
    if weights is not None and not Path(weights).is_file():
        raise Clamp3LoraError(f"checkpoint not found: {weights} (pass --weights, or --preset tiny for a "
                              "random tiny model)")
    return load_model(weights, text_model=args.text_model, preset=args.preset or None, device=device)


def check_segment_lengths(model, max_patches, max_text_tokens):
    """Segments must fit the model's position embeddings (XLM-R positions start after the pad id)."""
    config = model.config
    text_room = config.text_max_positions - config.text_pad_token_id - 1
    if max_patches > config.symbolic_max_positions:
        raise Clamp3LoraError(f"--max-patches {max_patches} is more than the model's "
                              f"{config.symbolic_max_positions} patch positions")
    if max_text_tokens > text_room:
        raise Clamp3LoraError(f"--max-text-tokens {max_text_tokens} is more than the model's "
                              f"{text_room} text positions")


def with_adapter(model, path):
    """A copy of the base model with the adapter at `path` loaded (the base stays unchanged)."""
    adapted = copy.deepcopy(model)
    adapted.load_adapter(path)
    return adapted.eval()


def adapter_labels(paths):
    """Short unique labels of adapter directories: the folder name, or the whole path when two
    adapters share a name (or one is called 'base')."""
    names = [Path(p).name for p in paths]
    return [name if names.count(name) == 1 and name != "base" else str(p) for name, p in zip(names, paths)]


def read_training_record(path):
    """The adapter's training_record.json (what it was trained on), or None when it has none."""
    record_path = Path(path) / TRAINING_RECORD
    if not record_path.is_file():
        return None
    try:
        return json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {"unreadable": f"{record_path}: {error}"}


# --------------------------------------------------------------------------------------------
# Evaluation


def load_test_pairs(data, tokenizer, bad_record_limit, workers=None, progress=True, music_roots=()):
    """(scan, patch tensors, text id tensors) of a test data file: each usable record's first music
    file, all of it, and its evaluation text, all of it. Bad records are skipped (and reported by
    the caller); a file that went bad after the scan raises MusicFormatError."""
    scan = scan_data_file(data, limit=bad_record_limit, check_music=True, progress=progress, workers=workers,
                          music_roots=music_roots)
    paths = [record.paths[0] for record in scan.records]
    pieces = read_pieces(list(dict.fromkeys(paths)), workers, progress)
    failed = [outcome for outcome in pieces.values() if isinstance(outcome, str)]
    if failed:
        raise MusicFormatError(f"{len(failed)} music files changed since the data scan: {failed[0]}")
    sep = tokenizer.sep_token or tokenizer.eos_token
    texts = text_token_ids(tokenizer, [evaluation_text(record, sep) for record in scan.records])
    return scan, [pieces[p] for p in paths], texts


def evaluate(model, adapters, patches, text_ids, device, precision, batch_size=32, max_patches=512,
             max_text_tokens=128, progress=True):
    """Retrieval metrics of the base model and of each adapter on paired (patches, text ids).

    Returns a list of {"name", "adapter", "metrics"}: "base" first, then one entry per adapter
    directory (loaded into a copy of the base model, one at a time), each with retrieval_metrics.
    """
    pad_id = model.tokenizer.pad_token_id
    text = encode_sequences(model.text_features, text_ids, max_text_tokens, batch_size, pad_id, device,
                            precision, "text", progress)
    music = encode_sequences(model.music_features, patches, max_patches, batch_size, 0, device, precision,
                             "music (base)", progress)
    results = [{"name": "base", "adapter": None, "metrics": retrieval_metrics(text, music)}]
    for label, path in zip(adapter_labels(adapters), adapters):
        adapted = with_adapter(model, path)
        music = encode_sequences(adapted.music_features, patches, max_patches, batch_size, 0, device,
                                 precision, f"music ({label})", progress)
        results.append({"name": label, "adapter": str(path), "training_record": read_training_record(path),
                        "metrics": retrieval_metrics(text, music)})
        del adapted
    return results


def format_table(results, pairs):
    """Metrics as a text table: one row per metric, one column per model, and the chance level of a
    random ranking of `pairs` pairs; adapter columns also show the difference from the base model."""
    base = results[0]["metrics"]
    chance = chance_metrics(pairs)
    header = ["metric", "chance"] + [result["name"] for result in results]
    rows = []
    for name in METRIC_NAMES:
        digits = 2 if name.endswith("_rank") else 4
        cells = [name, f"{chance[name]:.{digits}f}", f"{base[name]:.{digits}f}"]
        for result in results[1:]:
            value = result["metrics"][name]
            cells.append(f"{value:.{digits}f} ({value - base[name]:+.{digits}f})")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines + [f"chance: the expected score of a random ranking of {pairs} pairs"])


def draw_chart(results, title, pairs):
    """A PNG (bytes) of grouped bars: MRR and Hit@1/5/10 for text->music and music->text, one bar
    colour per model, and a dashed black mark at each metric's chance level for `pairs` pairs."""
    chance = chance_metrics(pairs)
    figure = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    width = 0.8 / len(results)
    for axis, (direction, label) in zip(axes, (("t2m", "text → music"), ("m2t", "music → text"))):
        for j, result in enumerate(results):
            offset = (j - (len(results) - 1) / 2) * width
            values = [result["metrics"][f"{direction}_{key}"] for key, _ in CHART_METRICS]
            bars = axis.bar([i + offset for i in range(len(CHART_METRICS))], values, width, label=result["name"])
            axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        for i, (key, _) in enumerate(CHART_METRICS):
            axis.hlines(chance[f"{direction}_{key}"], i - 0.45, i + 0.45, colors="black", linestyles="--",
                        linewidth=1, label="chance" if i == 0 else None)
        axis.set_xticks(range(len(CHART_METRICS)), [name for _, name in CHART_METRICS])
        axis.set_ylim(0, 1.1)
        axis.set_title(label)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=8, loc="upper left")
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(results, summary, out_dir, name):
    """Write NAME.txt (the table), NAME.json (summary + results) and NAME.png (the chart) into
    out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{name}.{kind}" for kind in ("txt", "json", "png")}
    atomic_write_text(paths["txt"], format_table(results, summary["pairs"]) + "\n")
    atomic_write_json(paths["json"], dict(summary, chance=chance_metrics(summary["pairs"]), results=results))
    title = f"{Path(summary['data']).name}: {summary['pairs']} text-music pairs (dashed: chance)"
    atomic_write_bytes(paths["png"], draw_chart(results, title, summary["pairs"]))
    return paths


def cmd_evaluate(args):
    """The evaluation command: load, encode, compare, print the table, write the report."""
    device = resolve_device(args.device)
    precision = args.precision or default_for(device)
    model = build_model(args, device)
    check_segment_lengths(model, args.max_patches, args.max_text_tokens)
    progress = not args.quiet
    scan, patches, text_ids = load_test_pairs(args.data, model.tokenizer, args.bad_record_limit,
                                              args.workers, progress, args.music_root)
    if scan.bad:
        print(scan.summary(), file=sys.stderr)
    if len(patches) < 2:
        raise Clamp3LoraError(f"{args.data}: {len(patches)} usable text-music pair(s); retrieval ranks each "
                              "text among the pieces, which needs at least 2")
    for note in format_notes(args.adapter or [], scan):
        print(f"⚠ {note}", file=sys.stderr)
    results = evaluate(model, args.adapter or [], patches, text_ids, device, precision, args.batch_size,
                       args.max_patches, args.max_text_tokens, progress)
    summary = {
        "data": str(args.data),
        "pairs": len(patches),
        "bad_records": [str(bad) for bad in scan.bad],
        "weights": args.weights, "preset": args.preset or None, "text_model": args.text_model,
        "device": str(device), "precision": precision,
        "segments": {"patches": args.max_patches, "text_tokens": args.max_text_tokens,
                     "long_pieces": sum(len(p) > args.max_patches for p in patches),
                     "long_texts": sum(len(t) > args.max_text_tokens for t in text_ids)},
    }
    name = args.name or f"evaluation_{Path(args.data).stem}"
    earlier = [path for path in (Path(args.out_dir) / f"{name}{suffix}" for suffix in (".txt", ".json", ".png"))
               if path.exists()]
    paths = write_report(results, summary, args.out_dir, name)
    if earlier:
        print(f"⚠ replaced the earlier report {earlier[0].with_suffix('')}.* (--name gives a report another name)",
              file=sys.stderr)
    print(f"{args.data}: {len(patches)} pairs ({summary['segments']['long_pieces']} pieces over "
          f"{args.max_patches} patches and {summary['segments']['long_texts']} texts over "
          f"{args.max_text_tokens} tokens encoded in segments)")
    print(format_table(results, len(patches)))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def format_notes(adapters, scan):
    """Notes on adapters evaluated on data of the other format (their training_record.json names the
    stage they were trained in; the data's format is that of its music files)."""
    kinds = {"abc" if record.paths[0].lower().endswith(".abc") else "mtf" for record in scan.records}
    notes = []
    for adapter in adapters:
        record_file = Path(adapter) / "training_record.json"
        try:
            stage = json.loads(record_file.read_text(encoding="utf-8")).get("stage", "")
        except (OSError, ValueError, AttributeError):
            continue  # another project's adapter: no record of what it was trained on
        if stage.lower() in ("abc", "mtf") and kinds and stage.lower() not in kinds:
            notes.append(f"{adapter} was trained on {stage.upper()} music; this data is "
                         f"{'/'.join(sorted(k.upper() for k in kinds))} (MIDI counts as MTF)")
    return notes


# --------------------------------------------------------------------------------------------
# embed


def collect_embed_inputs(inputs):
    """[(file, output path relative to --out-dir)] of the inputs: files are taken as given (their
    suffix must be a music or text suffix), folders searched recursively for such files, mirrored.
    The output is the file name plus '.npy' (song.abc -> song.abc.npy, so song.abc and song.txt
    do not collide)."""
    suffixes = MUSIC_SUFFIXES + TEXT_SUFFIXES
    found = []
    for given in map(Path, inputs):
        if given.is_dir():
            found.extend((given / rel, rel.parent / f"{rel.name}.npy") for rel in find_files(given, suffixes))
        elif given.is_file():
            if given.suffix.lower() not in suffixes:
                raise Clamp3LoraError(f"{given}: not a music or text file (suffixes: {', '.join(suffixes)})")
            found.append((given, Path(f"{given.name}.npy")))
        else:
            raise Clamp3LoraError(f"input not found: {given}")
    outputs = {}
    for source, output in found:
        if output in outputs:
            raise Clamp3LoraError(f"{source} and {outputs[output]} would both be written to {output}; "
                                  "embed them in separate runs")
        outputs[output] = source
    return found


def read_query(path, sep):
    """A .txt query file as one text (see query_text); raises MusicFormatError for unreadable or
    empty files (the reader shared with music files rejects binary and non-UTF-8 text)."""
    text = query_text(read_music(path), sep)
    if not text:
        raise MusicFormatError(f"{path}: no text (empty or whitespace only)")
    return text


def embed_chunk(model, files, device, precision, batch_size, max_patches, max_text_tokens, progress):
    """Features of a list of files: ({file: feature tensor [D]}, [error lines])."""
    sep = model.tokenizer.sep_token or model.tokenizer.eos_token
    music = [f for f in files if f.suffix.lower() in MUSIC_SUFFIXES]
    texts, errors = {}, []
    for path in (f for f in files if f.suffix.lower() in TEXT_SUFFIXES):
        try:
            texts[path] = read_query(path, sep)
        except MusicFormatError as error:
            errors.append(str(error))
    pieces = read_pieces(music, progress=False)
    errors.extend(outcome for outcome in pieces.values() if isinstance(outcome, str))
    pieces = {path: outcome for path, outcome in pieces.items() if not isinstance(outcome, str)}
    features = {}
    if pieces:
        encoded = encode_sequences(model.music_features, list(pieces.values()), max_patches, batch_size, 0,
                                   device, precision, "music", progress)
        features.update(zip(pieces, encoded))
    if texts:
        ids = text_token_ids(model.tokenizer, list(texts.values()))
        encoded = encode_sequences(model.text_features, ids, max_text_tokens, batch_size,
                                   model.tokenizer.pad_token_id, device, precision, "text", progress)
        features.update(zip(texts, encoded))
    return features, errors


def save_feature(path, feature, normalize):
    """Write one feature vector (float32 [D], L2-normalised when asked) as .npy, atomically."""
    if normalize:
        feature = torch.nn.functional.normalize(feature, dim=-1)
    buffer = io.BytesIO()
    np.save(buffer, feature.numpy().astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def cmd_embed(args):
    """The embed command: features of every input file to OUT_DIR/<name>.npy; exit 1 when a file
    could not be embedded (its error listed and written to OUT_DIR/embed_errors.txt)."""
    device = resolve_device(args.device)
    precision = args.precision or default_for(device)
    files = collect_embed_inputs(args.inputs)
    model = build_model(args, device)
    check_segment_lengths(model, args.max_patches, args.max_text_tokens)
    if args.adapter:
        model = with_adapter(model, args.adapter)
    out_dir = Path(args.out_dir)
    errors, written = [], 0
    with tqdm(total=len(files), desc="embed", unit="file", disable=args.quiet) as bar:
        for first in range(0, len(files), EMBED_CHUNK):
            chunk = files[first:first + EMBED_CHUNK]
            features, chunk_errors = embed_chunk(model, [source for source, _ in chunk], device, precision,
                                                 args.batch_size, args.max_patches, args.max_text_tokens,
                                                 progress=False)
            errors.extend(chunk_errors)
            for source, output in chunk:
                if source in features:
                    save_feature(out_dir / output, features[source], args.normalize)
                    written += 1
            bar.update(len(chunk))
    print(f"embed: {written} of {len(files)} files -> {out_dir} "
          f"({'with adapter ' + args.adapter if args.adapter else 'base model'})")
    errors_path = out_dir / "embed_errors.txt"
    if errors:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(errors_path, "".join(line + "\n" for line in errors))
        print(f"{len(errors)} files failed (list: {errors_path}):", file=sys.stderr)
        for line in errors[:20]:
            print(f"  {line}", file=sys.stderr)
        return 1
    errors_path.unlink(missing_ok=True)
    return 0


# --------------------------------------------------------------------------------------------
# Command line


def add_model_flags(parser):
    """Flags shared by evaluation and embed: the model, device, precision, batching, segments."""
    defaults = TrainConfig()
    demo = demo_overrides()
    parser.add_argument("--demo", action="store_true",
                        help=f"the demo's model: base {demo['weights']}, tokenizer {demo['text_model']}, "
                             f"{demo['max_patches']} patches per segment (flags given explicitly win)")
    parser.add_argument("--weights", default=None,
                        help=f"base weights: c2 or saas (the official releases, from the hub), REPO_ID:FILENAME, "
                             f"or a local .pth (default: {defaults.weights}; with --preset and no --weights: a "
                             "random model of that preset)")
    parser.add_argument("--preset", default="", help="model preset (\"tiny\": the demo/test size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random --preset model's weights")
    parser.add_argument("--text-model", default=None,
                        help=f"tokenizer: hub id or local folder (default: {defaults.text_model}; demo/tokenizer "
                             "for the tiny preset)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default; fails without a GPU), cuda:N, or cpu (explicit opt-in)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast precision (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=64, help="segments encoded per batch")
    parser.add_argument("--max-patches", type=int, default=None,
                        help=f"patches per segment of a long piece (default: {defaults.max_patches})")
    parser.add_argument("--max-text-tokens", type=int, default=TrainConfig.max_text_tokens,
                        help="tokens per segment of a long text")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def apply_defaults(args):
    """Fill the model flags left unset: from the demo set-up with --demo, else the trainer's defaults."""
    defaults = TrainConfig()
    demo = demo_overrides() if args.demo else {}
    if args.weights is None and args.demo and not args.preset:
        args.weights = demo["weights"]
    args.text_model = args.text_model or demo.get("text_model", defaults.text_model)
    args.max_patches = args.max_patches or demo.get("max_patches", defaults.max_patches)


def build_parser():
    """Parser of `python -m clamp3_lora.evaluate` (the retrieval evaluation)."""
    parser = argparse.ArgumentParser(
        prog="python -m clamp3_lora.evaluate",
        description="Text<->music retrieval of the base model and of each adapter on a test data file "
                    "(table, JSON and PNG). `python -m clamp3_lora.evaluate embed --help`: features "
                    "of files to .npy.")
    parser.add_argument("--data", required=True, help="test data file (JSON Lines, CLaMP 3 or MidiCaps schema)")
    parser.add_argument("--adapter", action="append",
                        help="adapter directory (peft format) to compare with the base model; repeat for more")
    parser.add_argument("--out-dir", default="code/logs/lora/evaluation",
                        help="folder of the report files NAME.txt, NAME.json, NAME.png")
    parser.add_argument("--name", default=None, help="report file name (default: evaluation_<data file stem>)")
    parser.add_argument("--bad-record-limit", type=float, default=TrainConfig.bad_record_limit,
                        help="stop when more than this share of the test records is bad")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes reading the music files (default: all cores for large files)")
    add_music_root_flag(parser)
    add_model_flags(parser)
    return parser


def add_music_root_flag(parser):
    parser.add_argument("--music-root", action="append", default=[], metavar="DIR",
                        help="a folder music files may lie in besides the data file's own folder (repeatable); "
                             "a music path anywhere else is a bad record, outside_music_root")


def build_embed_parser():
    """Parser of `python -m clamp3_lora.evaluate embed`."""
    parser = argparse.ArgumentParser(
        prog="python -m clamp3_lora.evaluate embed",
        description="Global features of .abc/.mtf/.mid/.midi music files and .txt text queries to .npy "
                    "(OUT_DIR/<file name>.npy, folders mirrored), with the base model or an adapter.")
    parser.add_argument("inputs", nargs="+", help="files, or folders searched recursively")
    parser.add_argument("--out-dir", required=True, help="folder of the .npy files")
    parser.add_argument("--adapter", default=None, help="adapter directory to apply to the music encoder")
    parser.add_argument("--normalize", action="store_true",
                        help="L2-normalise the features (default: raw projected features, as CLaMP 3 writes them)")
    add_model_flags(parser)
    return parser


def main(argv=None):
    """Run the evaluation, or `embed` when it is the first argument; the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["embed"]:
        args, command = build_embed_parser().parse_args(argv[1:]), cmd_embed
    else:
        args, command = build_parser().parse_args(argv), cmd_evaluate
    apply_defaults(args)
    try:
        return command(args)
    except Clamp3LoraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
