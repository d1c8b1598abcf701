"""Data files, the bad-record scan, text dropout, samples, collation and loaders (CPU, offline).

Every fixture is built here in tmp_path: music files, JSONL files, a MIDI file written with mido,
and a tiny word-level tokenizer with XLM-R's special ids (<s>=0, <pad>=1, </s>=2, <unk>=3).
"""
import json
import random
import re

import mido
import pytest
import torch

from clamp3_lora.data import (REASONS, Collator, MusicTextDataset, Record, SequentialKeys, TextCache,
                              collate, encode_text, evaluation_text, has_samples, make_loader,
                              scan_data_file, text_lines, training_text)
from clamp3_lora.errors import DataError
from clamp3_lora.mtf import music_kind
from trainer_fixtures import word_tokenizer

ABC = 'X:1\nT:Test tune\nM:4/4\nL:1/8\nK:C\nV:1 nm="Piano" snm="Pno"\nCDEF GABc|cBAG FEDC|\n'
ABC_OTHER = "X:2\nT:Other tune\nM:3/4\nK:G\nGAB|dcB|\n"
SEP = "</s>"


def write(path, content):
    """Write text (str) or bytes to path, creating folders; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path, rows):
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    return write(path, "\n".join(lines) + "\n")


def write_midi(path):
    """A small valid MIDI file: a program change, three notes."""
    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track.append(mido.MetaMessage("track_name", name="Lead", time=0))
    track.append(mido.Message("program_change", channel=0, program=5, time=0))
    for note in (60, 64, 67):
        track.append(mido.Message("note_on", channel=0, note=note, velocity=80, time=0))
        track.append(mido.Message("note_off", channel=0, note=note, velocity=0, time=240))
    path.parent.mkdir(parents=True, exist_ok=True)
    midi.save(str(path))
    return path


def long_abc(bars):
    """An ABC tune with `bars` numbered-ish bars, 4 per line (many patches)."""
    body = "".join(("CDEF|" if i % 2 else "GABc|") + ("\n" if i % 4 == 3 else "") for i in range(bars))
    return "X:1\nT:Long\nK:C\n" + body + "\n"


def decode(patch):
    """The characters of a patch, without BOS/EOS/padding ids."""
    return "".join(chr(c) for c in patch.tolist() if c > 2)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, then the words w0 .. w399."""
    return word_tokenizer([f"w{i}" for i in range(400)])


def words(start, stop):
    """"w{start} ... w{stop-1}" and the matching token ids."""
    return " ".join(f"w{i}" for i in range(start, stop)), [4 + i for i in range(start, stop)]


def record(paths=("x.abc",), texts=None, translations=None, line=1):
    """A Record built directly, for the text functions."""
    return Record(source="data.jsonl", line=line, paths=tuple(paths),
                  texts=texts if texts is not None else {"description": "a tune"},
                  translations=translations or {})


# --------------------------------------------------------------------------------------------
# The scan


def test_both_schemas_relative_and_absolute_paths(tmp_path):
    write(tmp_path / "music" / "a.abc", ABC)
    absolute = write(tmp_path / "elsewhere" / "b.abc", ABC_OTHER)
    write(tmp_path / "data" / "music" / "c.abc", ABC)
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [
        {"id": "1", "filepaths": ["../music/a.abc"], "title": "A", "genres": ["jazz", "folk"],
         "analysis": "Line one\nLine two", "year": 1999,
         "translations": {"language": "fr", "description": "Un air"}},
        {"location": str(absolute), "caption": "A waltz"},
        {"music": "music/c.abc", "description": "Described"},
    ])
    result = scan_data_file(data, music_roots=[tmp_path / "music", tmp_path / "elsewhere"])
    assert [r.line for r in result.records] == [1, 2, 3] and result.bad == [] and result.total == 3
    first, second, third = result.records
    assert first.paths == (str(tmp_path / "music" / "a.abc"),)
    assert first.schema == "clamp3"
    assert first.texts == {"title": "A", "genres": "jazz, folk", "analysis": "Line one\nLine two"}
    assert first.translations == {"description": "Un air"} and first.language == "fr"
    assert second.paths == (str(absolute),) and second.schema == "midicaps"
    assert second.texts == {"caption": "A waltz"}
    assert third.paths == (str(tmp_path / "data" / "music" / "c.abc"),)
    assert third.texts == {"description": "Described"}
    assert "3 of 3 records usable, 0 bad" in result.summary()


