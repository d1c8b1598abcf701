"""MIDI -> MTF (SPEC §5) and reading music files: MIDI files written here with mido, expected MTF
lines worked out by hand from the messages written."""
import mido
import pytest

from clamp3_lora.errors import MusicFormatError
from clamp3_lora.mtf import DROPPED_META_TYPES, midi_to_mtf, mtf_line, read_music
from clamp3_lora.patches import patchify


def write_two_track_midi(path):
    """A type-1 file: a conductor track and a piano track, with text meta messages to be dropped."""
    midi = mido.MidiFile(type=1, ticks_per_beat=96, charset="utf-8")
    conductor, piano = mido.MidiTrack(), mido.MidiTrack()
    midi.tracks += [conductor, piano]
    conductor += [
        mido.MetaMessage("track_name", name="Conductor", time=0),
        mido.MetaMessage("set_tempo", tempo=500000, time=0),
        mido.MetaMessage("time_signature", numerator=3, denominator=4, time=0),
        mido.MetaMessage("copyright", text="(c) nobody", time=0),
        mido.MetaMessage("marker", text="D\u00e9but \u266a", time=96),   # absolute 96
        mido.MetaMessage("set_tempo", tempo=400000, time=0),             # absolute 96
    ]
    piano += [
        mido.MetaMessage("track_name", name="Piano \u30d4\u30a2\u30ce", time=0),
        mido.MetaMessage("instrument_name", name="Grand", time=0),
        mido.Message("program_change", channel=1, program=41, time=0),
        mido.Message("note_on", channel=1, note=60, velocity=80, time=0),
        mido.Message("note_on", channel=1, note=64, velocity=80, time=0),
        mido.MetaMessage("lyrics", text="\u30cf\u30ed\u30fc", time=48),  # absolute 48
        mido.Message("note_off", channel=1, note=60, velocity=0, time=48),  # absolute 96
        mido.Message("note_off", channel=1, note=64, velocity=0, time=0),
        mido.Message("sysex", data=[1, 2, 3], time=0),
        mido.MetaMessage("text", text="hi", time=0),
        mido.MetaMessage("cue_marker", text="cue", time=0),
        mido.MetaMessage("device_name", name="dev", time=0),
        mido.Message("note_on", channel=1, note=62, velocity=70, time=10),   # absolute 106
        mido.Message("pitchwheel", channel=1, pitch=-200, time=5),         # absolute 111
        mido.Message("control_change", channel=1, control=64, value=127, time=0),
        mido.Message("note_off", channel=1, note=62, velocity=0, time=20),  # absolute 131
    ]
    midi.save(path)


# The merged track orders messages by absolute time (the conductor first on ties) with delta times
# recomputed, keeps one end_of_track at the end; text meta messages are left out; each line is the
# message type then its fields in mido's dict() order (time comes first for channel messages).
TWO_TRACK_MTF = [
    "ticks_per_beat 96",
    "set_tempo 500000 0",
    "time_signature 3 4 24 8 0",
    "program_change 0 1 41",
    "note_on 0 1 60 80",
    "note_on 0 1 64 80",
    "set_tempo 400000 0",          # absolute 96; the lyric (48) and marker (96) in between dropped
    "note_off 0 1 60 0",
    "note_off 0 1 64 0",
    "sysex 0 [1, 2, 3]",
    "note_on 10 1 62 70",
    "pitchwheel 5 1 -200",
    "control_change 0 1 64 127",
    "note_off 20 1 62 0",
    "end_of_track 0",
]


def test_two_track_midi_to_mtf(tmp_path):
    path = tmp_path / "two.mid"
    write_two_track_midi(path)
    assert midi_to_mtf(path) == "\n".join(TWO_TRACK_MTF)
    assert midi_to_mtf(str(path)) == "\n".join(TWO_TRACK_MTF)


def test_mtf_is_ascii_and_text_meta_dropped(tmp_path):
    path = tmp_path / "two.mid"
    write_two_track_midi(path)
    mtf = midi_to_mtf(path)
    assert mtf.isascii()
    first_words = {line.split(" ")[0] for line in mtf.split("\n")}
    assert not first_words & DROPPED_META_TYPES
    for name in ("Conductor", "Piano", "Grand", "hi", "cue", "dev", "nobody"):
        assert name not in mtf


def test_dropped_types_are_the_spec_list():
    assert DROPPED_META_TYPES == {"text", "copyright", "track_name", "instrument_name", "lyrics",
                                  "marker", "cue_marker", "device_name"}


def test_time_values_and_default_resolution(tmp_path):
    midi = mido.MidiFile(type=0)   # ticks_per_beat defaults to 480
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track += [
        mido.MetaMessage("key_signature", key="Bbm", time=0),
        mido.Message("note_on", channel=9, note=36, velocity=100, time=0),
        mido.Message("note_off", channel=9, note=36, velocity=0, time=1920),
        mido.Message("note_on", channel=9, note=38, velocity=90, time=123456),
        mido.MetaMessage("end_of_track", time=7),
    ]
    path = tmp_path / "drums.midi"
    midi.save(path)
    assert midi_to_mtf(path).split("\n") == [
        "ticks_per_beat 480",
        "key_signature Bbm 0",
        "note_on 0 9 36 100",
        "note_off 1920 9 36 0",
        "note_on 123456 9 38 90",
        "end_of_track 7",
    ]


