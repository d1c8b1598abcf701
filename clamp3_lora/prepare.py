"""Preparing data: MIDI -> MTF, multi-tune ABC files -> one tune per file, data files, data checks.

    python -m clamp3_lora.prepare midi2mtf IN_DIR OUT_DIR          # .mid/.midi -> .mtf, in parallel
    python -m clamp3_lora.prepare split-abc IN... --out-dir OUT     # one tune per .abc file
    python -m clamp3_lora.prepare build-jsonl --music-dir DIR --captions CAPTIONS --output OUT.jsonl
    python -m clamp3_lora.prepare build-jsonl --midicaps CAPTIONS.json --output OUT.jsonl
    python -m clamp3_lora.prepare check DATA.jsonl --text-model TOKENIZER

Every subcommand reports what it could not do (file by file) instead of skipping it silently.
"""
import argparse
import csv
import itertools
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .config import TrainConfig
from .data import evaluation_text, scan_data_file
from .errors import Clamp3LoraError, DataError, MusicFormatError
from .logs import atomic_write_json, atomic_write_text
from .model import load_tokenizer
from .mtf import MIDI_SUFFIXES, midi_to_mtf, read_music
from .patches import MAX_PATCHES, patchify

MANIFEST_NAME = "midi2mtf_manifest.json"
"""midi2mtf's record of converted files in OUT_DIR: source path -> its mtime_ns and size."""
ERRORS_NAME = "midi2mtf_errors.txt"
"""midi2mtf's list of the files of the last run that failed, one `path: error` a line, in OUT_DIR."""
MANIFEST_SAVE_EVERY = 1000
"""midi2mtf rewrites its manifest after this many conversions (and at the end), so an interrupted
run loses little when it is run again."""
MUSIC_SUFFIXES = (".abc", ".mtf") + MIDI_SUFFIXES
"""Files build-jsonl takes as music."""
KEY_COLUMNS = ("file", "filename", "file_name", "filepath", "path", "location", "music", "id", "name")
"""Caption columns that name the music file (or its id), tried in this order when --key-column is not given."""
TEXT_COLUMNS = ("caption", "description", "analysis", "text", "title", "artists", "genres", "tags",
                "background", "scene")
"""Caption columns taken as text when --text-columns is not given (those present, in this order)."""
SPLIT_NAMES = ("train", "eval", "test")
"""Suffixes of build-jsonl's split files: OUT_train.jsonl, OUT_eval.jsonl (validation), OUT_test.jsonl."""
ABC_TUNE_START = re.compile(r"X:")
ABC_HEADER_LINE = re.compile(r"([A-Za-z]:|%%)")
SHOWN_PROBLEMS = 20
"""How many problem lines the terminal shows before '... and N more' (files hold them all)."""


# --------------------------------------------------------------------------------------------
# Shared helpers


def find_files(root, suffixes):
    """Files under `root` (recursively) whose suffix, lower-cased, is in `suffixes`; sorted paths
    relative to `root`. Hidden files and folders (names starting with '.') are left out."""
    root = Path(root)
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                found.append((Path(folder) / name).relative_to(root))
    return sorted(found)