def test_music_outside_the_data_folder_and_music_roots_is_never_opened(tmp_path):
    """Paths resolve, symbolic links followed, under the data file's folder or a --music-root; any
    other path (../ escapes, absolute paths, a link pointing out) is outside_music_root."""
    write(tmp_path / "data" / "in.abc", ABC)
    write(tmp_path / "shared" / "ok.abc", ABC)
    secret = write(tmp_path / "secret" / "tune.abc", ABC)
    (tmp_path / "data" / "link.abc").symlink_to(secret)          # inside by name, outside in fact
    (tmp_path / "data" / "sub").symlink_to(tmp_path / "secret")   # a folder link pointing out
    (tmp_path / "shared" / "back.abc").symlink_to(tmp_path / "data" / "in.abc")
    data = write_jsonl(tmp_path / "data" / "d.jsonl", [
        {"location": "in.abc", "caption": "inside"},                         # 1
        {"location": "../secret/tune.abc", "caption": "escape"},             # 2
        {"location": str(secret), "caption": "absolute"},                    # 3
        {"location": "link.abc", "caption": "link out"},                     # 4
        {"location": "sub/tune.abc", "caption": "folder link out"},          # 5
        {"location": "../shared/ok.abc", "caption": "under a music root"},   # 6
        {"location": "../shared/back.abc", "caption": "link back in"},       # 7
        {"filepaths": ["../secret/tune.abc", "in.abc"], "title": "one of two kept"},  # 8
    ])
    result = scan_data_file(data, limit=1.0)
    assert [r.line for r in result.records] == [1, 7, 8]
    assert {b.line: b.reason for b in result.bad} == {2: "outside_music_root", 3: "outside_music_root",
                                                      4: "outside_music_root", 5: "outside_music_root",
                                                      6: "outside_music_root"}
    assert "--music-root" in result.bad[0].detail
    assert [(b.line, b.reason) for b in result.dropped_paths] == [(8, "outside_music_root")]
    rooted = scan_data_file(data, limit=1.0, music_roots=[tmp_path / "shared"])
    assert [r.line for r in rooted.records] == [1, 6, 7, 8]
    with pytest.raises(DataError, match="music root not found"):
        scan_data_file(data, music_roots=[tmp_path / "nowhere"])


NOT_MUSIC = {
    "passwd": "root:x:0:0:root:/root:/bin/bash\nbin:x:1:1:bin:/bin:/sbin/nologin\n",
    "data.csv": "id,title,key\n1,Reel,K:G\n2,Jig,D\n",
    "config.json": '{"K": "C", "notes": ["A", "B"], "bars": "|:|"}\n',
    "script.py": "import sys\n\ndef main():\n    print('A B C |')\n",
    "page.html": "<html><body><h1>ABC</h1><p>K: not a key</p></body></html>\n",
    "server.log": "2026-12-08 01:00:00 INFO K:started\n2026-12-08 01:00:01 ERROR bad | worse\n",
    "prose.txt": "The fiddler played a reel in G. Then a jig, and a slow air followed.\n",
    "notes.md": "# Tunes\n\n- K: the key field\n- | a bar line\n",
    "hosts": "127.0.0.1 localhost\n::1 ip6-localhost\n",
    "style.css": "body { color: #abcdef; }\na:hover { color: red; }\n",
    "Makefile": "all:\n\tcc -o a a.c\n",
    "header_only.abc": "X:1\nT:Title\nM:4/4\nK:G\n",
    "fake.mtf": "tick_per_beat 480\nnote_on 0 0 60 80\n",
    "memo.txt": "K: keys to the hall\nBring the fiddle and a bag of reeds.\n",
}


