"""A hostile data file no one here would write: 41 kinds of bad record and 12 tricky good ones, run
through `prepare check --json`, a real training run and `evaluate`. Each bad line must be reported
with its reason, no good line flagged, and no process may print a traceback.

The same file also meets a music file that disappears while training runs: that sample is dropped
and named (data_file:line), and the run goes on to the end."""
import json
import subprocess
import sys
import time

import pytest

from trainer_fixtures import ROOT, abc_tune, log_dir, make_workspace, mtf_piece, run_trainer, start_trainer, \
    trainer_args, trainer_env

from test_data import write_midi

GOOD = "good"


def hostile_file(folder, rng):
    """(data file, {line: expected reason or GOOD}) in `folder`, with its music files."""
    music = folder / "music"
    music.mkdir(parents=True)
    for i in range(12):
        (music / f"{i}.abc").write_text(abc_tune(rng, i))
    (music / "piece.mtf").write_text(mtf_piece(rng))
    write_midi(music / "song.mid")
    (music / "crlf.abc").write_bytes(abc_tune(rng, 99).replace("\n", "\r\n").encode())
    (music / "link.abc").symlink_to(music / "3.abc")
    outside = folder.parent / f"{folder.name}_outside"
    outside.mkdir()
    (outside / "tune.abc").write_text(abc_tune(rng, 50))
    (music / "out_link.abc").symlink_to(outside / "tune.abc")
    files = {
        "empty.abc": b"", "blank.abc": b"  \n\t\n", "binary.abc": b"\x00\x01\x02MThd\x00",
        "latin1.abc": "X:1\nT:Caf\xe9\nK:C\nabc|\n".encode("latin-1"), "corrupt.mid": b"MThd\x00\x00\x00\x06junk",
        "passwd": b"root:x:0:0:root:/root:/bin/bash\n", "table.csv": b"a,b,c\n1,2,3\n",
        "thing.json": b'{"K": "C"}\n', "tool.py": b"import os\nprint(os.getcwd())\n",
        "page.html": b"<html><body>K:</body></html>\n", "app.log": b"INFO started\nERROR | stopped\n",
        "essay.txt": b"Music is the space between the notes.\n", "header.abc": b"X:1\nT:Only a header\nK:D\n",
        "nopatch.abc": b"X:1\nK:C\n%%x\n|",
    }
    for name, content in files.items():
        (music / name).write_bytes(content)
    (music / "a_folder.abc").mkdir()

    def rec(path="music/0.abc", **texts):
        return {"filepaths": [path], **(texts or {"analysis": "w1 w2 w3"})}

    lines = [
        # good records, some of them odd
        (rec("music/1.abc"), GOOD),
        ({"location": "music/piece.mtf", "caption": "w4 w5"}, GOOD),
        ({"music": "music/song.mid", "description": "w6"}, GOOD),
        (rec("music/crlf.abc"), GOOD),
        (rec("music/link.abc"), GOOD),
        ({"filepaths": ["music/missing.abc", "music/4.abc"], "title": "w7"}, GOOD),
        ({"filepaths": ["music/5.abc"], "translations": {"language": "de", "title": "w8"}}, GOOD),
        ({"filepaths": "music/6.abc", "analysis": "ünïcödé 音楽 🎻", "year": 1999, "extra": {"k": [1, 2]}}, GOOD),
        (rec("music/7.abc"), GOOD),
        (rec("./music/../music/8.abc"), GOOD),
        (rec("music/9.abc", title=["w9", 5, None, "w10"]), GOOD),
        (rec("music/10.abc"), GOOD),
        # invalid_json and not_object
        ('{"filepaths": ["music/0.abc"], "analysis": ', "invalid_json"),
        ('{"filepaths": ["music/0.abc"], "analysis": "x",}', "invalid_json"),
        ("[" * 50_000 + "]" * 50_000, "invalid_json"),
        ('\ufeff{"location": "music/0.abc", "caption": "bom in the middle"}', "invalid_json"),
        ("{'single': 'quotes'}", "invalid_json"),
        ("[1, 2, 3]", "not_object"),
        ('"just a string"', "not_object"),
        ("42", "not_object"),
        ("null", "not_object"),
        ("NaN", "not_object"),
        # sizes, paths and texts
        (rec(analysis="w1 " * 40_000), "too_large"),
        ({"analysis": "no music at all"}, "no_music_path"),
        ({"filepaths": [], "analysis": "x"}, "no_music_path"),
        ({"filepaths": 5, "analysis": "x"}, "no_music_path"),
        ({"filepaths": [None, 7, ""], "analysis": "x"}, "no_music_path"),
        ({"filepaths": {"a": "music/0.abc"}, "analysis": "x"}, "no_music_path"),
        ({"location": "music/0\u0000.abc", "caption": "x"}, "no_music_path"),
        ({"location": "", "caption": "x"}, "no_music_path"),
        ({"filepaths": ["music/0.abc"]}, "no_text"),
        ({"filepaths": ["music/0.abc"], "analysis": "  \n ", "title": 12, "genres": [1, 2]}, "no_text"),
        ('{"location": "music/0.abc", "caption": "lone \\ud800 surrogate"}', "bad_text"),
        ('{"filepaths": ["music/0.abc"], "translations": {"language": "fr", "title": "\\udfff"}}', "bad_text"),
        (rec(f"../{outside.name}/tune.abc"), "outside_music_root"),
        (rec("/etc/passwd"), "outside_music_root"),
        (rec("music/out_link.abc"), "outside_music_root"),
        # music files
        (rec("music/missing.abc"), "missing_file"),
        (rec("music/a_folder.abc"), "unreadable_file"),
        (rec("music/binary.abc"), "unreadable_file"),
        (rec("music/latin1.abc"), "unreadable_file"),
        (rec("music/corrupt.mid"), "unreadable_file"),
        (rec("music/empty.abc"), "empty_file"),
        (rec("music/blank.abc"), "empty_file"),
        (rec("music/passwd"), "not_music"),
        (rec("music/table.csv"), "not_music"),
        (rec("music/thing.json"), "not_music"),
        (rec("music/tool.py"), "not_music"),
        (rec("music/page.html"), "not_music"),
        (rec("music/app.log"), "not_music"),
        (rec("music/essay.txt"), "not_music"),
        (rec("music/header.abc"), "not_music"),
        (rec("music/nopatch.abc"), "no_patches"),
    ]
    expected, raw = {}, b""
    for number, (line, reason) in enumerate(lines, start=1):
        text = line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
        raw += text.encode("utf-8", "surrogatepass") + b"\n"
        expected[number] = reason
    raw += b'{"location": "music/0.abc", "caption": "not utf-8 \xff"}\n'
    expected[len(lines) + 1] = "invalid_json"
    data = folder / "hostile.jsonl"
    data.write_bytes(raw)
    return data, expected


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    import random
    root = tmp_path_factory.mktemp("hostile")
    workspace = make_workspace(root / "workspace", abc_train=4, abc_eval=4, mtf_train=2, mtf_eval=2)
    data, expected = hostile_file(root / "set", random.Random(0))
    return workspace, data, expected


