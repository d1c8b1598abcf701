"""Music text -> patches (SPEC §4): the golden cases of the official implementation when
../shared/golden is there, and the project's own hand-derived fixtures that always run."""
import json
import random
from functools import lru_cache

import pytest

from clamp3_lora.errors import MusicFormatError
from clamp3_lora.patches import (
    BOS_ID, EOS_ID, MAX_PATCHES, PAD_ID, PATCH_SIZE, is_mtf, patchify, remove_instrument_info,
)
from conftest import GOLDEN

BOS = [1] * 64
EOS = [1] + [2] * 63


def patch(segment):
    """Independent spelling of one patch: BOS, the character codes, EOS, cut to 64, zero-padded."""
    ids = ([1] + [ord(c) for c in segment] + [2])[:64]
    return ids + [0] * (64 - len(ids))


def patches_of(*segments, special=True):
    """The patches of these segments, with BOS/EOS around them when `special`."""
    body = [patch(s) for s in segments]
    return [BOS] + body + [EOS] if special else body


# ----------------------------------------------------------------------------- golden cases

@lru_cache(maxsize=None)
def _read_jsonl(path):
    """The objects of a JSON Lines file (cached: every golden test reads the same two files)."""
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _golden_params(filename):
    """One pytest param per golden case (by index), or one that skips when golden data is absent."""
    path = GOLDEN / filename
    if not path.is_file():
        return [pytest.param(None, id="golden-absent")]
    params = []
    for index, case in enumerate(_read_jsonl(str(path))):
        flavour = "special" if case.get("add_special_patches") else "plain"
        params.append(pytest.param(index, id=f"{index:02d}-{case['name']}-{flavour}"))
    return params


@pytest.mark.parametrize("index", _golden_params("patches.jsonl"))
def test_golden_patches(golden, index):
    case = _read_jsonl(str(golden / "patches.jsonl"))[index]
    truncate = "head" if case["truncate"] else None
    if "reference_error" in case:
        with pytest.raises(MusicFormatError, match="song.abc"):
            patchify(case["text"], add_special_patches=case["add_special_patches"],
                     truncate=truncate, source="song.abc")
        return
    got = patchify(case["text"], add_special_patches=case["add_special_patches"], truncate=truncate)
    assert got == case["patches"]


@pytest.mark.parametrize("index", _golden_params("remove_instrument_info.jsonl"))
def test_golden_remove_instrument_info(golden, index):
    case = _read_jsonl(str(golden / "remove_instrument_info.jsonl"))[index]
    if "reference_error" in case:
        with pytest.raises(MusicFormatError):
            remove_instrument_info(case["text"])
        return
    assert remove_instrument_info(case["text"]) == case["expected"]


def test_golden_files_have_cases(golden):
    """The golden files are not silently empty (the parametrised tests would then test nothing)."""
    assert len(_read_jsonl(str(golden / "patches.jsonl"))) > 10
    assert len(_read_jsonl(str(golden / "remove_instrument_info.jsonl"))) > 10


# ----------------------------------------------------------------------------- own fixtures

def test_constants():
    assert (PATCH_SIZE, MAX_PATCHES, PAD_ID, BOS_ID, EOS_ID) == (64, 512, 0, 1, 2)


# (name, text, expected segments): each derived by hand from SPEC §4.
ABC_CASES = [
    ("headers_and_bars", "X:1\nT:Test\nK:C\nCDEF|GABc|\n",
     ["X:1\n", "T:Test\n", "K:C\n", "CDEF|", "GABc|\n"]),
    ("l18_removed_other_lengths_kept", "X:1\nL:1/8\nL:1/4\nK:C\nab|\n",
     ["X:1\n", "L:1/4\n", "K:C\n", "ab|\n"]),
    ("leading_delimiter_joins_next_piece", "|:ab|cd:|\n", ["|:ab|", "cd:|\n"]),
    # pieces ab, |], |, cd, |, \n -> pairs (ab,|]) (|,cd) (|,\n); then the line's \n once more
    ("adjacent_delimiters_pair_by_position", "ab|]|cd|\n", ["ab|]", "|cd", "|\n\n"]),
    ("text_after_last_bar_dropped", "ab|cd\n", ["ab|\n"]),
    ("line_without_bar_dropped", "X:1\nK:C\nabc\nde|\n", ["X:1\n", "K:C\n", "de|\n"]),
    ("directive_whole", "%%MIDI program 1 |x|\n", ["%%MIDI program 1 |x|\n"]),
    ("lowercase_field_whole", "w:la la|la\n", ["w:la la|la\n"]),
    ("digit_colon_is_not_a_field", "1:ab|\n", ["1:ab|\n"]),
    ("last_line_without_newline", "X:1\nab|cd|", ["X:1\n", "ab|", "cd|\n"]),
    ("double_bar_is_one_delimiter", "ab||cd|]\n", ["ab||", "cd|]\n"]),
    ("transliterated", "T:\u00dcber \u00e9t\u00e9\nab|\n", ["T:Uber ete\n", "ab|\n"]),
    ("carriage_return_is_not_a_break", "X:1\r\nab|\r\n", ["X:1\r\n", "ab|\n"]),
]