def test_only_abc_mtf_and_midi_are_music(tmp_path):
    """The not_music rule (mtf.music_kind): every bundled demo piece and the golden ABC/MTF texts
    are music; passwd, CSV, JSON, Python, HTML, a log, prose, Markdown, hosts, CSS, a Makefile, an
    ABC header without music, a misspelt MTF header and a memo with a K: line are not."""
    from pathlib import Path
    demo = Path(__file__).resolve().parent.parent / "demo"
    for path in sorted((demo / "abc").glob("*.abc")) + sorted((demo / "mtf").glob("*.mtf")):
        assert music_kind(path.read_text(encoding="utf-8")) == path.suffix[1:], path
    golden = Path(__file__).resolve().parent.parent.parent / "shared" / "golden" / "patches.jsonl"
    if golden.exists():
        for case in map(json.loads, golden.read_text(encoding="utf-8").splitlines()):
            if case["text"].strip() and case["name"] != "header_only":
                assert music_kind(case["text"]) in ("abc", "mtf"), case["name"]
    rows = []
    for name, text in NOT_MUSIC.items():
        write(tmp_path / name, text)
        rows.append({"location": name, "caption": name})
    write(tmp_path / "tune.abc", ABC)
    write_midi(tmp_path / "song.mid")
    rows += [{"location": "tune.abc", "caption": "abc"}, {"location": "song.mid", "caption": "midi"}]
    result = scan_data_file(write_jsonl(tmp_path / "d.jsonl", rows), limit=1.0)
    assert [b.reason for b in result.bad] == ["not_music"] * len(NOT_MUSIC)
    assert [r.line for r in result.records] == [len(NOT_MUSIC) + 1, len(NOT_MUSIC) + 2]
    assert "neither ABC" in result.bad[0].detail


def test_a_sample_that_fails_after_the_scan_is_dropped_and_named(tmp_path, tokenizer):
    """A music file deleted after the scan: its sample is dropped (data_file:line in the batch's
    "dropped" list), the rest of the batch is kept; a batch of only dropped samples has no tensors."""
    for name in ("a", "b"):
        write(tmp_path / f"{name}.abc", ABC)
    data = write_jsonl(tmp_path / "d.jsonl", [{"location": "a.abc", "caption": "w1"},
                                              {"location": "b.abc", "caption": "w2"}])
    dataset = MusicTextDataset(scan_data_file(data).records, tokenizer, train=True, cache_mb=0)
    (tmp_path / "b.abc").unlink()
    collate_fn = Collator(tokenizer.pad_token_id)
    batch = collate_fn([dataset[(0, 1)], dataset[(1, 2)]])
    assert batch["index"].tolist() == [0] and len(batch["patches"]) == 1
    assert len(batch["dropped"]) == 1 and batch["dropped"][0].startswith(f"{data}:2: music file ")
    assert has_samples(batch)
    alone = collate_fn([dataset[(1, 2)]])
    assert set(alone) == {"dropped"} and not has_samples(alone)


def test_midi_file_is_converted_on_the_fly(tmp_path, tokenizer):
    write_midi(tmp_path / "song.mid")
    data = write_jsonl(tmp_path / "d.jsonl", [{"location": "song.mid", "caption": "w1 w2"}])
    result = scan_data_file(data)
    assert len(result.records) == 1
    item = MusicTextDataset(result.records, tokenizer, train=False)[0]
    assert item["patches"].shape[1] == 64
    assert decode(item["patches"][1]).startswith("ticks_per_beat 480")
    text = "".join(decode(p) for p in item["patches"])
    assert "note_on" in text and "Lead" not in text  # track_name meta message dropped


BAD_LINES = {
    2: "invalid_json", 3: "not_object", 4: "no_music_path", 5: "no_text", 6: "missing_file",
    7: "unreadable_file", 8: "empty_file", 9: "no_patches", 10: "unreadable_file",
    11: "unreadable_file", 12: "invalid_json", 15: "empty_file", 16: "no_music_path", 18: "not_music",
    19: "bad_text", 20: "invalid_json", 21: "too_large", 22: "outside_music_root", 23: "not_music",
}


