"""Data preparation: MIDI -> MTF conversion (MIDI files written here with mido), multi-tune ABC
splitting, building data files with seeded splits, and the data check with its statistics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mido
import pytest

from clamp3_lora import prepare
from clamp3_lora.data import scan_data_file
from clamp3_lora.mtf import midi_to_mtf
from clamp3_lora.patches import patchify

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = ROOT / "demo" / "tokenizer"


def write_midi(path, notes):
    """A one-track MIDI file playing `notes` (MIDI numbers) one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    midi = mido.MidiFile(ticks_per_beat=96)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track.append(mido.MetaMessage("track_name", name="melody", time=0))
    for note in notes:
        track.append(mido.Message("note_on", note=note, velocity=64, time=0))
        track.append(mido.Message("note_off", note=note, velocity=0, time=48))
    midi.save(path)


@pytest.fixture
def midi_tree(tmp_path):
    """IN/one.mid, IN/a/two.midi, IN/a/b/three.MID and a corrupt IN/a/broken.mid."""
    src = tmp_path / "in"
    write_midi(src / "one.mid", [60, 62, 64])
    write_midi(src / "a" / "two.midi", [65, 67])
    write_midi(src / "a" / "b" / "three.MID", [70])
    (src / "a" / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06 this is not a MIDI file")
    (src / "a" / "notes.txt").write_text("not music")
    return src


# --------------------------------------------------------------------------------------------
# midi2mtf


def test_midi2mtf_mirrors_folders_and_lists_the_corrupt_file(midi_tree, tmp_path):
    out = tmp_path / "out"
    result = prepare.midi2mtf(midi_tree, out, workers=2, progress=False)
    assert (result["converted"], result["skipped"], result["failed"]) == (3, 0, 1)
    for relative in ("one.mid", "a/two.midi", "a/b/three.MID"):
        target = out / Path(relative).with_suffix(".mtf")
        assert target.read_text(encoding="utf-8") == midi_to_mtf(midi_tree / relative)
    assert not (out / "a" / "broken.mtf").exists()
    assert len(result["errors"]) == 1 and "broken.mid" in result["errors"][0]
    listed = (out / prepare.ERRORS_NAME).read_text(encoding="utf-8")
    assert "broken.mid" in listed
    manifest = json.loads((out / prepare.MANIFEST_NAME).read_text())["files"]
    assert sorted(manifest) == ["a/b/three.MID", "a/two.midi", "one.mid"]
    assert not list(out.rglob("*.tmp"))


def test_midi2mtf_rerun_skips_unchanged_files_and_redoes_changed_ones(midi_tree, tmp_path):
    out = tmp_path / "out"
    prepare.midi2mtf(midi_tree, out, workers=0, progress=False)
    again = prepare.midi2mtf(midi_tree, out, workers=0, progress=False)
    assert (again["converted"], again["skipped"], again["failed"]) == (0, 3, 1)  # the corrupt one retried

    write_midi(midi_tree / "one.mid", [40, 41, 42, 43, 44])  # new content, new size
    (out / "a" / "two.mtf").unlink()                          # output lost
    third = prepare.midi2mtf(midi_tree, out, workers=0, progress=False)
    assert (third["converted"], third["skipped"]) == (2, 1)
    assert (out / "one.mtf").read_text() == midi_to_mtf(midi_tree / "one.mid")
    assert "note_on 0 0 44 64" in (out / "one.mtf").read_text()

    forced = prepare.midi2mtf(midi_tree, out, workers=0, force=True, progress=False)
    assert (forced["converted"], forced["skipped"]) == (3, 0)


def test_midi2mtf_command_exit_codes_and_name_clash(midi_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare.main(["midi2mtf", str(midi_tree), str(out), "--workers", "0", "--quiet"]) == 1
    assert "broken.mid" in capsys.readouterr().err
    (midi_tree / "a" / "broken.mid").unlink()
    assert prepare.main(["midi2mtf", str(midi_tree), str(out), "--workers", "0", "--quiet"]) == 0
    assert not (out / prepare.ERRORS_NAME).exists()
    write_midi(midi_tree / "one.midi", [50])  # one.mid and one.midi both want one.mtf
    assert prepare.main(["midi2mtf", str(midi_tree), str(out), "--workers", "0", "--quiet"]) == 1
    assert "one.midi" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# split-abc

MULTI_TUNE = """%abc-2.1
%%abc-charset utf-8
M:6/8
A tune book with a free-text introduction.

X:1
T:First
K:D
DFA dfa|]

X:2
T:Second
M:3/4
K:G
GAB c2 d|]
%%
"""


def test_split_abc_keeps_each_tune_header_and_the_file_header(tmp_path):
    header, tunes = prepare.split_abc_text(MULTI_TUNE)
    assert header == "%%abc-charset utf-8\nM:6/8\n"
    assert tunes == [
        "%%abc-charset utf-8\nM:6/8\nX:1\nT:First\nK:D\nDFA dfa|]\n",
        "%%abc-charset utf-8\nM:6/8\nX:2\nT:Second\nM:3/4\nK:G\nGAB c2 d|]\n%%\n",
    ]
    _, bare = prepare.split_abc_text(MULTI_TUNE, keep_file_header=False)
    assert bare[0] == "X:1\nT:First\nK:D\nDFA dfa|]\n"
    for tune in tunes:  # every tune is a piece the patch format takes
        assert len(patchify(tune)) > 2


def test_split_abc_command_writes_one_file_per_tune(tmp_path, capsys):
    src = tmp_path / "books"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "book.abc").write_text(MULTI_TUNE)
    (src / "single.abc").write_text("T:No index\nK:C\nCDE|\n")
    (src / "latin1.abc").write_bytes("X:1\nT:Caf\xe9\nK:C\nC|\n".encode("latin-1"))
    out = tmp_path / "tunes"
    assert prepare.main(["split-abc", str(src), "--out-dir", str(out), "--no-file-header"]) == 1
    err = capsys.readouterr().err
    assert "latin1.abc" in err and "not UTF-8" in err
    assert "single.abc: no 'X:' line" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.abc")) == [
        "single_0001.abc", "sub/book_0001.abc", "sub/book_0002.abc"]
    assert (out / "sub" / "book_0002.abc").read_text().startswith("X:2\nT:Second\n")