def run_parallel(func, jobs, workers, desc, progress=True):
    """Yield `(job, func(*job))` for every tuple in `jobs`, with a tqdm bar.

    workers <= 1 runs in this process, in order; otherwise in a ProcessPoolExecutor of `workers`
    processes (results in completion order), with at most 4 jobs per worker in flight so that a
    million files do not become a million futures. `func` must be a top-level function.
    """
    jobs = list(jobs)
    with tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                yield job, func(*job)
                bar.update()
            return
        queue = iter(jobs)
        with ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(func)) as pool:
            pending = {pool.submit(func, *job): job for job in itertools.islice(queue, workers * 4)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    for following in itertools.islice(queue, 1):
                        pending[pool.submit(func, *following)] = following
                    yield job, future.result()
                    bar.update()


def worker_context(func):
    """The multiprocessing context of worker pools: forkserver where there is one (workers start
    clean, whatever threads, CUDA or tokenizer state this process holds), with func's module
    preloaded in the server so that the package (torch included) is imported once, not once per
    worker; spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([func.__module__])
    return context


def default_workers():
    """Worker processes when --workers is not given: the CPU cores, at most 32."""
    return min(os.cpu_count() or 1, 32)


def report_problems(title, problems, path=None):
    """Print `title` and the first SHOWN_PROBLEMS problem lines to stderr; with `path`, write all of
    them there (one a line) and say so."""
    if not problems:
        return
    print(f"{title}: {len(problems)}", file=sys.stderr)
    for line in problems[:SHOWN_PROBLEMS]:
        print(f"  {line}", file=sys.stderr)
    if len(problems) > SHOWN_PROBLEMS:
        print(f"  ... and {len(problems) - SHOWN_PROBLEMS} more", file=sys.stderr)
    if path is not None:
        atomic_write_text(path, "".join(line + "\n" for line in problems))
        print(f"  full list: {path}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# midi2mtf


def source_stamp(path):
    """What tells midi2mtf a source file is unchanged: its modification time (ns) and size."""
    stat = os.stat(path)
    return {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size}


def load_manifest(path):
    """The midi2mtf manifest at `path` ({relative source: stamp}); {} when there is none yet.
    A manifest that is not valid JSON is an error (delete it, or pass --force)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable midi2mtf manifest ({error}); delete it or pass --force "
                        "to convert everything again") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{path}: not a midi2mtf manifest; delete it or pass --force")
    return manifest["files"]


def convert_midi_file(source, target):
    """Convert one MIDI file to MTF, written atomically to `target` (folders made as needed).
    Returns None on success or the error message (which names the file). Top-level for the pool."""
    try:
        text = midi_to_mtf(source)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
    except MusicFormatError as error:
        return str(error)
    except OSError as error:
        return f"{source}: cannot write {target} ({error})"
    return None


def plan_midi2mtf(in_dir, out_dir, manifest, force):
    """Decide, for every MIDI file under in_dir, what midi2mtf does with it.

    Returns (jobs, skipped, clashes): jobs are (relative source, absolute source, absolute target)
    to convert; skipped counts files whose manifest stamp matches and whose .mtf exists; clashes are
    error lines for files whose .mtf name another file already takes (a.mid and a.midi).
    """
    jobs, skipped, clashes, owners = [], 0, [], {}
    for relative in find_files(in_dir, MIDI_SUFFIXES):
        source, target = Path(in_dir) / relative, Path(out_dir) / relative.with_suffix(".mtf")
        if target in owners:
            clashes.append(f"{source}: not converted, its output {target} is already the output of "
                           f"{owners[target]}; rename one of them")
            continue
        owners[target] = source
        key = relative.as_posix()
        if not force and manifest.get(key) == source_stamp(source) and target.exists():
            skipped += 1
            continue
        jobs.append((key, str(source), str(target)))
    return jobs, skipped, clashes