def bad_data_file(tmp_path):
    """A data file with every kind of bad record (lines in BAD_LINES) and 3 good ones (1, 13, 17);
    line 14 is blank: neither a record nor bad."""
    write(tmp_path / "good.abc", ABC)
    write(tmp_path / "binary.abc", b"\x00\x01\xff\xfe\x00binary\x00")
    write(tmp_path / "empty.abc", b"")
    write(tmp_path / "blank.abc", "  \n\n  \n")
    write(tmp_path / "nopatch.abc", "X:1\nK:C\n%%x\n|")  # ABC, but patchify refuses the last line
    write(tmp_path / "only_l.abc", "L:1/8\n\n\n")  # an ABC field, but no K: and no music
    write(tmp_path / "passwd", "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    write(tmp_path.parent / f"{tmp_path.name}_outside.abc", ABC)
    write(tmp_path / "corrupt.mid", b"MThd\x00\x00\x00\x06garbage-not-midi")
    (tmp_path / "a_folder.abc").mkdir()
    rows = [
        {"filepaths": ["good.abc"], "description": "fine"},               # 1
        '{"filepaths": ["good.abc"], "description": ',                     # 2 invalid_json
        '[1, 2, 3]',                                                       # 3 not_object
        {"description": "text but no music"},                              # 4 no_music_path
        {"filepaths": ["good.abc"], "id": "7", "description": " ", "tags": []},  # 5 no_text
        {"location": "missing.abc", "caption": "gone"},                    # 6 missing_file
        {"location": "binary.abc", "caption": "binary"},                   # 7 unreadable_file
        {"location": "empty.abc", "caption": "empty"},                     # 8 empty_file
        {"location": "nopatch.abc", "caption": "no patches"},              # 9 no_patches
        {"location": "corrupt.mid", "caption": "corrupt midi"},            # 10 unreadable_file
        {"location": "a_folder.abc", "caption": "a folder"},               # 11 unreadable_file
    ]
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    raw = text.encode() + b'{"location": "good.abc", "caption": "caf\xe9"}\n'   # 12 not UTF-8
    raw += json.dumps({"music": "good.abc", "description": "fine too"}).encode() + b"\n"  # 13
    raw += b"   \n"                                                                 # 14 blank
    raw += json.dumps({"location": "blank.abc", "caption": "blank"}).encode() + b"\n"  # 15
    raw += json.dumps({"filepaths": [], "description": "no paths"}).encode() + b"\n"  # 16
    only_translations = {"filepaths": ["good.abc"], "translations": {"language": "de", "title": "Nur"}}
    raw += json.dumps(only_translations).encode() + b"\n"  # 17
    raw += json.dumps({"location": "only_l.abc", "caption": "no content"}).encode() + b"\n"  # 18
    raw += b'{"location": "good.abc", "caption": "a lone surrogate \\ud800"}\n'           # 19 bad_text
    raw += b"[" * 100_000 + b"]" * 100_000 + b"\n"                                        # 20 too deep
    raw += json.dumps({"location": "good.abc", "caption": "x" * 100_001}).encode() + b"\n"  # 21 too_large
    raw += json.dumps({"location": f"../{tmp_path.name}_outside.abc", "caption": "out"}).encode() + b"\n"  # 22
    raw += json.dumps({"location": "passwd", "caption": "not music"}).encode() + b"\n"     # 23 not_music
    return write(tmp_path / "bad.jsonl", raw)


def test_every_bad_record_kind_is_skipped_and_counted(tmp_path):
    data = bad_data_file(tmp_path)
    result = scan_data_file(data, limit=1.0)
    assert [r.line for r in result.records] == [1, 13, 17]
    assert result.total == 22  # the blank line is not a record
    assert {b.line: b.reason for b in result.bad} == BAD_LINES
    assert set(result.counts) == set(REASONS)
    assert result.counts["unreadable_file"] == 3 and result.counts["invalid_json"] == 3
    assert result.counts["not_music"] == 2
    assert sum(result.counts.values()) == len(BAD_LINES)
    by_line = {b.line: b for b in result.bad}
    assert str(by_line[6]).startswith(f"{data}:6: missing_file (")
    assert "missing.abc" in str(by_line[6])
    assert "binary.abc" in by_line[7].detail
    assert str(by_line[12]).startswith(f"{data}:12: invalid_json (not UTF-8")
    assert re.fullmatch(r".*:2: invalid_json \(Expecting value: column \d+\)", str(by_line[2])), str(by_line[2])
    assert str(by_line[19]) == f"{data}:19: bad_text (field 'caption': surrogates not allowed at character 17)"
    assert str(by_line[20]) == f"{data}:20: invalid_json (nested deeper than the JSON reader can follow)"
    summary = result.summary(show=3)
    assert f"3 of 22 records usable, {len(BAD_LINES)} bad" in summary
    assert f"{data}:2: invalid_json" in summary and f"... and {len(BAD_LINES) - 3} more" in summary


def test_record_with_only_translations_is_kept(tmp_path):
    result = scan_data_file(bad_data_file(tmp_path), limit=1.0)
    only_translations = result.records[-1]
    assert only_translations.texts == {} and only_translations.translations == {"title": "Nur"}
    assert evaluation_text(only_translations, SEP) == "Nur"
    assert training_text(only_translations, SEP, random.Random(0)) == "Nur"


def test_bad_share_over_the_limit_raises_data_error(tmp_path):
    write(tmp_path / "good.abc", ABC)
    rows = [{"location": "good.abc", "caption": f"c{i}"} for i in range(9)]
    rows.append({"location": "missing.abc", "caption": "gone"})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(scan_data_file(data, limit=0.1).records) == 9  # 10% is not *more* than 10%
    with pytest.raises(DataError) as caught:
        scan_data_file(data, limit=0.05)
    message = str(caught.value)
    assert str(data) in message and "1 of 10 records are bad (10.0%)" in message
    assert "missing_file 1" in message and f"{data}:10: missing_file" in message
    assert "--bad-record-limit" in message
    assert caught.value.scan.counts == {"missing_file": 1}


def test_missing_and_empty_data_files_raise(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        scan_data_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no records"):
        scan_data_file(write(tmp_path / "empty.jsonl", "\n \n"))
    write_jsonl(tmp_path / "allbad.jsonl", [{"location": "missing.abc", "caption": "x"}])
    with pytest.raises(DataError, match="no usable record"):
        scan_data_file(tmp_path / "allbad.jsonl", limit=1.0)


def test_multi_path_record_keeps_good_paths(tmp_path):
    write(tmp_path / "good.abc", ABC)
    write(tmp_path / "empty.abc", "")
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"filepaths": ["missing.abc", "good.abc", "empty.abc"], "title": "kept"},
        {"filepaths": ["missing.abc", "empty.abc"], "title": "all bad"},
    ])
    result = scan_data_file(data, limit=1.0)
    assert [r.paths for r in result.records] == [(str(tmp_path / "good.abc"),)]
    assert [(b.line, b.reason) for b in result.dropped_paths] == [(1, "missing_file"), (1, "empty_file")]
    assert result.dropped_counts == {"missing_file": 1, "empty_file": 1}
    assert [(b.line, b.reason) for b in result.bad] == [(2, "missing_file")]
    assert "1 more paths" in result.bad[0].detail
    assert "2 bad paths dropped" in result.summary()