def test_mtf_line_escapes_unicode_backslash_and_breaks():
    message = mido.MetaMessage("text", text="caf\u00e9 \u4e2d\\\n", time=3)
    assert mtf_line(message) == "text caf\\xe9 \\u4e2d\\\\\\n 3"
    assert mtf_line(mido.Message("note_on", note=60, velocity=80, time=5)) == "note_on 5 0 60 80"


def test_patchify_of_mtf_output(tmp_path):
    path = tmp_path / "two.mid"
    write_two_track_midi(path)
    patches = patchify(midi_to_mtf(path))
    decoded = ["".join(chr(v) for v in p[1:p.index(2)]) for p in patches[1:-1]]
    assert decoded == [
        "ticks_per_beat 96\n",
        "set_tempo 500000 0\n",
        "time_signature 3 4 24 8 0\n",
        "program_change 0 1 41\n",
        "note_on 0 1 60 80\t0 1 64 80\n",
        "set_tempo 400000 0\n",
        "note_off 0 1 60 0\t0 1 64 0\n",
        "sysex 0 [1, 2, 3]\n",
        "note_on 10 1 62 70\n",
        "pitchwheel 5 1 -200\n",
        "control_change 0 1 64 127\n",
        "note_off 20 1 62 0\n",
        "end_of_track 0",
    ]
    assert patches[0] == [1] * 64 and patches[-1] == [1] + [2] * 63


def valid_midi_bytes(tmp_path):
    """The bytes of a small valid MIDI file."""
    path = tmp_path / "valid.mid"
    write_two_track_midi(path)
    return path.read_bytes()


@pytest.mark.parametrize("corruption", ["not_midi", "empty", "truncated", "bad_track_header",
                                        "bad_data_byte"])
def test_corrupt_midi_raises_naming_file(tmp_path, corruption):
    data = valid_midi_bytes(tmp_path)
    corrupt = {
        "not_midi": b"this is not a MIDI file at all",
        "empty": b"",
        "truncated": data[:30],
        "bad_track_header": data[:14] + b"XXXX" + data[18:],
        # a note_on status byte followed by a data byte above 127
        "bad_data_byte": data[:14] + b"MTrk\x00\x00\x00\x04\x00\x90\xff\x40",
    }[corruption]
    path = tmp_path / f"broken_{corruption}.mid"
    path.write_bytes(corrupt)
    with pytest.raises(MusicFormatError, match=f"broken_{corruption}.mid"):
        midi_to_mtf(path)
    with pytest.raises(MusicFormatError, match=f"broken_{corruption}.mid"):
        read_music(path)


def test_missing_midi_raises_naming_file(tmp_path):
    with pytest.raises(MusicFormatError, match="absent.mid"):
        midi_to_mtf(tmp_path / "absent.mid")


# ----------------------------------------------------------------------------- read_music

def test_read_music_abc_text(tmp_path):
    text = "X:1\nT:M\u00e9lodie\nK:C\nab|cd|\n"
    path = tmp_path / "tune.abc"
    path.write_text(text, encoding="utf-8")
    assert read_music(path) == text
    assert read_music(str(path)) == text


def test_read_music_normalises_line_breaks(tmp_path):
    path = tmp_path / "dos.abc"
    path.write_bytes(b"X:1\r\nK:C\r\nab|\rcd|\r\n")
    assert read_music(path) == "X:1\nK:C\nab|\ncd|\n"


def test_read_music_mtf_text_file(tmp_path):
    text = "ticks_per_beat 96\nnote_on 0 0 60 80\n"
    path = tmp_path / "piece.mtf"
    path.write_text(text, encoding="utf-8")
    assert read_music(path) == text


@pytest.mark.parametrize("name", ["two.mid", "TWO.MID", "two.midi"])
def test_read_music_midi_suffixes(tmp_path, name):
    path = tmp_path / name
    write_two_track_midi(path)
    assert read_music(path) == "\n".join(TWO_TRACK_MTF)


def test_read_music_empty_file_is_empty_text(tmp_path):
    path = tmp_path / "empty.abc"
    path.write_bytes(b"")
    assert read_music(path) == ""
    with pytest.raises(MusicFormatError, match="empty.abc"):
        patchify(read_music(path), source=path)


def test_read_music_binary_file(tmp_path):
    path = tmp_path / "image.abc"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(MusicFormatError, match="image.abc.*binary"):
        read_music(path)


def test_read_music_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.abc"
    path.write_bytes("X:1\nT:caf\u00e9\n".encode("latin-1"))
    with pytest.raises(MusicFormatError, match="latin1.abc.*UTF-8"):
        read_music(path)


def test_read_music_missing_file(tmp_path):
    with pytest.raises(MusicFormatError, match="nowhere.abc"):
        read_music(tmp_path / "nowhere.abc")


def test_read_music_directory(tmp_path):
    folder = tmp_path / "folder.abc"
    folder.mkdir()
    with pytest.raises(MusicFormatError, match="folder.abc"):
        read_music(folder)