def midi2mtf(in_dir, out_dir, workers=None, force=False, progress=True):
    """Convert every .mid/.midi under in_dir to .mtf under out_dir, mirroring the folders.

    A file is skipped when the manifest (OUT_DIR/midi2mtf_manifest.json) records the same source
    modification time and size as now and its .mtf exists; `force` converts everything. A file that
    fails is listed (and its stale .mtf from an earlier version of the source, if any, removed); the
    manifest is saved every MANIFEST_SAVE_EVERY conversions and at the end, even on Ctrl+C.
    Returns {"converted", "skipped", "failed", "errors": [lines]}; the errors are also written to
    OUT_DIR/midi2mtf_errors.txt (removed when there are none).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise DataError(f"input folder not found: {in_dir}")
    if out_dir.resolve() == in_dir.resolve():
        raise DataError("OUT_DIR must differ from IN_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path, errors_path = out_dir / MANIFEST_NAME, out_dir / ERRORS_NAME
    manifest = {} if force else load_manifest(manifest_path)
    jobs, skipped, errors = plan_midi2mtf(in_dir, out_dir, manifest, force)
    keys = {source: key for key, source, _ in jobs}
    stamps = {key: source_stamp(source) for key, source, _ in jobs}
    converted = 0
    try:
        for (source, target), error in run_parallel(
                convert_midi_file, [(source, target) for _, source, target in jobs],
                workers if workers is not None else default_workers(), "midi2mtf", progress):
            key = keys[source]
            if error is None:
                manifest[key] = stamps[key]
                converted += 1
                if converted % MANIFEST_SAVE_EVERY == 0:
                    atomic_write_json(manifest_path, {"files": manifest})
            else:
                manifest.pop(key, None)
                Path(target).unlink(missing_ok=True)
                errors.append(error)
    finally:
        atomic_write_json(manifest_path, {"files": manifest})
    if errors:
        atomic_write_text(errors_path, "".join(line + "\n" for line in errors))
    else:
        errors_path.unlink(missing_ok=True)
    return {"converted": converted, "skipped": skipped, "failed": len(errors), "errors": errors}


def cmd_midi2mtf(args):
    """midi2mtf subcommand: convert, print the counts and the error list; exit 1 when a file failed."""
    result = midi2mtf(args.in_dir, args.out_dir, args.workers, args.force, progress=not args.quiet)
    print(f"midi2mtf: {result['converted']} converted, {result['skipped']} unchanged (skipped), "
          f"{result['failed']} failed")
    report_problems("files that failed", result["errors"])
    if result["errors"]:
        print(f"  full list: {Path(args.out_dir) / ERRORS_NAME}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# split-abc


def split_abc_text(text, keep_file_header=True):
    """Split the text of an ABC file into tunes: (file header, [tune texts]).

    A tune starts at a line beginning with 'X:' and runs to the next such line; trailing blank lines
    are dropped and each tune ends with one line break. The file header is what comes before the
    first 'X:' line, reduced to its field lines ('T:', 'M:', ...) and '%%' directives (free text and
    '%' comments are dropped, as they are not music); with `keep_file_header` it is put at the top
    of every tune, where it applies in the original file, and '' is returned for it otherwise.
    Text without any 'X:' line gives no tunes.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if ABC_TUNE_START.match(line)]
    if not starts:
        return "", []
    header_lines = [line for line in lines[:starts[0]] if ABC_HEADER_LINE.match(line)]
    header = "".join(line + "\n" for line in header_lines) if keep_file_header else ""
    tunes = []
    for start, end in zip(starts, starts[1:] + [len(lines)]):
        body = "\n".join(lines[start:end]).rstrip() + "\n"
        tunes.append(header + body)
    return header, tunes


def split_abc(inputs, out_dir, keep_file_header=True):
    """Split every .abc file of `inputs` (files, or folders searched recursively) into one file per
    tune under out_dir: `<stem>_0001.abc`, `<stem>_0002.abc`, ... in the order of the tunes, in the
    input's folder mirrored (a file given directly goes to out_dir itself).

    A file without any 'X:' line is copied as one tune and listed as a warning; a file that is not
    UTF-8 text is listed as an error and skipped. Returns {"files", "tunes", "warnings", "errors"}.
    """
    out_dir = Path(out_dir)
    sources = []
    for given in map(Path, inputs):
        if given.is_dir():
            sources.extend((given / rel, rel.parent) for rel in find_files(given, (".abc",)))
        elif given.is_file():
            sources.append((given, Path()))
        else:
            raise DataError(f"input not found: {given}")
    tunes_written, warnings, errors = 0, [], []
    for source, subfolder in tqdm(sources, desc="split-abc", unit="file"):
        try:
            text = source.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            errors.append(f"{source}: not UTF-8 text ({error.reason} at byte {error.start}); skipped")
            continue
        except OSError as error:
            errors.append(f"{source}: cannot read ({error}); skipped")
            continue
        _, tunes = split_abc_text(text, keep_file_header)
        if not tunes:
            if not text.strip():
                errors.append(f"{source}: empty file; skipped")
                continue
            warnings.append(f"{source}: no 'X:' line; written as one tune")
            tunes = [text.rstrip() + "\n"]
        width = max(4, len(str(len(tunes))))
        folder = out_dir / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        for number, tune in enumerate(tunes, start=1):
            atomic_write_text(folder / f"{source.stem}_{number:0{width}d}.abc", tune)
        tunes_written += len(tunes)
    return {"files": len(sources), "tunes": tunes_written, "warnings": warnings, "errors": errors}


def cmd_split_abc(args):
    """split-abc subcommand: split, print counts and problems; exit 1 when a file was skipped."""
    result = split_abc(args.inputs, args.out_dir, keep_file_header=args.file_header)
    print(f"split-abc: {result['files']} files -> {result['tunes']} tunes in {args.out_dir}")
    report_problems("warnings", result["warnings"])
    report_problems("files skipped", result["errors"])
    return 1 if result["errors"] else 0