def test_check_music_false_only_checks_existence(tmp_path):
    write(tmp_path / "nopatch.abc", "just words without any bar line\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"location": "nopatch.abc", "caption": "x"},
                                              {"location": "missing.abc", "caption": "y"}])
    result = scan_data_file(data, limit=1.0, check_music=False)
    assert [r.line for r in result.records] == [1]
    assert [b.reason for b in result.bad] == ["missing_file"]


def test_process_pool_scan_matches_inline_scan(tmp_path):
    data = bad_data_file(tmp_path)
    inline = scan_data_file(data, limit=1.0, workers=0)
    pooled = scan_data_file(data, limit=1.0, workers=2, progress=True)
    assert pooled.records == inline.records
    assert pooled.bad == inline.bad and pooled.dropped_paths == inline.dropped_paths


# --------------------------------------------------------------------------------------------
# Text


def test_text_lines_split_strip_and_deduplicate():
    assert text_lines({"a": "x\n y \n\nx", "b": "y", "c": "z"}) == ["x", "y", "z"]


def test_training_text_is_seeded_and_joined_with_sep():
    rec = record(texts={"title": "t1", "description": "d1\nd2\nd1", "analysis": "a1", "genres": "g1, g2"})
    candidates = {"t1", "d1", "d2", "a1", "g1, g2"}
    texts = [training_text(rec, SEP, random.Random(seed)) for seed in range(200)]
    assert texts == [training_text(rec, SEP, random.Random(seed)) for seed in range(200)]
    kept_counts = []
    for text in texts:
        parts = text.split(SEP)
        assert parts and set(parts) <= candidates and len(parts) == len(set(parts))
        kept_counts.append(len(parts))
    assert len(set(texts)) > 50  # dropout and shuffling make many different texts
    assert 2.0 < sum(kept_counts) / len(kept_counts) < 3.5  # ~half of 5 kept (at least 1)
    orders = {tuple(t.split(SEP)) for t in texts if set(t.split(SEP)) == {"t1", "a1"}}
    assert orders == {("t1", "a1"), ("a1", "t1")}  # shuffled