@pytest.mark.parametrize("name,text,segments", ABC_CASES, ids=[c[0] for c in ABC_CASES])
@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
def test_abc_own_fixtures(name, text, segments, special):
    assert patchify(text, add_special_patches=special) == patches_of(*segments, special=special)


MTF_CASES = [
    ("same_type_merges",
     "ticks_per_beat 480\nnote_on 0 0 60 80\nnote_on 0 0 64 80\nnote_off 10 0 60 0\n",
     ["ticks_per_beat 480\n", "note_on 0 0 60 80\t0 0 64 80\n", "note_off 10 0 60 0\n"]),
    ("prefix_of_segment_merges",  # 'note' is a prefix of 'note_on ...'
     "ticks_per_beat 96\nnote_on 0 0 60 80\nnote 1 2\n",
     ["ticks_per_beat 96\n", "note_on 0 0 60 80\t1 2\n"]),
    ("merge_fits_exactly",  # 34 + 28 = 62 characters: merged
     "ticks_per_beat 96\ncc " + "x" * 30 + "\ncc " + "y" * 27 + "\n",
     ["ticks_per_beat 96\n", "cc " + "x" * 30 + "\t" + "y" * 27 + "\n"]),
    ("merge_one_too_long",  # 34 + 29 = 63 characters: a new segment
     "ticks_per_beat 96\ncc " + "x" * 30 + "\ncc " + "y" * 28 + "\n",
     ["ticks_per_beat 96\n", "cc " + "x" * 30 + "\n", "cc " + "y" * 28 + "\n"]),
    ("last_line_without_newline",
     "ticks_per_beat 96\nnote_on 0 0 60 80\nend_of_track 0",
     ["ticks_per_beat 96\n", "note_on 0 0 60 80\n", "end_of_track 0"]),
    ("bar_characters_not_split",
     "ticks_per_beat 96\nsysex 0 [1, 2]\n", ["ticks_per_beat 96\n", "sysex 0 [1, 2]\n"]),
    ("l18_line_removed_before_detection",
     "L:1/8\nticks_per_beat 96\nnote_on 0 0 60 80\n",
     ["ticks_per_beat 96\n", "note_on 0 0 60 80\n"]),
]


@pytest.mark.parametrize("name,text,segments", MTF_CASES, ids=[c[0] for c in MTF_CASES])
def test_mtf_own_fixtures(name, text, segments):
    assert patchify(text) == patches_of(*segments)
    assert patchify(text, add_special_patches=False) == patches_of(*segments, special=False)


def test_mtf_merged_segment_fills_patch_exactly():
    text = "ticks_per_beat 96\ncc " + "x" * 30 + "\ncc " + "y" * 27 + "\n"
    merged = patchify(text, add_special_patches=False)[1]
    assert len(merged) == 64 and merged[-1] == EOS_ID and PAD_ID not in merged


def test_first_word_must_be_exactly_ticks_per_beat():
    # 'ticks_per_beat\n' has no space: its first word is the whole line, so this is ABC
    text = "ticks_per_beat\nab|\n"
    assert patchify(text) == patches_of("ab|\n")


def test_segment_length_limits():
    p62, p63, p70 = (patchify("X:" + "a" * (n - 3) + "\n", add_special_patches=False)[0]
                     for n in (62, 63, 70))  # segment = "X:" + k a + "\n"
    assert p62 == [1] + [ord("X"), ord(":")] + [97] * 59 + [10] + [2]
    assert p63 == [1, ord("X"), ord(":")] + [97] * 60 + [10]   # no room for EOS
    assert p70 == [1, ord("X"), ord(":")] + [97] * 61           # cut, no EOS
    short = patchify("X:1\n", add_special_patches=False)[0]
    assert short[:6] == [1, 88, 58, 49, 10, 2] and short[6:] == [0] * 58


