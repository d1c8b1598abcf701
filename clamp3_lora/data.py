"""Data: JSON Lines files -> checked records -> training/evaluation samples -> padded batches.

The path of a piece of data through this module:

1. `scan_data_file(path)` reads a JSON Lines file once, up front. Every record is parsed, its schema
   detected (CLaMP 3: `filepaths` + text fields; MidiCaps: `location`/`music` + `caption`/`description`),
   its music file(s) read and cut into patches once. Bad records are skipped and counted by reason;
   too many of them stop the run with a `DataError` before any training. What is left are small
   `Record`s (line number, music paths, text fields, translations).
2. `MusicTextDataset(records, tokenizer, train)[key]` turns one record into one sample. In training
   the key is `(index, sample_seed)` and every random choice of the sample (file, text dropout, text
   window, instrument-name removal, patch window) is drawn from `random.Random(sample_seed)`, so the
   same key gives the same sample in any worker and after a resume.
3. `collate` pads a list of samples to the batch's longest piece and longest text.
4. `make_loader` (keys) and `make_batch_loader` (batches of keys, the trainer's) wrap it all in a `torch.utils.data.DataLoader` with worker processes and pinned
   memory; the sampler (e.g. `distributed.ResumableSampler`, or `SequentialKeys` for evaluation)
   yields the keys.
"""
import functools
import json
import operator
import os
import random
import signal
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .errors import DataError, MusicFormatError
from .mtf import MIDI_SUFFIXES, NOT_MUSIC, music_kind, read_music
from .patches import BOS_ID, EOS_ID, patch_array, patchify, remove_instrument_info, window
from .speed.packing import packing

REASONS = ("invalid_json", "not_object", "too_large", "no_music_path", "no_text", "bad_text",
           "outside_music_root", "missing_file", "unreadable_file", "empty_file", "not_music", "no_patches")
"""Why a record is skipped, in the order they are reported."""

MAX_LINE_BYTES = 16 * 2 ** 20
"""A data file line longer than this is a bad record (too_large) without being parsed."""
MAX_TEXT_CHARS = 100_000
"""A text field longer than this (about 25,000 tokens, where the model reads 128) is a bad record."""
MAX_MUSIC_BYTES = 64 * 2 ** 20
"""A music file larger than this is a bad record (too_large) without being read."""

NON_TEXT_FIELDS = frozenset({"filepaths", "id", "translations", "location", "music"})
"""Fields of a record that are never text candidates."""

EVAL_TEXT_FIELDS = ("analysis", "caption", "description")
"""The field that gives a record's evaluation text: the first of these that is present."""

POOL_MIN_FILES = 256
"""With workers=None, files are checked in a process pool only when there are at least this many."""

SHOWN_BAD_RECORDS = 5
"""How many `file:line: reason` lines a DataError or a summary shows."""

PATCH_CACHE_MB = 256
"""Default memory bound of a dataset's patch cache, per process (each DataLoader worker has its own)."""


# --------------------------------------------------------------------------------------------
# Records and the scan


@dataclass(frozen=True)
class BadRecord:
    """A skipped record (or a dropped path of a kept one): where it is, why, and the details."""
    path: str
    line: int
    reason: str
    detail: str = ""

    def __str__(self):
        return f"{self.path}:{self.line}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Record:
    """One usable record of a data file.

    `paths` are absolute music file paths (a CLaMP 3 record may have several; training picks one at
    random, evaluation the first). `texts` maps each text field to its text (lists of strings joined
    by ", "); `translations` maps each translated field to its text, `language` is the translations'
    language (or None).
    """
    source: str
    line: int
    paths: tuple
    texts: dict
    translations: dict = field(default_factory=dict)
    language: str = None
    schema: str = "clamp3"

    @property
    def where(self):
        """`data_file:line` of the record, for messages."""
        return f"{self.source}:{self.line}"


