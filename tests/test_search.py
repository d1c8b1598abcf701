"""`python -m clamp3_lora.search`: text -> music and music -> music over a folder or a data file, a
feature cache that spares a second query any encoding, bad files skipped and listed."""
import json
import random

import pytest

from clamp3_lora import search
from trainer_fixtures import abc_tune, make_tokenizer, mtf_piece

TINY = ["--preset", "tiny", "--device", "cpu", "--quiet", "--max-patches", "64"]


@pytest.fixture
def folder(tmp_path):
    rng = random.Random(2)
    music = tmp_path / "music"
    (music / "sub").mkdir(parents=True)
    for i in range(5):
        (music / f"t{i}.abc").write_text(abc_tune(rng, i))
    (music / "sub" / "p.mtf").write_text(mtf_piece(rng))
    (music / "broken.abc").write_bytes(b"\x00\x01binary")
    (music / "notes.abc").write_text("Just a shopping list: eggs | milk\n")
    (music / "readme.txt").write_text("not searched: not a music suffix\n")
    return music


def run(args, capsys):
    code = search.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_query_ranks_the_folder_and_the_cache_spares_the_second_query(folder, tmp_path, capsys):
    flags = TINY + ["--text-model", str(make_tokenizer(tmp_path / "tok")), "--cache", str(tmp_path / "cache.pt")]
    code, out, err = run(["w1 w2 w3", str(folder), "--top", "3", "--json"] + flags, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "text" and [r["rank"] for r in result["results"]] == [1, 2, 3]
    assert result["results"][0]["score"] >= result["results"][-1]["score"]
    assert all(r["file"].startswith(str(folder)) for r in result["results"])
    assert all(r["title"] == f"Tune {r['file'][-5]}" for r in result["results"] if r["file"].endswith(".abc"))
    assert sorted(line.split(":")[0] for line in result["skipped"]) == [str(folder / "broken.abc"),
                                                                      str(folder / "notes.abc")]
    assert "6 pieces (6 encoded now, 0 from the cache" in err
    code, out, err = run(["w4 w5", str(folder)] + flags, capsys)
    assert code == 0 and "6 pieces (0 encoded now, 6 from the cache" in err
    assert out.splitlines()[0].split() == ["rank", "score", "file", "(title)"] and len(out.splitlines()) == 7


def test_a_music_file_as_the_query_finds_itself_first(folder, tmp_path, capsys):
    flags = TINY + ["--text-model", str(make_tokenizer(tmp_path / "tok")), "--cache", str(tmp_path / "cache.pt")]
    code, out, err = run([str(folder / "t3.abc"), str(folder), "--json"] + flags, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "music"
    assert result["results"][0]["file"] == str(folder / "t3.abc") and result["results"][0]["score"] == pytest.approx(1.0)


def test_empty_query_and_empty_folder_are_one_line_errors(folder, tmp_path, capsys):
    flags = TINY + ["--text-model", str(make_tokenizer(tmp_path / "tok")), "--cache", str(tmp_path / "cache.pt")]
    code, _, err = run(["  ", str(folder)] + flags, capsys)
    assert code == 2 and err.strip() == "error: the query is empty: give a text (\"a slow air in D minor\") or a music file"
    (tmp_path / "empty").mkdir()
    code, _, err = run(["a reel", str(tmp_path / "empty")] + flags, capsys)
    assert code == 2 and err.strip().startswith(f"error: no music to search in {tmp_path / 'empty'}")


def test_a_data_file_is_searched_through_its_records_with_their_titles(folder, tmp_path, capsys):
    data = folder / "pieces.jsonl"
    data.write_text("".join(json.dumps({"filepaths": [f"t{i}.abc"], "title": f"Piece {i}"}) + "\n" for i in range(3))
                    + '{"filepaths": ["../elsewhere.abc"], "title": "outside"}\n')
    flags = TINY + ["--text-model", str(make_tokenizer(tmp_path / "tok")), "--cache", str(tmp_path / "cache.pt")]
    code, out, err = run(["w1", str(data), "--json"] + flags, capsys)
    assert code == 0, err
    results = json.loads(out)["results"]
    assert sorted(r["title"] for r in results) == ["Piece 0", "Piece 1", "Piece 2"]
    assert "outside_music_root" in err