# --------------------------------------------------------------------------------------------
# build-jsonl


def read_caption_rows(path):
    """Rows of a caption file as a list of {column: value} dicts with the file's line (CSV) or item
    number (JSON) under '_where'.

    CSV: a header row, then one row per piece. JSON: a list of objects; or an object mapping a key
    to a caption string or to an object of text fields (the key becomes column 'key'). JSON Lines
    (.jsonl): one object a line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            return [dict(row, _where=f"{path}:{reader.line_num}") for row in reader]
    if suffix == ".jsonl":
        return _read_caption_jsonl(path)
    if suffix != ".json":
        raise DataError(f"{path}: caption file must be .csv, .tsv, .json or .jsonl")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        # MidiCaps ships its captions as JSON Lines under a .json name
        if error.msg == "Extra data":
            return _read_caption_jsonl(path)
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
    if isinstance(data, dict):
        rows = []
        for key, value in data.items():
            fields = value if isinstance(value, dict) else {"caption": value}
            rows.append(dict(fields, key=key, _where=f"{path}: key {key!r}"))
        return rows
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return [dict(item, _where=f"{path}: item {n}") for n, item in enumerate(data, start=1)]
    raise DataError(f"{path}: a JSON caption file must hold a list of objects or an object of captions")


def _read_caption_jsonl(path):
    """Rows of a JSON Lines caption file (blank lines ignored; a bad line is an error naming it)."""
    rows = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from error
            if not isinstance(item, dict):
                raise DataError(f"{path}:{number}: not a JSON object")
            rows.append(dict(item, _where=f"{path}:{number}"))
    return rows


def pick_columns(rows, key_column, text_columns, path):
    """The key column and text columns to use: the given ones (checked to exist), else the first of
    KEY_COLUMNS present and every TEXT_COLUMNS column present."""
    columns = list(dict.fromkeys(name for row in rows for name in row if name != "_where"))
    if key_column is None:
        key_column = next((name for name in ("key",) + KEY_COLUMNS if name in columns), None)
        if key_column is None:
            raise DataError(f"{path}: no key column found among {columns}; name it with --key-column")
    elif key_column not in columns:
        raise DataError(f"{path}: no column {key_column!r}; columns are {columns}")
    if text_columns is None:
        text_columns = [name for name in TEXT_COLUMNS if name in columns and name != key_column]
        if not text_columns:
            raise DataError(f"{path}: no text column found among {columns}; name them with --text-columns")
    else:
        missing = [name for name in text_columns if name not in columns]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; columns are {columns}")
    return key_column, text_columns


def row_texts(row, text_columns):
    """{column: text} of a caption row's non-empty text columns (lists of strings joined by ', ')."""
    texts = {}
    for name in text_columns:
        value = row.get(name)
        if isinstance(value, list):
            value = ", ".join(str(item).strip() for item in value if str(item).strip())
        if isinstance(value, str) and value.strip():
            texts[name] = value.strip()
    return texts


def index_music_files(music_dir, suffixes):
    """{lookup key: [relative paths]} of the music files under music_dir, keyed by relative path,
    by file name and by stem, so a caption may name a file any of these ways."""
    index = {}
    for relative in find_files(music_dir, suffixes):
        for key in dict.fromkeys((relative.as_posix(), relative.name, relative.stem,
                                  relative.with_suffix("").as_posix())):
            index.setdefault(key, []).append(relative)
    return index