@dataclass
class ScanResult:
    """What `scan_data_file` found: the usable records, the bad ones, and paths dropped from
    multi-path records that were kept."""
    path: str
    records: list
    bad: list
    dropped_paths: list
    total: int
    """Non-blank lines of the data file (records, good or bad)."""

    @property
    def counts(self):
        """Bad records per reason (only reasons that occur, in REASONS order)."""
        return _count_reasons(self.bad)

    @property
    def dropped_counts(self):
        """Dropped paths of kept multi-path records, per reason."""
        return _count_reasons(self.dropped_paths)

    @property
    def bad_share(self):
        """Bad records / all records (0 for an empty file)."""
        return len(self.bad) / self.total if self.total else 0.0

    def summary(self, show=SHOWN_BAD_RECORDS):
        """A few lines for the preflight and the stage summary: counts, then the first `show` bad
        records as `file:line: reason (detail)`."""
        head = (f"{self.path}: {len(self.records)} of {self.total} records usable, "
                f"{len(self.bad)} bad ({self.bad_share:.1%})")
        if self.bad:
            head += ": " + _format_counts(self.counts)
        if self.dropped_paths:
            head += (f"; {len(self.dropped_paths)} bad paths dropped from multi-path records "
                     f"({_format_counts(self.dropped_counts)})")
        lines = [head] + [f"  {bad}" for bad in self.bad[:show]]
        if len(self.bad) > show:
            lines.append(f"  ... and {len(self.bad) - show} more")
        return "\n".join(lines)


def scan_data_file(path, limit=0.05, check_music=True, progress=False, workers=None,
                   max_patches=512, music_roots=()):
    """Read and check a JSON Lines data file; return its usable records.

    Each non-blank line must be a JSON object of the CLaMP 3 schema (`filepaths` + text fields,
    optional `translations`) or the MidiCaps schema (`location` or `music` + `caption` or
    `description`). Relative music paths resolve against the data file's folder. Every music path
    must lie, symbolic links followed, under the data file's folder or one of `music_roots`
    (--music-root); any other path is `outside_music_root` and is never opened.

    With `check_music` every music file is read (MIDI converted to MTF) and cut into patches once,
    so that unreadable, binary, empty and patch-less files are caught here and nothing is ever
    trained on a placeholder; without it only existence and size are checked. Files are checked in
    a process pool of `workers` processes (None: all cores, up to 16, when there are at least
    POOL_MIN_FILES files; 0 or 1: in this process), with a tqdm bar when `progress`.

    A CLaMP 3 record with several paths keeps its good paths (the bad ones are counted in
    `ScanResult.dropped_paths`) and is bad only when none is good.

    Raises DataError when the file is missing, has no records, has no usable record, or when the
    share of bad records is greater than `limit` (the `--bad-record-limit` setting); in the last two
    cases the error's `scan` attribute holds the ScanResult (for the preflight's report).
    """
    path = os.fspath(path)
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"the bad-record limit must be a share between 0 and 1, got {limit}")
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"data file is not a regular file: {path}")

    roots = music_root_folders(path, music_roots)
    pending, bad, total = _parse_file(path)
    unique_paths = list(dict.fromkeys(p for record in pending for p in record.paths))
    outside = {p: ("outside_music_root", outside_detail(p, roots)) for p in unique_paths if not inside(p, roots)}
    checks = _check_files([p for p in unique_paths if p not in outside], check_music, max_patches, workers,
                          progress, desc=f"checking {os.path.basename(path)}")
    checks.update(outside)

    records, dropped = [], []
    for record in pending:
        good = tuple(p for p in record.paths if checks[p][0] is None)
        failed = [(p, checks[p]) for p in record.paths if checks[p][0] is not None]
        if good:
            records.append(replace(record, paths=good))
            dropped.extend(BadRecord(path, record.line, reason, detail) for _, (reason, detail) in failed)
        else:
            reason, detail = failed[0][1]
            if len(failed) > 1:
                detail += f"; and {len(failed) - 1} more paths, all bad"
            bad.append(BadRecord(path, record.line, reason, detail))
    bad.sort(key=lambda b: b.line)

    result = ScanResult(path=path, records=records, bad=bad, dropped_paths=dropped, total=total)
    if total == 0:
        raise DataError(f"data file has no records: {path}")
    if result.bad_share > limit:
        error = DataError(_limit_message(result, limit))
        error.scan = result
        raise error
    if not records:
        error = DataError(f"no usable record in {path}:\n{result.summary()}")
        error.scan = result
        raise error
    return result


