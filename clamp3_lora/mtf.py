"""MIDI -> MTF ("MIDI text format", SPEC §5) with mido, and reading music files as text."""
import re
from pathlib import Path

import mido

from .errors import MusicFormatError

MIDI_SUFFIXES = (".mid", ".midi")

# Meta messages that carry free text; MTF leaves them out.
DROPPED_META_TYPES = frozenset({
    "text", "copyright", "track_name", "instrument_name", "lyrics", "marker", "cue_marker",
    "device_name",
})

NOT_MUSIC = ("neither ABC (a K: field followed by a line of music with a bar line) nor MTF (a first "
             "line 'ticks_per_beat N') nor MIDI")
"""Why a text is not music (music_kind gave None), for messages."""
_MTF_FIRST_LINE = re.compile(r"ticks_per_beat \d+")
_ABC_FIELD = re.compile(r"[A-Za-z]:")

# What mido raises on a file that is missing, unreadable or not valid MIDI.
_MIDI_READ_ERRORS = (OSError, EOFError, ValueError, IndexError, KeyError)


def mtf_line(message):
    """One MTF line: the values of message.dict() joined by spaces, escaped to ASCII.

    For example 'note_on <time> <channel> <note> <velocity>'. Non-ASCII characters, backslashes and
    control characters are written as Python escapes ('unicode_escape'), so a line never breaks.
    """
    line = " ".join(str(value) for value in message.dict().values())
    return line.encode("unicode_escape").decode("utf-8")


def _keeps(message):
    """False for the meta messages MTF drops (free text such as names, lyrics and markers)."""
    return not (message.is_meta and message.type in DROPPED_META_TYPES)


def midi_to_mtf(path):
    """MIDI file -> MTF text: 'ticks_per_beat <N>' then one line per message of the merged track.

    Text-bearing meta messages (DROPPED_META_TYPES) are left out; lines are joined by '\\n' (no
    trailing newline). Raises MusicFormatError naming the file when it is missing or not valid MIDI.
    """
    try:
        midi = mido.MidiFile(path)
        lines = [f"ticks_per_beat {midi.ticks_per_beat}"]
        lines.extend(mtf_line(message) for message in midi.merged_track if _keeps(message))
    except _MIDI_READ_ERRORS as error:
        raise MusicFormatError(f"{path}: cannot read MIDI file ({type(error).__name__}: {error})") \
            from error
    return "\n".join(lines)


def _read_text(path):
    """A text music file as a str: UTF-8, line breaks as '\\n' (as text-mode open() gives them)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise MusicFormatError(f"{path}: cannot read file ({error.strerror or error})") from error
    if b"\x00" in data:
        raise MusicFormatError(f"{path}: binary file (NUL bytes), not ABC or MTF text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MusicFormatError(
            f"{path}: not UTF-8 text (invalid byte 0x{data[error.start]:02x} at offset {error.start})"
        ) from error
    return text.replace("\r\n", "\n").replace("\r", "\n")


def music_kind(text):
    """"mtf", "abc" or None: the rule that tells music from other text (README: "What counts as music").

    MTF: the first non-blank line is `ticks_per_beat N`, as every MTF begins (midi_to_mtf).
    ABC: a `K:` (key) field line, the field that ends every ABC tune header, followed later by at
    least one line of music: a line that is neither a field (`X:`) nor a comment (`%`) and holds a
    bar line (`|`).
    """
    lines = text.lstrip("\ufeff").splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if _MTF_FIRST_LINE.fullmatch(first):
        return "mtf"
    key_seen = False
    for line in lines:
        line = line.strip()
        if line.startswith("K:"):
            key_seen = True
        elif key_seen and "|" in line and not line.startswith("%") and not _ABC_FIELD.match(line):
            return "abc"
    return None


def read_music(path):
    """The music of a file as text: MTF for .mid/.midi files, the UTF-8 text of any other file.

    Text files keep their content; Windows and old-Mac line breaks become '\\n', as Python's
    text-mode open() turns them. Raises
    MusicFormatError naming the file when it is missing, unreadable, binary, not UTF-8 or bad MIDI.
    """
    if Path(path).suffix.lower() in MIDI_SUFFIXES:
        return midi_to_mtf(path)
    return _read_text(path)