# --------------------------------------------------------------------------------------------
# build-jsonl


def make_music_folder(root, count):
    """`count` small ABC tunes root/g<k>/tune<i>.abc (two sub-folders)."""
    for i in range(count):
        path = root / f"g{i % 2}" / f"tune{i:02d}.abc"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"X:{i}\nT:Tune {i}\nK:C\n" + "CDEF|" * (i + 1) + "\n")


def test_build_jsonl_from_csv_splits_without_overlap_and_reports_gaps(tmp_path, capsys):
    music = tmp_path / "music"
    make_music_folder(music, 20)
    captions = tmp_path / "captions.csv"
    rows = ["file,caption,title"] + [f"tune{i:02d}.abc,\"A tune, number {i}\",Tune {i}" for i in range(19)]
    rows.append("ghost.abc,Nobody has this file,Ghost")  # caption without a file; tune19 has no caption
    captions.write_text("\n".join(rows) + "\n")
    out = tmp_path / "data" / "set.jsonl"
    argv = ["build-jsonl", "--music-dir", str(music), "--captions", str(captions), "--output", str(out),
            "--eval-fraction", "0.2", "--test-fraction", "0.1", "--seed", "7"]
    assert prepare.main(argv) == 0
    printed = capsys.readouterr()
    err = printed.err
    assert "ghost.abc" in err and "tune19.abc: missing caption" in err
    assert f"with --music-root {music}" in printed.out  # the music is not under data/
    problems = (tmp_path / "data" / "set_problems.txt").read_text()
    assert "ghost.abc" in problems and "tune19.abc" in problems

    splits = {name: [json.loads(line) for line in (tmp_path / "data" / f"set_{name}.jsonl").open()]
              for name in ("train", "eval", "test")}
    sizes = {name: len(records) for name, records in splits.items()}
    assert sizes == {"train": 13, "eval": 4, "test": 2}
    ids = [record["id"] for records in splits.values() for record in records]
    assert len(ids) == len(set(ids)) == 19
    first = splits["train"][0]
    assert first["filepaths"][0].startswith("../music/g")
    assert first["caption"].startswith("A tune, number") and first["title"].startswith("Tune")
    for name in splits:  # paths resolve from the data file's folder; every record usable
        scan = scan_data_file(tmp_path / "data" / f"set_{name}.jsonl", limit=0.0, music_roots=[tmp_path / "music"])
        assert len(scan.records) == sizes[name]

    assert prepare.main(argv + ["--strict"]) == 1
    again = {name: (tmp_path / "data" / f"set_{name}.jsonl").read_text() for name in splits}
    assert again == {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits[name])
                     for name in splits}  # same seed, same split
    assert prepare.main(argv[:-1] + ["8"]) == 0
    other = [json.loads(line)["id"] for line in (tmp_path / "data" / "set_test.jsonl").open()]
    assert other != [record["id"] for record in splits["test"]]