def music_root_folders(data_path, music_roots=()):
    """The folders music paths of a data file may lie in (symbolic links resolved): the data file's
    own folder, then each of `music_roots`; DataError for a root that is not a folder."""
    roots = [os.path.realpath(os.path.dirname(os.path.abspath(data_path)))]
    for root in music_roots:
        if not os.path.isdir(root):
            raise DataError(f"music root not found or not a folder: {root} (--music-root)")
        roots.append(os.path.realpath(root))
    return roots


def inside(path, roots):
    """Whether `path`, symbolic links followed, lies under one of the (resolved) `roots`."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in roots)


def outside_detail(path, roots):
    where = " or ".join(roots)
    return (f"{path} is not under {where}; name the folder that holds the music with --music-root DIR "
            f"(repeatable)")


def check_music_file(path, read=True, max_patches=512):
    """Check one music file: `(None, "")` when it is usable, else `(reason, detail)`.

    Without `read`, only existence, type and size are checked. With it, the file is read (a MIDI
    file converted to MTF) and cut into patches. Top-level so that a process pool can run it.
    """
    if not os.path.exists(path):
        return "missing_file", f"music file not found: {path}"
    if not os.path.isfile(path):
        return "unreadable_file", f"not a regular file: {path}"
    try:
        size = os.path.getsize(path)
    except OSError as error:
        return "unreadable_file", f"{path}: {error}"
    if size == 0:
        return "empty_file", f"empty file: {path}"
    if size > MAX_MUSIC_BYTES:
        return "too_large", f"{path}: {size / 2 ** 20:.0f} MiB, more than a music file can be ({MAX_MUSIC_BYTES // 2 ** 20} MiB)"
    if not read:
        return None, ""
    try:
        text = read_music(path)
    except MusicFormatError as error:
        return "unreadable_file", str(error)
    except OSError as error:
        return "unreadable_file", f"{path}: {error}"
    if not text.strip():
        return "empty_file", f"no music text (only whitespace): {path}"
    if music_kind(text) is None:
        return "not_music", f"{path}: {NOT_MUSIC}"
    try:
        content = patchify(text, add_special_patches=False, truncate="head", max_patches=max_patches,
                           source=path)
    except MusicFormatError as error:
        return "no_patches", str(error)
    if not content:
        return "no_patches", f"{path}: the text gives no patches"
    return None, ""


def _parse_file(path):
    """Parse every non-blank line: (records still to be file-checked, bad records, line count)."""
    base_dir = os.path.dirname(os.path.abspath(path))
    pending, bad, total = [], [], 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            if not raw.strip():
                continue
            total += 1
            if len(raw) > MAX_LINE_BYTES:
                bad.append(BadRecord(path, number, "too_large", f"a line of {len(raw) / 2 ** 20:.0f} MiB, "
                                     f"more than a record can be ({MAX_LINE_BYTES // 2 ** 20} MiB)"))
                continue
            parsed = _parse_line(raw, path, number, base_dir)
            (bad if isinstance(parsed, BadRecord) else pending).append(parsed)
    return pending, bad, total


def _parse_line(raw, path, number, base_dir):
    """One line of a data file -> a Record (paths not yet checked) or a BadRecord."""
    try:
        obj = json.loads(raw.decode("utf-8").strip())
    except UnicodeDecodeError as error:
        return BadRecord(path, number, "invalid_json", f"not UTF-8: {error.reason} at byte {error.start}")
    except json.JSONDecodeError as error:
        return BadRecord(path, number, "invalid_json", f"{error.msg}: column {error.colno}")
    except RecursionError:
        return BadRecord(path, number, "invalid_json", "nested deeper than the JSON reader can follow")
    if not isinstance(obj, dict):
        return BadRecord(path, number, "not_object", f"a JSON {type(obj).__name__}, not an object")

    if "filepaths" in obj:
        schema = "clamp3"
        given = obj["filepaths"]
        given = [given] if isinstance(given, str) else given if isinstance(given, list) else []
        texts = {name: text for name, value in obj.items() if name not in NON_TEXT_FIELDS
                 and (text := _as_text(value))}
    else:
        schema = "midicaps"
        given = [obj.get("location") or obj.get("music")]
        texts = {}
        for name in ("caption", "description"):  # the caption, else the description
            if text := _as_text(obj.get(name)):
                texts = {name: text}
                break
    paths = [p for p in given if isinstance(p, str) and p.strip()]
    if not paths:
        return BadRecord(path, number, "no_music_path",
                         "no 'filepaths' list, 'location' or 'music' with a file path")
    for music in paths:
        if "\x00" in music or not _encodable(music):
            return BadRecord(path, number, "no_music_path", f"{music!r} cannot be a file path "
                                                            "(a NUL byte or a lone surrogate)")

    translations, language = _translations(obj.get("translations"))
    if not texts and not translations:
        return BadRecord(path, number, "no_text", "no non-empty text field")
    for name, text in list(texts.items()) + list(translations.items()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate ("\ud800"): no tokenizer takes it
            return BadRecord(path, number, "bad_text", f"field {name!r}: {error.reason} at character {error.start}")
        if len(text) > MAX_TEXT_CHARS:
            return BadRecord(path, number, "too_large", f"field {name!r}: {len(text):,} characters, more than "
                                                        f"a text can be ({MAX_TEXT_CHARS:,})")
    resolved = tuple(dict.fromkeys(os.path.normpath(os.path.join(base_dir, p)) for p in paths))
    return Record(source=path, line=number, paths=resolved, texts=texts,
                  translations=translations, language=language, schema=schema)


def _encodable(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_text(value):
    """A text field's value as one stripped string ("" when it is not text): lists of strings are
    joined by ", "; other types give ""."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return ", ".join(item.strip() for item in value if isinstance(item, str) and item.strip())
    return ""


