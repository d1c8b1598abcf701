"""The bundled demo assets (demo/, built by tools/make_demo.py) are complete and usable offline."""
import json
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "demo"
DATA_FILES = {
    "abc": ("abc_train.jsonl", "abc_eval.jsonl"),
    "mtf": ("mtf_train.jsonl", "mtf_eval.jsonl"),
}
TEXT_FIELDS = ("analysis", "description", "background", "title", "caption")


def records(name):
    """(line number, record) of one demo data file."""
    path = DEMO / name
    with open(path, encoding="utf-8") as f:
        return [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]


def music_paths(record):
    """The music file paths a record names (CLaMP 3 or MidiCaps schema)."""
    if "filepaths" in record:
        return list(record["filepaths"])
    return [record.get("location") or record.get("music")]


def all_pieces():
    """(data file, line, music path) for every music file referenced by the demo data."""
    return [(name, n, path)
            for names in DATA_FILES.values() for name in names
            for n, rec in records(name) for path in music_paths(rec)]


@pytest.mark.parametrize("name", [n for names in DATA_FILES.values() for n in names])
def test_data_lines_parse_and_reference_existing_files(name):
    for n, rec in records(name):
        assert isinstance(rec, dict), f"{name}:{n}: not an object"
        paths = music_paths(rec)
        assert paths and all(isinstance(p, str) and p for p in paths), f"{name}:{n}: no music path"
        for p in paths:
            assert not Path(p).is_absolute(), f"{name}:{n}: demo paths must be relative"
            assert (DEMO / p).is_file(), f"{name}:{n}: missing {p}"
        assert any(isinstance(rec.get(k), str) and rec[k].strip() for k in TEXT_FIELDS), \
            f"{name}:{n}: no text"


def test_both_schemas_and_midi_files_appear():
    mtf_train = [rec for _, rec in records("mtf_train.jsonl")]
    assert any("filepaths" in rec for rec in mtf_train)
    assert any("location" in rec and "caption" in rec for rec in mtf_train)
    midi = [p for rec in mtf_train for p in music_paths(rec) if p.endswith(".mid")]
    assert len(midi) >= 3


@pytest.mark.parametrize("kind", sorted(DATA_FILES))
def test_counts(kind):
    n = sum(len(records(name)) for name in DATA_FILES[kind])
    assert n >= 150, f"only {n} {kind} pieces"


@pytest.mark.parametrize("kind", sorted(DATA_FILES))
def test_no_piece_in_both_train_and_eval(kind):
    train_name, eval_name = DATA_FILES[kind]

    def keys(name):
        out = set()
        for _, rec in records(name):
            out |= {("path", p) for p in music_paths(rec)}
            out |= {("content", (DEMO / p).read_bytes()) for p in music_paths(rec)}
            if "id" in rec:
                out.add(("id", rec["id"]))
        return out

    assert not keys(train_name) & keys(eval_name)


def test_abc_files_start_with_an_x_header():
    files = sorted((DEMO / "abc").glob("*.abc"))
    assert len(files) >= 150
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert text.startswith("X:"), f"{f.name} does not start with X:"
        assert "\nK:" in text, f"{f.name} has no K: field"
        assert text.count("\nX:") == 0, f"{f.name} holds more than one tune"


def test_demo_folder_is_small():
    base = DEMO / "base"
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file() and base not in f.parents)
    assert size < 3_000_000, f"demo/ without base/ is {size} bytes"
    base_size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    assert base_size <= 20_000_000, f"demo/base/ is {base_size} bytes (at most 20 MB)"


def test_demo_base_is_an_official_layout_checkpoint():
    """demo/base/clamp3_demo_base.pth: {"model": state_dict, "epoch": N}, every key of the official
    layout for the text and symbolic encoders, loaded by the same path as real weights."""
    import torch

    from clamp3_lora import load_model
    checkpoint = torch.load(DEMO / "base" / "clamp3_demo_base.pth", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model", "epoch"} and isinstance(checkpoint["epoch"], int)
    prefixes = {key.split(".")[0] for key in checkpoint["model"]}
    assert prefixes == {"text_model", "text_proj", "symbolic_model", "symbolic_proj"}
    model = load_model(DEMO / "base" / "clamp3_demo_base.pth", text_model=str(DEMO / "tokenizer"))
    assert model.base_checkpoint["file"] == "clamp3_demo_base.pth"
    pieces = (DEMO / "base" / "pieces.tsv").read_text(encoding="utf-8").splitlines()
    demo_files = {Path(p).stem for p in (DEMO / "abc").glob("*")} | {Path(p).stem for p in (DEMO / "mtf").glob("*")}
    assert len(pieces) > 1000 and not {Path(line.split("\t")[0]).stem for line in pieces} & demo_files


def test_provenance_is_recorded():
    text = (DEMO / "PROVENANCE.md").read_text(encoding="utf-8")
    for word in ("music21", "Licence", "Ryan's Mammoth", "O'Neill", "Bach", "Aird"):
        assert word in text


def test_tokenizer_loads_offline_with_xlmr_special_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(DEMO / "tokenizer"), local_files_only=True)
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.sep_token == "</s>" and tok.cls_token == "<s>"
    assert tok.mask_token == "<mask>" and tok.mask_token_id is not None
    assert len(tok) <= 1000 and max(tok.get_vocab().values()) < 1000
    ids = tok("A reel in D major in 2/4, from Ryan's Mammoth Collection.")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 3
    assert tok.unk_token_id not in ids
    batch = tok(["a jig", "a much longer text about a hornpipe"], padding=True)["input_ids"]
    assert batch[0][-1] == 1   # padded with <pad> on the right


def test_every_piece_yields_patches():
    mtf = pytest.importorskip("clamp3_lora.mtf")
    patches = pytest.importorskip("clamp3_lora.patches")
    pieces = all_pieces()
    assert pieces
    for name, n, path in pieces:
        text = mtf.read_music(str(DEMO / path))
        result = patches.patchify(text, source=str(DEMO / path))
        assert 3 <= len(result) <= 512, f"{name}:{n}: {path} gives {len(result)} patches"
        assert all(len(p) == 64 for p in result)


def test_every_music_file_is_referenced_once():
    on_disk = {f.relative_to(DEMO).as_posix() for sub in ("abc", "mtf", "midi")
               for f in (DEMO / sub).glob("*") if f.is_file()}
    referenced = [path for _, _, path in all_pieces()]
    assert len(referenced) == len(set(referenced))
    assert set(referenced) == on_disk