def test_split_pieces_is_seeded_and_partitions():
    pieces = [{"key": f"k{i:03d}", "path": f"p{i}", "texts": {"caption": "x"}} for i in range(100)]
    a = prepare.split_pieces(pieces, 0.1, 0.2, seed=1)
    b = prepare.split_pieces(list(reversed(pieces)), 0.1, 0.2, seed=1)
    assert a == b  # input order does not matter, the seed does
    keys = [p["key"] for part in a.values() for p in part]
    assert sorted(keys) == [p["key"] for p in pieces]
    assert [len(a[name]) for name in ("train", "eval", "test")] == [70, 10, 20]
    assert prepare.split_pieces(pieces, 0.1, 0.2, seed=2)["test"] != a["test"]
    with pytest.raises(ValueError):
        prepare.split_pieces(pieces, 0.5, 0.5, seed=1)


def test_build_jsonl_from_json_keyed_by_id_in_midicaps_schema(tmp_path):
    music = tmp_path / "music"
    make_music_folder(music, 4)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"tune00": "first", "tune01": {"caption": "second"},
                                    "g0/tune02": "third by relative id", "tune03": ""}))
    out = tmp_path / "all.jsonl"
    assert prepare.main(["build-jsonl", "--music-dir", str(music), "--captions", str(captions),
                         "--output", str(out), "--schema", "midicaps",
                         "--eval-fraction", "0", "--test-fraction", "0"]) == 0
    records = [json.loads(line) for line in out.open()]
    assert records == [{"location": "music/g0/tune00.abc", "caption": "first"},
                       {"location": "music/g0/tune02.abc", "caption": "third by relative id"},
                       {"location": "music/g1/tune01.abc", "caption": "second"}]
    assert "tune03" in (tmp_path / "all_problems.txt").read_text()


def test_build_jsonl_from_midicaps_file_with_converted_music(midi_tree, tmp_path):
    (midi_tree / "a" / "broken.mid").unlink()
    converted = tmp_path / "mtf"
    prepare.midi2mtf(midi_tree, converted, workers=0, progress=False)
    midicaps = tmp_path / "train.json"  # MidiCaps: JSON Lines under a .json name
    lines = [{"location": "one.mid", "caption": "A short rising melody.", "genre": ["pop"]},
             {"location": "a/two.midi", "caption": "Two notes."},
             {"location": "a/missing.mid", "caption": "Not there."},
             {"location": "a/b/three.MID", "caption": ""}]
    midicaps.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out" / "mc.jsonl"
    assert prepare.main(["build-jsonl", "--midicaps", str(midicaps), "--music-dir", str(converted),
                         "--replace-suffix", ".mtf", "--output", str(out),
                         "--eval-fraction", "0", "--test-fraction", "0"]) == 0
    records = [json.loads(line) for line in out.open()]
    assert records == [{"id": "a/two", "filepaths": ["../mtf/a/two.mtf"], "caption": "Two notes."},
                       {"id": "one", "filepaths": ["../mtf/one.mtf"], "caption": "A short rising melody."}]
    problems = (tmp_path / "out" / "mc_problems.txt").read_text()
    assert "missing file" in problems and "missing.mtf" in problems
    assert "missing caption" in problems and "three.MID" in problems