def _translations(value):
    """`{"language": ..., field: text}` -> ({field: text}, language); anything else -> ({}, None)."""
    if not isinstance(value, dict):
        return {}, None
    language = value.get("language")
    texts = {name: text for name, item in value.items() if name != "language" and (text := _as_text(item))}
    return texts, language if isinstance(language, str) else None


def _check_files(paths, read, max_patches, workers, progress, desc):
    """Run `check_music_file` on every path, in a process pool when worth it; {path: (reason, detail)}."""
    if workers is None:
        workers = min(os.cpu_count() or 1, 16) if read and len(paths) >= POOL_MIN_FILES else 0
    check = functools.partial(check_music_file, read=read, max_patches=max_patches)
    results = {}
    with tqdm(total=len(paths), desc=desc, unit="file", disable=not progress) as bar:
        if workers <= 1 or len(paths) < 2:
            for path in paths:
                results[path] = check(path)
                bar.update()
            return results
        # The platform's default start method, as DataLoader workers use: fork on Linux starts in
        # milliseconds (forkserver/spawn re-import torch in every worker, seconds each); the checks
        # never touch CUDA, so forking a process that holds it is safe.
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for path, outcome in zip(paths, pool.map(check, paths, chunksize=chunk)):
                results[path] = outcome
                bar.update()
    return results