def match_captions(rows, music_dir, key_column, text_columns, suffixes):
    """Pair each caption row with its music file under music_dir.

    Returns (pieces, problems): pieces are {"key", "path" (absolute), "texts"}; problems are lines
    for captions without a file, keys that match several files, duplicate captions of one file,
    rows without text, and music files without a caption.
    """
    index = index_music_files(music_dir, suffixes)
    pieces, problems, taken = [], [], {}
    for row in rows:
        key = str(row.get(key_column) or "").strip().replace("\\", "/").removeprefix("./")
        texts = row_texts(row, text_columns)
        if not key:
            problems.append(f"{row['_where']}: no {key_column!r}; row skipped")
            continue
        matches = index.get(key, [])
        if not matches and Path(key).suffix.lower() in MUSIC_SUFFIXES:
            # a caption written for song.mid still finds song.mtf (after midi2mtf)
            matches = index.get(Path(key).with_suffix("").as_posix(), [])
        if not matches:
            problems.append(f"{row['_where']}: missing file: no music file {key!r} under {music_dir}")
            continue
        if len(matches) > 1:
            shown = ", ".join(m.as_posix() for m in matches[:3])
            problems.append(f"{row['_where']}: ambiguous key {key!r} matches {len(matches)} files "
                            f"({shown}); use relative paths as keys")
            continue
        if not texts:
            problems.append(f"{row['_where']}: missing caption: no text in {text_columns} for {key!r}")
            continue
        relative = matches[0]
        if relative in taken:
            problems.append(f"{row['_where']}: duplicate caption for {relative.as_posix()} "
                            f"(first at {taken[relative]}); the first is kept")
            continue
        taken[relative] = row["_where"]
        pieces.append({"key": relative.with_suffix("").as_posix(), "path": Path(music_dir) / relative,
                       "texts": texts})
    uncaptioned = sorted(set(m for ms in index.values() for m in ms) - set(taken))
    problems.extend(f"{Path(music_dir) / m}: missing caption: no caption row names this file"
                    for m in uncaptioned)
    return pieces, problems


def midicaps_pieces(rows, music_dir, replace_suffix=None):
    """Pieces of a MidiCaps-style caption file: each row's `location` (or `music`) is a music path,
    relative to music_dir, and its `caption` (or `description`) the text.

    With `replace_suffix` (e.g. ".mtf") the location's suffix is swapped, for locations written for
    MIDI files that midi2mtf converted. Returns (pieces, problems); rows without a location or
    caption and locations that do not exist are problems.
    """
    pieces, problems, seen = [], [], {}
    for row in rows:
        location = row.get("location") or row.get("music")
        text_field = "caption" if "caption" in row else "description"
        texts = row_texts(row, [text_field])
        if not isinstance(location, str) or not location.strip():
            problems.append(f"{row['_where']}: no 'location' (or 'music'); row skipped")
            continue
        relative = Path(location.strip())
        if replace_suffix:
            relative = relative.with_suffix(replace_suffix)
        path = relative if relative.is_absolute() else Path(music_dir) / relative
        if not texts:
            problems.append(f"{row['_where']}: missing caption for {location!r}")
            continue
        if not path.is_file():
            problems.append(f"{row['_where']}: missing file: {path}")
            continue
        if path in seen:
            problems.append(f"{row['_where']}: duplicate entry for {path} (first at {seen[path]}); "
                            "the first is kept")
            continue
        seen[path] = row["_where"]
        pieces.append({"key": relative.with_suffix("").as_posix(), "path": path,
                       "texts": {"caption": texts[text_field]}})
    return pieces, problems


def make_record(piece, schema, out_folder):
    """One JSON Lines record of a piece in the CLaMP 3 or MidiCaps schema; its music path relative
    to out_folder (the data file's folder) with '/' separators.

    CLaMP 3: {"id", "filepaths": [path], <text column>: text, ...}. MidiCaps: {"location", "caption"}
    with the first of the piece's texts (in --text-columns order) as the caption.
    """
    path = Path(os.path.relpath(os.path.abspath(piece["path"]), os.path.abspath(out_folder))).as_posix()
    if schema == "midicaps":
        return {"location": path, "caption": next(iter(piece["texts"].values()))}
    return {"id": piece["key"], "filepaths": [path], **piece["texts"]}


def split_pieces(pieces, eval_fraction, test_fraction, seed):
    """Seeded train / eval (validation) / test split: {"train": [...], "eval": [...], "test": [...]}.

    Pieces are sorted by key, shuffled with random.Random(seed), and the first round(n * test)
    go to test, the next round(n * eval) to eval, the rest to train; each split is then sorted by
    key. The same pieces and seed always give the same split.
    """
    if eval_fraction < 0 or test_fraction < 0 or eval_fraction + test_fraction >= 1:
        raise ValueError("split fractions must be >= 0 and leave room for training "
                         f"(eval {eval_fraction} + test {test_fraction} < 1)")
    order = sorted(pieces, key=lambda piece: piece["key"])
    random.Random(seed).shuffle(order)
    n_test, n_eval = round(len(order) * test_fraction), round(len(order) * eval_fraction)
    parts = {"test": order[:n_test], "eval": order[n_test:n_test + n_eval], "train": order[n_test + n_eval:]}
    return {name: sorted(parts[name], key=lambda piece: piece["key"]) for name in SPLIT_NAMES}