# --------------------------------------------------------------------------------------------
# check


def abc_with_bars(bars):
    """An ABC tune of 2 header lines and `bars` bars, one bar a line: bars + 2 + 2 patches."""
    return "X:1\nK:C\n" + "".join(f"C{i % 7}|\n" for i in range(bars))


@pytest.fixture
def known_data(tmp_path):
    """A data file of 6 records: 4 usable (patch counts 6, 14, 604, 14 with the special patches;
    the last two share one file), one invalid JSON line, one with a missing file."""
    music = tmp_path / "music"
    music.mkdir()
    (music / "short.abc").write_text(abc_with_bars(2))
    (music / "mid.abc").write_text(abc_with_bars(10))
    (music / "long.abc").write_text(abc_with_bars(600))
    long_text = " ".join(f"word{i}" for i in range(300))
    records = [
        {"filepaths": ["music/short.abc"], "analysis": "A short tune."},
        {"filepaths": ["music/mid.abc"], "description": "A middle tune."},
        {"location": "music/long.abc", "caption": long_text},
        "{not json",
        {"filepaths": ["music/nowhere.abc"], "analysis": "Lost."},
        {"location": "music/mid.abc", "caption": "The middle tune again."},
    ]
    path = tmp_path / "known.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_patch_counts_of_the_known_file(known_data):
    music = known_data.parent / "music"
    assert [prepare.count_patches(music / name) for name in ("short.abc", "mid.abc", "long.abc")] == [6, 14, 604]


def test_summarize_uses_nearest_rank_p90():
    assert prepare.summarize([5, 1, 3, 2, 4, 6, 7, 8, 9, 10]) == {
        "min": 1, "median": 5.5, "p90": 9, "max": 10, "mean": 5.5}
    assert prepare.summarize([]) == {}


def test_check_statistics_and_exit_codes(known_data, tmp_path, capsys):
    stats_file = tmp_path / "stats.json"
    code = prepare.main(["check", str(known_data), "--text-model", str(DEMO_TOKENIZER), "--quiet",
                         "--bad-record-limit", "0.5", "--json", str(stats_file)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{known_data}:4: invalid_json" in out
    assert f"{known_data}:5: missing_file" in out
    stats = json.loads(stats_file.read_text())
    assert (stats["records"], stats["usable_records"], stats["bad_records"]) == (6, 4, 2)
    assert stats["bad_by_reason"] == {"invalid_json": 1, "missing_file": 1}
    assert stats["pieces"] == 3
    assert stats["patches"] == {"min": 6, "median": 14, "p90": 604, "max": 604, "mean": 208}
    assert stats["pieces_cut"] == 1
    assert stats["texts_cut"] == 1 and stats["text_tokens"]["max"] > 128
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    texts = ["A short tune.", "A middle tune.", "The middle tune again."]
    assert stats["text_tokens"]["min"] == min(len(tokenizer(text)["input_ids"]) for text in texts)
    assert "1 longer than 512 patches" in out

    # 2 bad of 6 is past a 10% limit: exit 1, statistics still printed
    assert prepare.main(["check", str(known_data), "--text-model", str(DEMO_TOKENIZER), "--quiet",
                         "--bad-record-limit", "0.1"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "patches per piece" in captured.out


def test_check_names_an_unloadable_tokenizer(known_data, capsys):
    code = prepare.main(["check", str(known_data), "--text-model", str(known_data.parent / "no-tokenizer"),
                         "--quiet"])
    assert code == 2
    assert "no-tokenizer" in capsys.readouterr().err


def test_prepare_runs_as_a_module(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "clamp3_lora.prepare", "check", "--help"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--bad-record-limit" in result.stdout and "--text-model" in result.stdout