def test_patches_are_plain_ascii_ints():
    text = "X:1\nT:M\u00e9lodie \u4e2d\u6587 \u2013 \U0001f3b5\nK:C\nab|cd|\n"
    result = patchify(text)
    assert all(len(p) == 64 for p in result)
    assert all(isinstance(v, int) and 0 <= v <= 127 for p in result for v in p)


def test_is_mtf():
    assert is_mtf("ticks_per_beat 480\nnote_on 0 0 60 80\n")
    assert is_mtf("ticks_per_beat 480")
    assert not is_mtf("X:1\nticks_per_beat 480\n")
    assert not is_mtf("ticks_per_beat\n")
    assert not is_mtf(" ticks_per_beat 480\n")
    assert not is_mtf("")


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("text", ["", "   ", " \t \n  \n", "L:1/8\n", "abc\n", "no bars here"],
                         ids=["empty", "spaces", "mixed_whitespace", "only_l18", "no_bars",
                              "no_bars_no_newline"])
def test_no_content_is_rejected_naming_source(text):
    with pytest.raises(MusicFormatError, match="data/piece.abc"):
        patchify(text, source="data/piece.abc")
    with pytest.raises(MusicFormatError):
        patchify(text, add_special_patches=False)


def test_only_newlines_keeps_official_output():
    # The golden file pins this no-content input: the official output is returned, not an error.
    assert patchify("\n\n\n") == [BOS, EOS]
    assert patchify("\n", add_special_patches=False) == []


@pytest.mark.parametrize("text", ["X:1\n\x00\x01\x02ab|\n", "\x00", "ticks_per_beat 96\n\x00"])
def test_binary_is_rejected(text):
    with pytest.raises(MusicFormatError, match="binary"):
        patchify(text, source="x.abc")


@pytest.mark.parametrize("last", ["|", "|]", "||", ":|", "::"])
def test_lone_final_bar_line_is_rejected(last):
    with pytest.raises(MusicFormatError, match="tune.abc"):
        patchify("X:1\nab|\n" + last, source="tune.abc")
    # with its line break it is fine: one piece, no pair, dropped
    assert patchify("X:1\nab|\n" + last + "\n") == patches_of("X:1\n", "ab|\n")


def test_not_text_is_rejected():
    with pytest.raises(MusicFormatError):
        patchify(b"X:1\nab|\n")


def test_music_format_error_is_a_value_error():
    with pytest.raises(ValueError):
        patchify("")