def write_jsonl(path, records):
    """Write records as JSON Lines (UTF-8, one object a line), atomically."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def split_path(output, name):
    """OUT.jsonl -> OUT_<name>.jsonl."""
    output = Path(output)
    return output.with_name(f"{output.stem}_{name}{output.suffix or '.jsonl'}")


def build_jsonl(pieces, output, schema="clamp3", eval_fraction=0.1, test_fraction=0.1, seed=0):
    """Write the data file(s) of `pieces`: OUT_train/OUT_eval/OUT_test.jsonl (split files that would
    be empty are not written), or OUT itself when both fractions are 0. Returns {path: count}."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if eval_fraction == 0 and test_fraction == 0:
        ordered = sorted(pieces, key=lambda piece: piece["key"])
        write_jsonl(output, [make_record(p, schema, output.parent) for p in ordered])
        return {str(output): len(ordered)}
    written = {}
    for name, part in split_pieces(pieces, eval_fraction, test_fraction, seed).items():
        if part:
            path = split_path(output, name)
            write_jsonl(path, [make_record(p, schema, output.parent) for p in part])
            written[str(path)] = len(part)
    return written


def cmd_build_jsonl(args):
    """build-jsonl subcommand: gather pieces, write the split files, report problems (written to
    OUT_problems.txt); exit 1 with --strict when there are problems, 2 when nothing was usable."""
    rows = read_caption_rows(args.midicaps or args.captions)
    if args.midicaps:
        music_dir = args.music_dir or str(Path(args.midicaps).parent)
        pieces, problems = midicaps_pieces(rows, music_dir, args.replace_suffix)
    else:
        if not args.music_dir:
            raise DataError("--captions needs --music-dir (the folder of the music files)")
        if not Path(args.music_dir).is_dir():
            raise DataError(f"music folder not found: {args.music_dir}")
        text_columns = args.text_columns.split(",") if args.text_columns else None
        key_column, text_columns = pick_columns(rows, args.key_column, text_columns, args.captions)
        suffixes = tuple(s if s.startswith(".") else "." + s for s in args.suffixes.split(","))
        pieces, problems = match_captions(rows, args.music_dir, key_column, text_columns, suffixes)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    problems_path = split_path(args.output, "problems").with_suffix(".txt")
    report_problems("problems (pieces left out)", problems, problems_path if problems else None)
    if not problems:
        problems_path.unlink(missing_ok=True)
    if not pieces:
        print("build-jsonl: no usable piece; nothing written", file=sys.stderr)
        return 2
    written = build_jsonl(pieces, args.output, args.schema, args.eval_fraction, args.test_fraction, args.seed)
    print(f"build-jsonl: {len(pieces)} pieces ({args.schema} schema, seed {args.seed})")
    for path, count in written.items():
        print(f"  {path}: {count}")
    out_folder = os.path.realpath(Path(args.output).parent)
    music_folder = os.path.realpath(music_dir if args.midicaps else args.music_dir)
    if os.path.commonpath([music_folder, out_folder]) != out_folder:
        print(f"note: the music lies outside the data files' folder; train, evaluate and check these files "
              f"with --music-root {music_folder}")
    return 1 if problems and args.strict else 0


# --------------------------------------------------------------------------------------------
# check


def count_patches(path):
    """Patches of the whole piece in a music file (special patches included, nothing cut)."""
    return len(patchify(read_music(path), truncate=None, source=path))