def test_training_text_candidates_from_translations_or_fields():
    rec = record(texts={"description": "f1\nf2"}, translations={"description": "t1\nt2", "title": "t3"})
    sources = []
    for seed in range(400):
        parts = set(training_text(rec, SEP, random.Random(seed)).split(SEP))
        assert parts <= {"f1", "f2"} or parts <= {"t1", "t2", "t3"}  # never mixed
        sources.append(parts <= {"f1", "f2"})
    assert 0.4 < sum(sources) / len(sources) < 0.6
    no_translations = record(texts={"description": "f1\nf2"})
    for seed in range(50):
        assert set(training_text(no_translations, SEP, random.Random(seed)).split(SEP)) <= {"f1", "f2"}


def test_single_candidate_always_survives():
    rec = record(texts={"caption": "only one"})
    assert {training_text(rec, SEP, random.Random(s)) for s in range(30)} == {"only one"}


def test_evaluation_text_order():
    assert evaluation_text(record(texts={"title": "T", "description": "D", "analysis": "A"}), SEP) == "A"
    assert evaluation_text(record(texts={"title": "T", "description": "D"}), SEP) == "D"
    assert evaluation_text(record(texts={"caption": "C", "description": "D"}), SEP) == "C"
    no_preferred_field = record(texts={"title": "T", "tags": "x, y", "scene": "T\nS"})
    assert evaluation_text(no_preferred_field, SEP) == "T</s>x, y</s>S"
    assert evaluation_text(record(texts={}, translations={"title": "Nur"}), SEP) == "Nur"


def test_text_cut_to_128_tokens_head_in_eval_window_in_train(tokenizer):
    text, ids = words(0, 300)
    head = encode_text(tokenizer, text, 128)
    assert head == [0] + ids[:126] + [2]
    windows = set()
    for seed in range(20):
        cut = encode_text(tokenizer, text, 128, random.Random(seed))
        assert len(cut) == 128 and cut[0] == 0 and cut[-1] == 2
        start = ids.index(cut[1])
        assert cut[1:-1] == ids[start:start + 126]
        windows.add(start)
    assert len(windows) > 5
    short, short_ids = words(0, 5)
    assert encode_text(tokenizer, short, 128, random.Random(1)) == [0] + short_ids + [2]
    assert encode_text(tokenizer, f"w1{SEP}w2", 128) == [0, 5, 2, 6, 2]  # sep stays a token


def test_text_cache_gives_the_same_ids_and_stays_bounded(tokenizer):
    cache = TextCache(entries=3)
    text, _ = words(0, 300)
    for seed in range(6):  # windows cut from the cached tokens, which stay whole
        assert encode_text(tokenizer, text, 128, random.Random(seed), cache) == \
            encode_text(tokenizer, text, 128, random.Random(seed))
    assert len(cache.get(text)) == 300
    for n in range(1, 6):
        short, ids = words(0, n)
        assert encode_text(tokenizer, short, 128, cache=cache) == [0] + ids + [2]
        assert len(cache.tokens) <= 3


# --------------------------------------------------------------------------------------------
# Dataset


@pytest.fixture
def scanned(tmp_path):
    """Records: 0 has two files and a long multi-line text; 1 a long piece; 2 a short MidiCaps one."""
    write(tmp_path / "a.abc", ABC)
    write(tmp_path / "b.abc", ABC_OTHER)
    write(tmp_path / "long.abc", long_abc(400))
    lines = "\n".join(words(i * 40, i * 40 + 40)[0] for i in range(8))
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"filepaths": ["a.abc", "b.abc"], "analysis": lines, "title": "w399",
         "translations": {"language": "xx", "description": "w398 w397"}},
        {"filepaths": ["long.abc"], "description": words(0, 3)[0]},
        {"location": "a.abc", "caption": words(10, 12)[0]},
    ])
    return scan_data_file(data).records