def bad_kinds(expected):
    return {reason for reason in expected.values() if reason != GOOD}


def test_the_hostile_file_has_the_kinds_it_claims(hostile):
    _, _, expected = hostile
    bad = [n for n, reason in expected.items() if reason != GOOD]
    assert len(bad) >= 35 and len(bad_kinds(expected)) == 12


def test_prepare_check_reports_every_bad_line_and_no_good_one(hostile, tmp_path):
    workspace, data, expected = hostile
    report = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "clamp3_lora.prepare", "check", str(data), "--text-model",
                             str(workspace["tokenizer"]), "--json", str(report), "--quiet"],
                            cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert "FAILED: 42 of 54 records are bad" in result.stderr
    found = json.loads(report.read_text())
    assert {b["line"]: b["reason"] for b in found["bad"]} == {n: r for n, r in expected.items() if r != GOOD}
    assert found["usable_records"] == 12 and all(b["detail"] for b in found["bad"])
    assert [(d["line"], d["reason"]) for d in found["dropped_paths"]] == [(6, "missing_file")]
    assert f"{data}:1:" not in result.stdout and f"{data}:12:" not in result.stdout


def test_training_and_evaluation_go_through_the_hostile_file(hostile, tmp_path):
    """The hostile file as training data and as evaluation data: both finish, every bad line is in
    the training log with its reason, nothing prints a traceback."""
    workspace, data, expected = hostile
    output = tmp_path / "out"
    result = run_trainer(trainer_args(workspace, output, abc_train=data, epochs=1, checkpoints_per_epoch=0,
                                      bad_record_limit=1.0))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    log = (log_dir(output) / "ABC_training.log").read_text()
    for number, reason in expected.items():
        if reason != GOOD:
            assert f"{data}:{number}: {reason}" in log, (number, reason)
    evaluation = subprocess.run(
        [sys.executable, "-m", "clamp3_lora.evaluate", "--data", str(data), "--preset", "tiny", "--text-model",
         str(workspace["tokenizer"]), "--device", "cpu", "--quiet", "--bad-record-limit", "1",
         "--max-patches", "24", "--out-dir", str(tmp_path / "report")],
        cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=120)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert "Traceback" not in evaluation.stderr + evaluation.stdout
    assert "12 of 54 records usable" in evaluation.stderr


def test_a_music_file_gone_mid_run_is_dropped_and_the_run_finishes(tmp_path):
    """A music file deleted while the run trains (after epoch 1's checkpoint): from then on its
    sample is dropped with data_file:line in the terminal and the log; the run ends normally."""
    workspace = make_workspace(tmp_path / "ws", abc_train=16, abc_eval=4)
    output = tmp_path / "out"
    process = start_trainer(trainer_args(workspace, output, epochs=4, checkpoints_per_epoch=0))
    first_epoch = log_dir(output) / "ABC_checkpoint_epoch1.pth"
    deadline = time.time() + 120
    while not first_epoch.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim = workspace["abc_train"].parent / "abc_train_files" / "5.abc"
    victim.unlink()
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    where = f"{workspace['abc_train']}:6: music file {victim}"
    assert f"sample dropped: {where}" in stdout
    assert f"sample dropped: {where}" in (log_dir(output) / "ABC_training.log").read_text()
    steps = [json.loads(line) for line in (log_dir(output) / "ABC_steps.jsonl").read_text().splitlines()]
    assert sum(step.get("dropped", 0) for step in steps) >= 1