def summarize(values):
    """{"min", "median", "p90", "max", "mean"} of a list of numbers (p90: nearest-rank); {} if empty."""
    if not values:
        return {}
    ordered = sorted(values)
    p90 = ordered[max(0, -(-len(ordered) * 9 // 10) - 1)]
    return {"min": ordered[0], "median": statistics.median(ordered), "p90": p90,
            "max": ordered[-1], "mean": statistics.fmean(ordered)}


def data_statistics(scan, tokenizer, max_patches=MAX_PATCHES, max_text_tokens=128, workers=None,
                    progress=True):
    """Statistics of a scanned data file's usable records.

    Text: tokens of each record's evaluation text with <s> and </s> (min/median/p90/max) and how
    many are longer than max_text_tokens (cut in training and evaluation). Music: patches of every
    distinct music file (special patches included) and how many are longer than max_patches.
    """
    sep = tokenizer.sep_token or tokenizer.eos_token
    text_lengths = [len(tokenizer(evaluation_text(record, sep), verbose=False)["input_ids"])
                    for record in tqdm(scan.records, desc="tokens", unit="text", disable=not progress)]
    paths = list(dict.fromkeys(p for record in scan.records for p in record.paths))
    if workers is None:
        workers = default_workers() if len(paths) >= 256 else 0
    patch_counts = [count for _, count in run_parallel(count_patches, [(p,) for p in paths], workers,
                                                       "patches", progress)]
    return {
        "records": len(scan.records) + len(scan.bad),
        "usable_records": len(scan.records),
        "bad_records": len(scan.bad),
        "bad_share": scan.bad_share,
        "bad_by_reason": scan.counts,
        "dropped_paths_by_reason": scan.dropped_counts,
        "pieces": len(paths),
        "text_tokens": summarize(text_lengths),
        "texts_cut": sum(n > max_text_tokens for n in text_lengths),
        "max_text_tokens": max_text_tokens,
        "patches": summarize(patch_counts),
        "pieces_cut": sum(n > max_patches for n in patch_counts),
        "max_patches": max_patches,
    }


def format_statistics(stats):
    """The statistics as an aligned block of text for the terminal."""
    def row(label, summary):
        if not summary:
            return f"  {label:<20} -"
        return (f"  {label:<20} min {summary['min']}  median {summary['median']:g}  p90 {summary['p90']}  "
                f"max {summary['max']}  mean {summary['mean']:.1f}")
    reasons = ", ".join(f"{reason} {n}" for reason, n in stats["bad_by_reason"].items()) or "none"
    lines = [
        f"  records              {stats['records']} ({stats['usable_records']} usable, "
        f"{stats['bad_records']} bad = {stats['bad_share']:.1%})",
        f"  bad by reason        {reasons}",
        f"  pieces               {stats['pieces']} distinct music files",
        row("text tokens", stats["text_tokens"]),
        f"  texts cut            {stats['texts_cut']} longer than {stats['max_text_tokens']} tokens",
        row("patches per piece", stats["patches"]),
        f"  pieces cut           {stats['pieces_cut']} longer than {stats['max_patches']} patches",
    ]
    if stats["dropped_paths_by_reason"]:
        dropped = ", ".join(f"{reason} {n}" for reason, n in stats["dropped_paths_by_reason"].items())
        lines.insert(2, f"  paths dropped        {dropped} (bad extra paths of usable records)")
    return "\n".join(lines)


def cmd_check(args):
    """check subcommand: scan, list bad records, print statistics; exit 1 past the bad-record limit."""
    tokenizer = load_tokenizer(args.text_model)
    # scan with no limit so the statistics print even when the limit is passed; compare after
    scan = scan_data_file(args.data, limit=1.0, check_music=True, progress=not args.quiet,
                          workers=args.workers, max_patches=args.max_patches, music_roots=args.music_root)
    for bad in scan.bad[:args.show]:
        print(bad)
    if len(scan.bad) > args.show:
        print(f"... and {len(scan.bad) - args.show} more bad records (--show N lists more)")
    for dropped in scan.dropped_paths[:args.show]:
        print(f"{dropped} [path dropped, record kept]")
    stats = data_statistics(scan, tokenizer, args.max_patches, args.max_text_tokens, args.workers,
                            progress=not args.quiet)
    print(f"{args.data}:")
    print(format_statistics(stats))
    if args.json:
        atomic_write_json(args.json, dict(stats, data=str(args.data), bad=[asdict(b) for b in scan.bad],
                                          dropped_paths=[asdict(b) for b in scan.dropped_paths]))
        print(f"statistics and every bad record: {args.json}")
    if scan.bad_share > args.bad_record_limit:
        print(f"FAILED: {len(scan.bad)} of {scan.total} records are bad ({scan.bad_share:.1%}), more "
              f"than the bad-record limit of {args.bad_record_limit:.1%}", file=sys.stderr)
        return 1
    print(f"OK: bad records {scan.bad_share:.1%} <= limit {args.bad_record_limit:.1%}")
    return 0


# --------------------------------------------------------------------------------------------
# Command line


def build_parser():
    """The argparse parser of `python -m clamp3_lora.prepare` and its four subcommands."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m clamp3_lora.prepare", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("midi2mtf", help="convert .mid/.midi files to .mtf, mirroring folders")
    p.add_argument("in_dir", help="folder searched recursively for .mid/.midi files")
    p.add_argument("out_dir", help=f"folder of the .mtf files (also holds {MANIFEST_NAME} and {ERRORS_NAME})")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: the CPU cores, at most 32; 0 or 1: no pool)")
    p.add_argument("--force", action="store_true",
                   help="convert every file again, ignoring the manifest of earlier runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_midi2mtf)

    p = commands.add_parser("split-abc", help="split ABC files holding many tunes into one tune per file")
    p.add_argument("inputs", nargs="+", help=".abc files, or folders searched recursively for them")
    p.add_argument("--out-dir", required=True, help="folder of the tune files (<stem>_0001.abc, ...)")
    p.add_argument("--file-header", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the fields and %%%% directives before a file's first X: line to the top "
                        "of each of its tunes (default: on)")
    p.set_defaults(run=cmd_split_abc)

    p = commands.add_parser("build-jsonl", help="make a data file (with a seeded split) from music + captions")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="CSV/TSV, JSON or JSONL of captions keyed by file name, path or id "
                                           "(needs --music-dir)")
    source.add_argument("--midicaps", help="MidiCaps-style JSON or JSONL file with 'location' and 'caption' fields")
    p.add_argument("--music-dir", help="folder of the music files (for --midicaps: the folder the locations "
                                       "are relative to; default: the file's own folder)")
    p.add_argument("--output", required=True,
                   help="data file to write; with a split: OUT_train.jsonl, OUT_eval.jsonl, OUT_test.jsonl")
    p.add_argument("--schema", choices=("clamp3", "midicaps"), default="clamp3",
                   help="record schema: clamp3 (filepaths + text fields) or midicaps (location + caption)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of pieces for validation (OUT_eval)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of pieces for test (OUT_test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--key-column", help=f"caption column naming the music file or id (default: first of {KEY_COLUMNS})")
    p.add_argument("--text-columns", help="comma-separated caption columns holding text (default: those of "
                                          f"{TEXT_COLUMNS} present)")
    p.add_argument("--suffixes", default=",".join(MUSIC_SUFFIXES), help="music file suffixes searched under --music-dir")
    p.add_argument("--replace-suffix", help="for --midicaps: swap each location's suffix (e.g. .mtf after midi2mtf)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any caption or file is missing")
    p.set_defaults(run=cmd_build_jsonl)

    p = commands.add_parser("check", help="scan a data file: bad records and statistics")
    p.add_argument("data", help="JSON Lines data file")
    p.add_argument("--text-model", default=defaults.text_model,
                   help="tokenizer for the text lengths: hub id or local folder, e.g. demo/tokenizer "
                        f"(default: {defaults.text_model!r})")
    p.add_argument("--bad-record-limit", type=float, default=defaults.bad_record_limit,
                   help="exit 1 when more than this share of the records is bad")
    p.add_argument("--max-patches", type=int, default=defaults.max_patches,
                   help="patches per piece beyond which a piece counts as cut")
    p.add_argument("--max-text-tokens", type=int, default=defaults.max_text_tokens,
                   help="tokens per text beyond which a text counts as cut")
    p.add_argument("--workers", type=int, default=None,
                   help="processes reading the music files (default: all cores for large files)")
    p.add_argument("--show", type=int, default=SHOWN_PROBLEMS, help="bad records to list")
    p.add_argument("--json", help="also write the statistics and every bad record (line, reason, detail) "
                                  "to this JSON file, for scripts")
    p.add_argument("--music-root", action="append", default=[], metavar="DIR",
                   help="a folder music files may lie in besides the data file's own folder (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_check)
    return parser


def main(argv=None):
    """Run a subcommand; its exit code. Errors the project raises on purpose print as one line."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Clamp3LoraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