def test_same_key_gives_identical_item(scanned, tokenizer):
    train = MusicTextDataset(scanned, tokenizer, train=True, max_patches=16)
    for key in [(0, 7), (1, 123456789), (2, 0)]:
        first, again = train[key], train[key]
        assert torch.equal(first["patches"], again["patches"])
        assert torch.equal(first["text_ids"], again["text_ids"])
        assert first["index"] == key[0]
        assert first["patches"].dtype == torch.long and first["text_ids"].dtype == torch.long
    fresh = MusicTextDataset(scanned, tokenizer, train=True, max_patches=16)
    assert torch.equal(fresh[(1, 5)]["patches"], train[(1, 5)]["patches"])


def test_different_seeds_give_different_augmentations(scanned, tokenizer):
    train = MusicTextDataset(scanned, tokenizer, train=True, max_patches=16)
    files = {decode(train[(0, s)]["patches"][1]) for s in range(30)}
    assert files == {"X:1\n", "X:2\n"}  # both files of record 0 are picked
    texts = {tuple(train[(0, s)]["text_ids"].tolist()) for s in range(30)}
    assert len(texts) > 10
    assert any(3 + 398 in t for t in texts) and any(3 + 398 not in t for t in texts)  # translations
    windows = {tuple(train[(1, s)]["patches"].flatten().tolist()) for s in range(10)}
    assert len(windows) > 1 and all(train[(1, s)]["patches"].shape == (16, 64) for s in range(10))


def test_evaluation_items_are_deterministic(scanned, tokenizer):
    evaluation = MusicTextDataset(scanned, tokenizer, train=False, max_patches=16)
    item = evaluation[0]
    assert torch.equal(item["patches"], evaluation[(0, 99)]["patches"])
    assert torch.equal(item["text_ids"], evaluation[(0, 99)]["text_ids"])
    assert decode(item["patches"][1]) == "X:1\n"  # first file
    assert 'nm="Piano"' in "".join(decode(p) for p in item["patches"])  # no instrument removal
    text, ids = words(0, 320)
    assert item["text_ids"].tolist() == [0] + ids[:126] + [2]  # analysis, head
    assert evaluation[2]["text_ids"].tolist() == [0, 14, 15, 2]
    long_item = evaluation[1]["patches"]
    assert long_item.shape == (16, 64)
    assert decode(long_item[1]) == "X:1\n" and decode(long_item[2]) == "T:Long\n"
    with pytest.raises(TypeError):
        MusicTextDataset(scanned, tokenizer, train=True)[0]
    with pytest.raises(IndexError):
        evaluation[3]


def test_instrument_removal_probability(scanned, tokenizer):
    def voice_lines(prob, seed):
        dataset = MusicTextDataset(scanned[2:], tokenizer, train=True, instrument_removal_prob=prob)
        return [decode(p) for p in dataset[(0, seed)]["patches"] if decode(p).startswith("V:")]
    for seed in range(10):
        assert voice_lines(0.0, seed) == ['V:1 nm="Piano" snm="Pno"\n']
        assert voice_lines(1.0, seed) == ["V:1\n"]


def test_instrument_removal_on_mtf(tmp_path, tokenizer):
    write_midi(tmp_path / "song.mid")
    data = write_jsonl(tmp_path / "d.jsonl", [{"location": "song.mid", "caption": "w1"}])
    records = scan_data_file(data).records

    def program_text(prob):
        dataset = MusicTextDataset(records, tokenizer, train=True, instrument_removal_prob=prob)
        text = "".join(decode(p) for p in dataset[(0, 3)]["patches"])
        return [line for line in text.replace("\t", "\n").split("\n") if "program_change" in line]
    kept, removed = program_text(0.0), program_text(1.0)
    assert len(kept) == 1 and kept[0].split()[-1] == "5"
    assert len(removed) == 1 and removed[0].split()[-1] == "0"