@pytest.mark.parametrize("kwargs", [{"truncate": "tail"}, {"truncate": True}, {"max_patches": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        patchify("X:1\nab|\n", **kwargs)


# ----------------------------------------------------------------------------- truncation

def long_piece(n_bars=600):
    """ABC with one header and n_bars distinct bars: n_bars + 1 content patches, all different."""
    return "X:1\n" + "".join(f"{i}|" for i in range(n_bars)) + "\n"


def test_untruncated_length():
    assert len(patchify(long_piece(), truncate=None)) == 603
    assert len(patchify(long_piece(), truncate=None, add_special_patches=False)) == 601


def test_head_keeps_bos_and_drops_eos():
    full = patchify(long_piece(), truncate=None)
    head = patchify(long_piece())
    assert head == full[:512]
    assert head[0] == BOS and head[-1] != EOS


def test_head_without_special_patches():
    full = patchify(long_piece(), truncate=None, add_special_patches=False)
    assert patchify(long_piece(), add_special_patches=False) == full[:512]


def test_short_piece_is_never_cut():
    text = long_piece(10)
    full = patchify(text, truncate=None)
    assert patchify(text, truncate="head") == full
    assert patchify(text, truncate="random", rng=random.Random(0)) == full
    assert patchify(text, truncate="random") == full


def test_exactly_max_patches_is_not_cut():
    text = long_piece(509)   # 510 content + BOS + EOS = 512
    result = patchify(text, truncate="random", rng=random.Random(3))
    assert len(result) == 512 and result[0] == BOS and result[-1] == EOS


def test_small_max_patches_counts_special_patches():
    text = long_piece(10)
    assert patchify(text, max_patches=3) == [BOS] + patches_of("X:1\n", "0|", special=False)


def window_start(window, full):
    """Where `window` sits in `full`, asserting it is a contiguous slice (patches are distinct)."""
    start = full.index(window[0])
    assert window == full[start:start + len(window)]
    return start


def test_random_window_is_a_contiguous_slice_covering_head_tail_middle():
    text = long_piece()
    full = patchify(text, truncate=None)
    starts = set()
    for seed in range(200):
        window = patchify(text, truncate="random", rng=random.Random(seed))
        assert len(window) == 512
        start = window_start(window, full)
        starts.add(start)
        if start == 0:
            assert window[0] == BOS and window[-1] != EOS
        elif start == len(full) - 512:
            assert window[-1] == EOS and window[0] != BOS
        else:
            assert BOS not in window and EOS not in window
    tail = len(full) - 512
    assert 0 in starts and tail in starts
    assert any(0 < s < tail for s in starts)


def test_random_window_without_special_patches():
    text = long_piece()
    full = patchify(text, truncate=None, add_special_patches=False)
    for seed in range(20):
        window = patchify(text, truncate="random", rng=random.Random(seed), add_special_patches=False)
        assert len(window) == 512
        window_start(window, full)


def test_random_window_is_deterministic_for_a_seeded_rng():
    text = long_piece()
    first = [patchify(text, truncate="random", rng=random.Random(seed)) for seed in range(10)]
    again = [patchify(text, truncate="random", rng=random.Random(seed)) for seed in range(10)]
    assert first == again
    rng_a, rng_b = random.Random(7), random.Random(7)
    seq_a = [window_start(patchify(text, truncate="random", rng=rng_a), patchify(text, truncate=None))
             for _ in range(5)]
    seq_b = [window_start(patchify(text, truncate="random", rng=rng_b), patchify(text, truncate=None))
             for _ in range(5)]
    assert seq_a == seq_b


def test_random_window_with_custom_max_patches():
    text = long_piece(100)
    full = patchify(text, truncate=None)
    for seed in range(30):
        window = patchify(text, truncate="random", rng=random.Random(seed), max_patches=16)
        assert len(window) == 16
        window_start(window, full)


# ----------------------------------------------------------------------------- instrument names

INSTRUMENT_CASES = [
    ("abc_nm_cut", 'X:1\nV:1 clef=treble nm="Flute" snm="Fl."\nab|\n', "X:1\nV:1 clef=treble\nab|\n"),
    ("abc_snm_only", 'V:2 snm="Vc."\nab|\n', "V:2\nab|\n"),
    ("abc_snm_before_nm", 'V:1 snm="Fl." nm="Flute"\n', 'V:1 snm="Fl."\n'),
    ("abc_last_line_no_newline", 'V:1 nm="Oboe"', "V:1"),
    ("abc_other_lines_untouched", 'T: nm="x"\n[V:1] nm="y" ab|\n%%V: nm="z"\n',
     'T: nm="x"\n[V:1] nm="y" ab|\n%%V: nm="z"\n'),
    ("abc_nm_needs_leading_space", 'V:1 xnm="a"\n', 'V:1 xnm="a"\n'),
    ("abc_program_change_untouched", "X:1\nprogram_change 0 0 41\n", "X:1\nprogram_change 0 0 41\n"),
    ("mtf_programs_zeroed",
     "ticks_per_beat 96\nprogram_change 0 3 41\nnote_on 0 3 60 80\nprogram_change 5 9 127",
     "ticks_per_beat 96\nprogram_change 0 3 0\nnote_on 0 3 60 80\nprogram_change 5 9 0"),
    ("mtf_v_lines_untouched", 'ticks_per_beat 96\nV:1 nm="x"\n', 'ticks_per_beat 96\nV:1 nm="x"\n'),
    ("whitespace_kept", "\n \n", "\n \n"),
    ("unicode_kept", 'T:\u4e2d\u6587\nV:1 nm="\u00e9"\n', "T:\u4e2d\u6587\nV:1\n"),
]


@pytest.mark.parametrize("name,text,expected", INSTRUMENT_CASES, ids=[c[0] for c in INSTRUMENT_CASES])
def test_remove_instrument_info_own_fixtures(name, text, expected):
    assert remove_instrument_info(text) == expected


def test_remove_instrument_info_rejects_empty():
    with pytest.raises(MusicFormatError):
        remove_instrument_info("")


def test_remove_instrument_info_then_patchify():
    text = 'X:1\nV:1 nm="Violin"\nab|\n'
    assert patchify(remove_instrument_info(text)) == patches_of("X:1\n", "V:1\n", "ab|\n")