def _count_reasons(bad):
    """{reason: count} in REASONS order, only reasons that occur."""
    counts = {reason: 0 for reason in REASONS}
    for item in bad:
        counts[item.reason] += 1
    return {reason: n for reason, n in counts.items() if n}


def _format_counts(counts):
    return ", ".join(f"{reason} {n}" for reason, n in counts.items())


def _limit_message(result, limit):
    """The DataError message when the bad share passes the limit."""
    shown = "\n".join(f"  {bad}" for bad in result.bad[:SHOWN_BAD_RECORDS])
    more = len(result.bad) - SHOWN_BAD_RECORDS
    if more > 0:
        shown += f"\n  ... and {more} more"
    return (f"{result.path}: {len(result.bad)} of {result.total} records are bad "
            f"({result.bad_share:.1%}), more than the bad-record limit of {limit:.1%}.\n"
            f"Bad records by reason: {_format_counts(result.counts)}.\n"
            f"First bad records:\n{shown}\n"
            f"Fix or remove these records, or raise the limit with --bad-record-limit "
            f"(a share between 0 and 1; now {limit}).")


# --------------------------------------------------------------------------------------------
# Text


def text_lines(texts):
    """The text candidates of a {field: text} dict: every field's text split into lines, stripped,
    empty lines dropped, duplicates removed (first occurrence kept, field order otherwise)."""
    lines = (line.strip() for text in texts.values() for line in text.splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def training_text(record, sep, rng):
    """CLaMP 3's text dropout, every draw from `rng` (a random.Random).

    With probability 0.5 the candidates are the translation texts, else (or when there are no
    translations) the other text fields; if the record has only translations, those. Each candidate
    line is kept with probability 0.5 (all of them if none survives), the kept ones shuffled and
    joined with `sep` (the tokenizer's separator token).
    """
    fields, translated = text_lines(record.texts), text_lines(record.translations)
    use_translations = bool(translated) and rng.random() < 0.5
    candidates = translated if use_translations or not fields else fields
    kept = [line for line in candidates if rng.random() < 0.5] or list(candidates)
    rng.shuffle(kept)
    return sep.join(kept)


def evaluation_text(record, sep):
    """The deterministic evaluation text: `analysis`, else `caption`, else `description`, else all
    candidate lines (text fields, or translations if there are none) in order, joined with `sep`."""
    for name in EVAL_TEXT_FIELDS:
        if record.texts.get(name):
            return record.texts[name]
    return sep.join(text_lines(record.texts) or text_lines(record.translations))


def special_token_ids(tokenizer):
    """(begin id, end id) that wrap every text: `<s>` and `</s>` for XLM-R (bos/eos, else cls/sep;
    None where the tokenizer has neither)."""
    begin = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return begin, end


def encode_text(tokenizer, text, max_tokens, rng=None, cache=None):
    """Token ids of `text`, at most `max_tokens` long, always `<s> ... </s>`.

    The text is tokenised without special tokens; a body longer than `max_tokens - 2` is cut to a
    window of that length, a random one drawn from `rng` (training) or the head when `rng` is None
    (evaluation); then `<s>` and `</s>` wrap the window. So every text, cut or not, starts with `<s>`
    and ends with `</s>`, as the text encoder saw them in pre-training and as Hugging Face's own
    truncation does for the head; a training window never loses them nor carries a stray one at a
    random place. (A separator `</s>` inside the body, from text dropout, stays where it is.)
    `cache`: a TextCache that remembers the tokens of texts seen before (tokenising is deterministic).
    """
    begin, end = special_token_ids(tokenizer)
    wrappers = [i for i in (begin, end) if i is not None]
    room = max_tokens - len(wrappers)
    if room < 1:
        raise ValueError(f"max_text_tokens={max_tokens} leaves no room for text")
    body = cache.get(text) if cache is not None else None
    if body is None:
        body = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if cache is not None:
            cache.put(text, body)
    if len(body) > room:
        start = rng.randrange(len(body) - room + 1) if rng is not None else 0
        body = body[start:start + room]
    return ([begin] if begin is not None else []) + body + ([end] if end is not None else [])


class TextCache:
    """The token ids of up to `entries` texts (emptied when full): a training text recurs every
    epoch, and tokenising is about half the time of a short piece's sample."""

    def __init__(self, entries=65536):
        self.entries = entries
        self.tokens = {}

    def get(self, text):
        return self.tokens.get(text)

    def put(self, text, ids):
        if len(self.tokens) >= self.entries:
            self.tokens.clear()
        self.tokens[text] = ids


# --------------------------------------------------------------------------------------------
# Dataset


class MusicTextDataset(Dataset):
    """Samples of (music patches, text ids) from scanned records.

    `dataset[(index, sample_seed)]` in training: one file of the record chosen at random, CLaMP 3
    text dropout, a random `max_text_tokens` window of the text, instrument names removed with
    probability `instrument_removal_prob`, a random `max_patches` window of the piece; every draw
    from `random.Random(sample_seed)` in that order, so a key always gives the same sample.
    In evaluation (train=False) the sample is deterministic: the first file, the evaluation text,
    heads, no augmentation; the key may be a plain index or an (index, seed) pair (seed ignored).

    Item: {"patches": LongTensor[L, 64], "text_ids": LongTensor[T], "index": int}. A sample that
    cannot be made although its record passed the scan (its music file changed since, the tokenizer
    refuses its text) is dropped: the item is {"dropped": "data_file:line: why", "index": int}, which
    `collate` leaves out of the batch and lists under the batch's "dropped" key. The same key is
    dropped again after a resume, so runs stay exact.

    Cache: each process (each DataLoader worker) keeps the full patch sequence of the pieces it
    read, per file and instrument-removal variant, and the MTF text of MIDI files, in a PatchCache
    of at most `cache_mb` MiB (0: none); a sample's window is cut from the cached sequence with the
    same draws, so samples are the same with or without it. Entries are keyed by the file's
    modification time and size, so a file that changes is read again. The token ids of the texts
    it tokenised are kept too (a TextCache: a text gives the same ids every time).
    """

    def __init__(self, records, tokenizer, train, max_patches=512, max_text_tokens=128,
                 instrument_removal_prob=0.9, cache_mb=PATCH_CACHE_MB):
        self.cache = PatchCache(int(cache_mb * 2 ** 20))
        self.text_cache = TextCache()
        self.records = list(records)
        self.tokenizer = tokenizer
        self.train = bool(train)
        self.max_patches = max_patches
        self.max_text_tokens = max_text_tokens
        self.instrument_removal_prob = instrument_removal_prob
        self.sep = tokenizer.sep_token or tokenizer.eos_token
        if self.sep is None:
            raise ValueError("the tokenizer has neither a sep nor an eos token to join text candidates")
        if max_patches < 3:
            raise ValueError(f"max_patches must be at least 3 (BOS, music, EOS), got {max_patches}")
        if not 0.0 <= instrument_removal_prob <= 1.0:
            raise ValueError(f"instrument_removal_prob must be in [0, 1], got {instrument_removal_prob}")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, seed = self._parse_key(key)
        try:
            return self._sample(self.records[index], index, seed)
        except SAMPLE_ERRORS as error:
            where, why = self.records[index].where, str(error)
            if not why.startswith(where):
                why = f"{where}: {type(error).__name__}: {why}"
            return {"dropped": why, "index": index}

    def _sample(self, record, index, seed):
        if not self.train:
            path = record.paths[0]
            patches = self._window(record, path, False, "head", None)
            text_ids = encode_text(self.tokenizer, evaluation_text(record, self.sep), self.max_text_tokens,
                                   cache=self.text_cache)
        else:
            rng = random.Random(seed)
            path = rng.choice(record.paths)
            text = training_text(record, self.sep, rng)
            text_ids = encode_text(self.tokenizer, text, self.max_text_tokens, rng, self.text_cache)
            removed = rng.random() < self.instrument_removal_prob
            patches = self._window(record, path, removed, "random", rng)
        return {"patches": torch.from_numpy(patches.astype(np.int64)),
                "text_ids": torch.tensor(text_ids, dtype=torch.long),
                "index": index}

    def _window(self, record, path, removed, truncate, rng):
        """The sample's patches (a numpy array [L, 64]): the window `truncate` keeps of the piece's
        full patch sequence (instrument names removed when `removed`), from the cache if there."""
        stamp = file_stamp(path)
        key = (path, removed, stamp)
        rows = self.cache.get(key) if stamp is not None else None
        if rows is None:
            music = self._music(record, path, stamp)
            if removed:
                music = remove_instrument_info(music)
            rows = self._patch_array(record, path, music)
            if stamp is not None:
                self.cache.put(key, rows, rows.nbytes)
        start, stop = window(len(rows), truncate, self.max_patches, rng)
        patches = rows[start:stop]
        # Only BOS/EOS patches: text that patch_array accepts but that holds no music (line breaks).
        second = patches[:, 1]
        if ((second == BOS_ID) | (second == EOS_ID)).all():
            raise MusicFormatError(f"{record.where}: music file {path} gives no patches any more "
                                   f"(it passed the data scan, so it changed since): only special patches")
        return patches

    def _music(self, record, path, stamp):
        """The file's music text; a MIDI file's MTF is kept in the cache (conversion is slow)."""
        midi = stamp is not None and os.path.splitext(path)[1].lower() in MIDI_SUFFIXES
        key = (path, "mtf", stamp)
        music = self.cache.get(key) if midi else None
        if music is None:
            music = self._read(record, path)
            if midi:
                self.cache.put(key, music, len(music))
        return music

    def _parse_key(self, key):
        """(index, seed) from a key; a plain int is accepted in evaluation only."""
        if isinstance(key, (tuple, list)) and len(key) == 2:
            index, seed = operator.index(key[0]), operator.index(key[1])
        elif not self.train:
            index, seed = operator.index(key), None
        else:
            raise TypeError(f"a training dataset needs (index, sample_seed) keys, got {key!r}")
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} records")
        return index, seed

    @staticmethod
    def _read(record, path):
        try:
            music = read_music(path)
        except (MusicFormatError, OSError) as error:
            raise MusicFormatError(f"{record.where}: music file {path} cannot be read any more "
                                   f"(it passed the data scan, so it changed since): {error}") from error
        if not music.strip():
            raise MusicFormatError(f"{record.where}: music file {path} is empty now "
                                   f"(it passed the data scan, so it changed since)")
        return music

    @staticmethod
    def _patch_array(record, path, music):
        try:
            return patch_array(music, source=path)
        except MusicFormatError as error:
            raise MusicFormatError(f"{record.where}: music file {path} gives no patches any more "
                                   f"(it passed the data scan, so it changed since): {error}") from error


