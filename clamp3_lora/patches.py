"""Music text -> 64-int patches (CLaMP 3's M3 patch format), and instrument-name removal.

A patch is one segment of text (an ABC header line, an ABC bar, or a group of MTF messages) written as
``[BOS_ID] + [ord(c) for c in segment] + [EOS_ID]``, cut to PATCH_SIZE ints and right-padded with
PAD_ID. A piece becomes at most MAX_PATCHES patches. The rules reproduce the official implementation
exactly (../shared/SPEC.md §4; the golden file patches.jsonl decides every detail), except that input
the official code crashes on is rejected with a MusicFormatError instead.
"""
import random
import re

import numpy as np
from unidecode import unidecode

from .errors import MusicFormatError

PATCH_SIZE = 64
MAX_PATCHES = 512
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2

# Bar lines, tried in this order at each position of an ABC line (one regex alternation).
BAR_DELIMITERS = ("|:", "::", ":|", "[|", "||", "|]", "|")
_BAR_SPLIT = re.compile("(" + "|".join(re.escape(d) for d in BAR_DELIMITERS) + ")")

# Characters of a segment that fit in a patch together with its BOS and EOS ids.
_SEGMENT_ROOM = PATCH_SIZE - 2
_MTF_MAGIC = "ticks_per_beat"
_TRUNCATE_MODES = ("head", "random", None)


def _where(source):
    """Prefix naming the input in error messages."""
    return f"{source}: " if source is not None else "music text: "


def _normalise(text):
    """SPEC §4.1, first half: drop every 'L:1/8' line, then transliterate to ASCII."""
    return unidecode(text.replace("L:1/8\n", ""))