def test_file_gone_bad_after_scan_names_file_and_line(tmp_path, tokenizer):
    """A file that vanished, went blank or lost its music after the scan: the sample is dropped
    with data_file:line, the music file and why."""
    music = write(tmp_path / "a.abc", ABC)
    data = write_jsonl(tmp_path / "d.jsonl", [{"location": "a.abc", "caption": "w1"}])
    records = scan_data_file(data).records
    dataset = MusicTextDataset(records, tokenizer, train=True)
    music.unlink()
    assert re.fullmatch(r".*d\.jsonl:1: music file .*a\.abc cannot be read any more .*", dataset[(0, 1)]["dropped"])
    write(music, "  \n")
    assert re.match(r".*d\.jsonl:1: .*a\.abc", MusicTextDataset(records, tokenizer, train=False)[0]["dropped"])
    write(music, "L:1/8\n\n")
    assert "no patches" in MusicTextDataset(records, tokenizer, train=False)[0]["dropped"]


# --------------------------------------------------------------------------------------------
# Collation and loaders


def test_collate_pads_and_masks(scanned, tokenizer):
    dataset = MusicTextDataset(scanned, tokenizer, train=True, max_patches=24)
    items = [dataset[(i, 11)] for i in range(3)]
    batch = collate(items, pad_id=tokenizer.pad_token_id)
    lengths = [len(item["patches"]) for item in items]
    text_lengths = [len(item["text_ids"]) for item in items]
    assert len(set(lengths)) > 1 and len(set(text_lengths)) > 1  # padding really happens
    assert batch["patches"].shape == (3, max(lengths), 64)
    assert batch["text_ids"].shape == (3, max(text_lengths))
    assert all(batch[k].dtype == torch.long for k in batch if not k.endswith("_cu"))
    assert batch["patch_cu"].dtype == batch["text_cu"].dtype == torch.int32  # packing (fast.packing)
    assert batch["patch_mask"].sum(1).tolist() == lengths
    assert batch["text_mask"].sum(1).tolist() == text_lengths
    assert batch["index"].tolist() == [0, 1, 2]
    for row, item in enumerate(items):
        n, t = lengths[row], text_lengths[row]
        assert torch.equal(batch["patches"][row, :n], item["patches"])
        assert torch.equal(batch["text_ids"][row, :t], item["text_ids"])
        assert batch["patch_mask"][row, :n].eq(1).all() and batch["patch_mask"][row, n:].eq(0).all()
        assert batch["patches"][row, n:].eq(0).all()
        assert batch["text_ids"][row, t:].eq(tokenizer.pad_token_id).all()
        assert batch["text_mask"][row, t:].eq(0).all()
    assert Collator(1)(items)["text_ids"].equal(batch["text_ids"])


def test_loader_with_workers_matches_loader_without(scanned, tokenizer):
    dataset = MusicTextDataset(scanned * 4, tokenizer, train=True, max_patches=32)
    keys = [(i, 1000 + 7 * i) for i in range(12)][::-1]
    def batches(workers):
        loader = make_loader(dataset, keys, batch_size=5, num_workers=workers, pin_memory=True,
                             collate_fn=Collator(tokenizer.pad_token_id))
        return list(loader)
    serial, parallel = batches(0), batches(2)
    assert len(serial) == 3 and [b["index"].tolist() for b in serial][0] == [11, 10, 9, 8, 7]
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sequential_keys_and_eval_loader(scanned, tokenizer):
    assert list(SequentialKeys(3)) == [0, 1, 2] and len(SequentialKeys(3)) == 3
    dataset = MusicTextDataset(scanned, tokenizer, train=False, max_patches=16)
    loader = make_loader(dataset, SequentialKeys(len(dataset)), batch_size=2, num_workers=0,
                         pin_memory=False, collate_fn=None, drop_last=False)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    assert torch.equal(batches[1]["text_ids"][0], dataset[2]["text_ids"])


def test_midicaps_empty_caption_falls_back_to_description(tmp_path):
    (tmp_path / "a.abc").write_text("X:1\nK:C\nabc|def|\n", encoding="utf-8")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"location": "a.abc", "caption": "", "description": "A tune in C."}) + "\n",
                    encoding="utf-8")
    scan = scan_data_file(data)
    assert not scan.bad
    assert scan.records[0].texts == {"description": "A tune in C."}