def file_stamp(path):
    """(modification time in ns, size) of a file, or None when it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


class PatchCache:
    """A least-recently-used cache of values with a bound on their total size in bytes (each value
    bigger than the bound is not kept). One per process: DataLoader workers each fill their own."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.entries = OrderedDict()   # key -> (value, size)
        self.bytes = 0

    def get(self, key):
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key, value, size):
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped


# --------------------------------------------------------------------------------------------
# Batches and loaders


SAMPLE_ERRORS = (MusicFormatError, OSError, UnicodeError, ValueError, TypeError)
"""What making one sample may raise when its data went bad after the scan (a changed or vanished
music file; a text the tokenizer refuses: TypeError/ValueError): the sample is dropped and logged."""


def collate(items, pad_id):
    """Pad samples to the batch's longest piece and longest text; dropped items (see
    MusicTextDataset) are left out and listed under "dropped" (a batch of only dropped items is
    {"dropped": [...]}, with no tensors).

    Returns {"patches" [B, Lmax, 64] long (pad patches all 0), "patch_mask" [B, Lmax] long,
    "text_ids" [B, Tmax] long (padded with pad_id), "text_mask" [B, Tmax] long, "index" [B] long}
    plus the packing of each mask (fast.packing, computed here on the CPU so that the fast path
    needs no host sync on the GPU): "patch_index" [P] long, "patch_cu" [B + 1] int32, "text_index"
    [T] long, "text_cu" [B + 1] int32.
    """
    dropped = [item["dropped"] for item in items if "dropped" in item]
    items = [item for item in items if "dropped" not in item]
    if not items:
        return {"dropped": dropped}
    patches = pad_sequence([item["patches"] for item in items], batch_first=True, padding_value=0)
    text_ids = pad_sequence([item["text_ids"] for item in items], batch_first=True, padding_value=pad_id)
    patch_lengths = torch.tensor([len(item["patches"]) for item in items])
    text_lengths = torch.tensor([len(item["text_ids"]) for item in items])
    batch = {"patches": patches,
             "patch_mask": _length_mask(patch_lengths, patches.shape[1]),
             "text_ids": text_ids,
             "text_mask": _length_mask(text_lengths, text_ids.shape[1]),
             "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}
    if dropped:
        batch["dropped"] = dropped
    return add_packing(batch)


def has_samples(batch):
    """Whether a collated batch holds any sample (every one may have been dropped)."""
    return "patches" in batch


def add_packing(batch):
    """The batch with the packing of its masks added (see collate); returns the same dict."""
    batch["patch_index"], batch["patch_cu"] = packing(batch["patch_mask"])
    batch["text_index"], batch["text_cu"] = packing(batch["text_mask"])
    return batch


def _length_mask(lengths, width):
    """[B, width] long mask: 1 where the position is inside the sample's length."""
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


class Collator:
    """`collate` with the tokenizer's pad id bound; picklable, for DataLoader workers."""

    def __init__(self, pad_id):
        self.pad_id = int(pad_id)

    def __call__(self, items):
        return collate(items, self.pad_id)


class SequentialKeys(Sampler):
    """Evaluation sampler: the plain indices 0 .. n-1 in order."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


def make_loader(dataset, sampler, batch_size, num_workers=0, pin_memory=True, collate_fn=None,
                drop_last=False, prefetch_factor=4):
    """A DataLoader over `dataset` fetching the keys `sampler` yields.

    Worker processes stay alive between epochs (persistent) and prefetch `prefetch_factor` batches
    each; batches are pinned when `pin_memory` and CUDA is available. `collate_fn` defaults to a
    Collator with the dataset tokenizer's pad id.
    """
    if collate_fn is None:
        collate_fn = Collator(dataset.tokenizer.pad_token_id)
    workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory and torch.cuda.is_available(),
                      drop_last=drop_last, persistent_workers=workers,
                      prefetch_factor=prefetch_factor if workers else None)


def ignore_stop_signals(worker_id):
    """DataLoader worker start: leave SIGINT/SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_batch_loader(dataset, batch_sampler, num_workers, device):
    """The trainer's DataLoader over a sampler of batches of keys (distributed.ResumableSampler):
    workers that leave stop signals to the main process, pinned memory on the GPU. Its own
    generator keeps the global RNG untouched (so resumed runs draw the same dropout masks)."""
    workers = num_workers > 0
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      collate_fn=Collator(dataset.tokenizer.pad_token_id),
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=workers,
                      prefetch_factor=4 if workers else None,
                      worker_init_fn=ignore_stop_signals if workers else None,
                      generator=torch.Generator())