def _split_lines(text):
    """Lines that keep their '\\n' (only '\\n' breaks a line); no empty strings."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _first_word(line):
    """The first word of a line, split at single spaces as the official code does."""
    return line.partition(" ")[0]


def is_mtf(text):
    """True when `text` is MTF: the first word of its first line is 'ticks_per_beat'.

    This looks at the text as given. patchify() makes the same test after its normalisation (the
    'L:1/8' lines removed and the text transliterated), which differs only for texts that start with
    such a line or with non-ASCII look-alikes of 'ticks_per_beat'.
    """
    first_line = "".join(text.partition("\n")[:2])  # with its line break, as patchify sees it
    return _first_word(first_line) == _MTF_MAGIC


def _mtf_segments(lines):
    """SPEC §4.2: group consecutive MTF lines whose first word prefixes the current segment.

    A line joins the current segment (its '\\n' replaced by a tab, then the line without its first
    word) when the segment starts with the line's first word and the result still fits in a patch.
    """
    segments = []
    current = ""
    for line in lines:
        word, _, rest = line.partition(" ")
        if current.startswith(word) and len(current) + len(rest) <= _SEGMENT_ROOM:
            current = current[:-1] + "\t" + rest
        else:
            if current:
                segments.append(current)
            current = line
    if current:
        segments.append(current)
    return segments


def _is_abc_header(line):
    """An ABC line kept whole: 'X:'-style field (letter then colon) or a '%%' directive."""
    return (len(line) >= 2 and line[1] == ":" and line[0].isalpha()) or line.startswith("%%")


def _split_bars(line, source):
    """SPEC §4.3: the bars of one ABC body line (possibly none).

    The line (with its '\\n') is cut at the bar delimiters; a delimiter that starts the line joins the
    next piece; pieces are then paired (text, delimiter) by position, an unpaired last piece (usually
    the line's own '\\n' or text after the last bar line) is dropped, and '\\n' is appended to the last
    bar. Pairing is purely positional, so adjacent delimiters shift it (golden case repeat_marks).
    """
    pieces = [piece for piece in _BAR_SPLIT.split(line) if piece]
    if pieces[0] in BAR_DELIMITERS:
        if len(pieces) == 1:
            # The official code crashes here (it joins the delimiter to a next piece that does not
            # exist); this only happens for a last line that is one bar line without a line break.
            raise MusicFormatError(
                f"{_where(source)}the last line is the bar line {line!r} alone with no line break "
                "after it, which the CLaMP 3 patch format cannot take (end the file with a newline)"
            )
        pieces[0:2] = [pieces[0] + pieces[1]]
    bars = [pieces[i] + pieces[i + 1] for i in range(0, len(pieces) - 1, 2)]
    if bars:
        bars[-1] += "\n"
    return bars


def _abc_segments(lines, source):
    """SPEC §4.3: header lines and directives whole, every other line split into bars."""
    segments = []
    for line in lines:
        if _is_abc_header(line):
            segments.append(line)
        else:
            segments.extend(_split_bars(line, source))
    return segments


def _segment_to_patch(segment):
    """[BOS] + character codes + [EOS], cut to PATCH_SIZE, right-padded with PAD_ID."""
    ids = [BOS_ID]
    ids.extend(map(ord, segment[: PATCH_SIZE - 1]))
    if len(ids) < PATCH_SIZE:
        ids.append(EOS_ID)
        ids.extend([PAD_ID] * (PATCH_SIZE - len(ids)))
    return ids


def _patch_rows(segments):
    """The patches of `segments` as a uint8 array [n, PATCH_SIZE], each row equal to
    _segment_to_patch(segment), built with numpy (one pass over the characters, no per-character
    Python work). Segments are ASCII after _normalise; other text goes row by row."""
    count = len(segments)
    cut = [segment[:PATCH_SIZE - 1] for segment in segments]
    joined = "".join(cut)
    if not joined.isascii():
        return np.array([_segment_to_patch(segment) for segment in segments], dtype=np.int64).reshape(-1, PATCH_SIZE)
    rows = np.zeros((count, PATCH_SIZE), dtype=np.uint8)
    rows[:, 0] = BOS_ID
    lengths = np.fromiter(map(len, cut), dtype=np.int64, count=count)
    chars = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    row_of_char = np.repeat(np.arange(count), lengths)
    starts = np.cumsum(lengths) - lengths
    rows[row_of_char, np.arange(len(chars)) - starts[row_of_char] + 1] = chars
    short = np.flatnonzero(lengths < PATCH_SIZE - 1)
    rows[short, lengths[short] + 1] = EOS_ID
    return rows


def _bos_patch():
    """The special patch that starts a piece: PATCH_SIZE x BOS_ID."""
    return [BOS_ID] * PATCH_SIZE


def _eos_patch():
    """The special patch that ends a piece: BOS_ID then EOS_ID repeated."""
    return [BOS_ID] + [EOS_ID] * (PATCH_SIZE - 1)


def _window_start(n, max_patches, rng):
    """Start of a random window of max_patches among n > max_patches items: head, tail or middle."""
    excess = n - max_patches
    choice = rng.choice(("head", "tail", "middle"))
    if choice == "head":
        return 0
    if choice == "tail":
        return excess
    return rng.randint(0, excess)


def _check_text(text, source):
    """Reject what is not music text at all: not a string, binary content."""
    if not isinstance(text, str):
        raise MusicFormatError(f"{_where(source)}expected text (str), got {type(text).__name__}")
    if "\x00" in text:
        raise MusicFormatError(f"{_where(source)}binary content (NUL bytes), not ABC or MTF text")


def patchify(text, add_special_patches=True, truncate="head", rng=None, max_patches=MAX_PATCHES,
             source=None):
    """ABC or MTF text -> list of patches, each a list of PATCH_SIZE ints in 0..127 (SPEC §4).

    add_special_patches: put a BOS patch first and an EOS patch last (they count in max_patches).
    truncate: "head" keeps the first max_patches patches (evaluation; like the official code this
        keeps BOS and drops EOS when a piece is cut); "random" keeps a random contiguous window of
        max_patches patches of the full sequence -- head, tail or middle, drawn with `rng`, a
        random.Random (a fresh unseeded one when None) -- for training; None keeps everything.
    source: the file the text came from, named in error messages.

    Raises MusicFormatError for binary text, for text the official code crashes on (empty text, a
    last line that is a lone bar line without a line break), and for text without content patches.
    The one exception to the last rule: text made of line breaks only. The golden file pins the
    official output for it (no patches, or just BOS and EOS), so it is returned unchanged and callers
    that need music (data loading) must treat a result without content patches as unusable.
    """
    if truncate not in _TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {_TRUNCATE_MODES}, got {truncate!r}")
    if max_patches < 1:
        raise ValueError(f"max_patches must be at least 1, got {max_patches}")
    rows = patch_array(text, add_special_patches, source)
    start, stop = window(len(rows), truncate, max_patches, rng)
    return rows[start:stop].tolist()


def window(count, truncate, max_patches, rng=None):
    """(start, stop) of the patches patchify keeps of a sequence of `count` patches: all of them
    when they fit or truncate is None, the head for "head", a random window for "random" (drawn
    with `rng`, a fresh unseeded random.Random when None; nothing is drawn when they fit)."""
    if truncate is None or count <= max_patches:
        return 0, count
    if truncate == "head":
        return 0, max_patches
    start = _window_start(count, max_patches, rng if rng is not None else random.Random())
    return start, start + max_patches


def patch_array(text, add_special_patches=True, source=None):
    """Every patch of ABC or MTF text (patchify with truncate=None) as an integer numpy array
    [n, PATCH_SIZE] (uint8: the ids are 0..127). Same checks and errors as patchify."""
    _check_text(text, source)
    normalised = _normalise(text)
    lines = _split_lines(normalised)
    if not lines:
        raise MusicFormatError(f"{_where(source)}empty text, no music to encode")
    if _first_word(lines[0]) == _MTF_MAGIC:
        segments = _mtf_segments(lines)
    else:
        segments = _abc_segments(lines, source)
    # No content patches is an error (whitespace only, or no header and no bar line), except for a
    # text of line breaks only: golden case only_newlines records the official output for it ([] or
    # [BOS, EOS]) and the golden file wins where it has an answer.
    if not segments and normalised.strip("\n"):
        raise MusicFormatError(
            f"{_where(source)}no music found: the text gives no patches (whitespace only, or no "
            "header line and no bar line)"
        )
    rows = _patch_rows(segments)
    if add_special_patches:
        special = np.array([_bos_patch(), _eos_patch()], dtype=rows.dtype)
        rows = np.concatenate([special[:1], rows, special[1:]])
    return rows


def _drop_instrument_names(line):
    """An ABC 'V:' line cut from ' nm=' (else ' snm=') to its end; other lines unchanged."""
    if not line.startswith("V:"):
        return line
    cut = line.find(" nm=")
    if cut < 0:
        cut = line.find(" snm=")
    return line if cut < 0 else line[:cut]


def _zero_program(line):
    """An MTF 'program_change' line with its last number set to 0; other lines unchanged."""
    words = line.split(" ")
    if words[0] != "program_change":
        return line
    words[-1] = "0"
    return " ".join(words)


def remove_instrument_info(text):
    """SPEC §4 rule 6 (a training augmentation): remove what names the instruments.

    ABC: on 'V:' lines, cut from ' nm=' (else ' snm=') to the end of the line (the line break stays).
    MTF: the last number of every 'program_change' line becomes 0. Everything else is unchanged.
    Raises MusicFormatError for empty text (the official code crashes on it).
    """
    if not isinstance(text, str):
        raise MusicFormatError(f"music text: expected text (str), got {type(text).__name__}")
    if not text:
        raise MusicFormatError("music text: empty text, no music to change")
    rewrite = _zero_program if is_mtf(text) else _drop_instrument_names
    return "\n".join(rewrite(line) for line in text.split("\n"))
