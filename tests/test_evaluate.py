"""Evaluation and embedding: long-input segments averaged as CLaMP 3 feature extraction does (checked
against a hand-computed average), the retrieval report of the tiny model (random preset and golden
checkpoint) with and without an adapter on the demo data, and `embed`."""
import json
import shutil
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

from clamp3_lora import evaluate
from clamp3_lora.data import MusicTextDataset, collate, scan_data_file
from clamp3_lora.metrics import METRIC_NAMES, chance_metrics, retrieval_metrics
from clamp3_lora.model import load_model
from clamp3_lora.mtf import read_music
from clamp3_lora.patches import patchify

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
TOKENIZER = str(DEMO / "tokenizer")
CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model():
    """The random tiny model evaluate builds for `--preset tiny --seed 0`."""
    torch.manual_seed(0)
    return load_model(None, preset="tiny", text_model=TOKENIZER)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A tiny-model adapter whose LoRA B weights are far from zero, so it changes the features."""
    torch.manual_seed(1)
    model = load_model(None, preset="tiny", text_model=None)
    model.add_adapter()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("adapters") / "perturbed_adapter"
    model.save_adapter(path, {"stage": "test"})
    return path


def alone(encode, sequence):
    """Features of one unpadded sequence, encoded by itself (the hand computation)."""
    with torch.no_grad():
        return encode(sequence.long()[None], torch.ones(1, len(sequence), dtype=torch.long))[0]


# --------------------------------------------------------------------------------------------
# Segments


def test_segment_bounds_follow_official_feature_extraction():
    assert evaluate.segment_bounds(300, 512) == [(0, 300, 300)]
    assert evaluate.segment_bounds(512, 512) == [(0, 512, 512)]
    assert evaluate.segment_bounds(513, 512) == [(0, 512, 512), (1, 513, 1)]
    assert evaluate.segment_bounds(1024, 512) == [(0, 512, 512), (512, 1024, 512)]
    assert evaluate.segment_bounds(1100, 512) == [(0, 512, 512), (512, 1024, 512), (588, 1100, 76)]
    with pytest.raises(ValueError):
        evaluate.segment_bounds(0, 512)


def test_long_piece_is_the_weighted_average_of_its_segments(tiny_model):
    generator = torch.Generator().manual_seed(0)
    long = torch.randint(0, 128, (1100, 64), generator=generator).to(torch.uint8)
    short = torch.randint(0, 128, (40, 64), generator=generator).to(torch.uint8)
    # batch of 2: the short piece shares a padded batch with a 512-patch segment
    got = evaluate.encode_sequences(tiny_model.music_features, [short, long], 512, 2, 0, CPU, "fp32",
                                    progress=False)
    parts = [alone(tiny_model.music_features, long[a:b]) for a, b in ((0, 512), (512, 1024), (588, 1100))]
    expected = (512 * parts[0] + 512 * parts[1] + 76 * parts[2]) / 1100
    torch.testing.assert_close(got[1], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], alone(tiny_model.music_features, short), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[1], sum(parts) / 3, atol=1e-4)  # not the plain mean
    assert not torch.allclose(got[1], parts[0], atol=1e-4)         # not the head alone


def test_long_text_is_the_weighted_average_of_its_segments(tiny_model):
    generator = torch.Generator().manual_seed(1)
    long = torch.randint(5, 900, (300,), generator=generator)
    got = evaluate.encode_sequences(tiny_model.text_features, [long], 128, 4, 1, CPU, "fp32", progress=False)
    parts = [alone(tiny_model.text_features, long[a:b]) for a, b in ((0, 128), (128, 256), (172, 300))]
    expected = (128 * parts[0] + 128 * parts[1] + 44 * parts[2]) / 300
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The evaluation report


def run_report(tmp_path, data, model_flags, adapters, capsys):
    """Run the evaluation command (it must succeed); (printed table, report JSON, report prefix)."""
    out = tmp_path / "report"
    argv = ["--data", str(data), "--text-model", TOKENIZER, "--device", "cpu", "--out-dir", str(out),
            "--quiet", "--batch-size", "8"] + model_flags
    for adapter in adapters:
        argv += ["--adapter", str(adapter)]
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = captured.out
    name = f"evaluation_{Path(data).stem}"
    report = json.loads((out / f"{name}.json").read_text())
    return printed, report, out / name


def check_report(printed, report, prefix, pairs):
    """The table, JSON and PNG are there; the adapter's numbers differ from the base model's."""
    assert Path(f"{prefix}.png").read_bytes()[:8] == PNG_MAGIC
    table = Path(f"{prefix}.txt").read_text()
    assert table.splitlines()[0].split() == ["metric", "chance", "base", "perturbed_adapter"]
    assert "t2m_mrr" in printed and "perturbed_adapter" in printed
    assert report["pairs"] == pairs
    # chance beside every metric: a random ranking of `pairs` pairs
    assert report["chance"] == chance_metrics(pairs)
    mrr_row = next(line.split() for line in table.splitlines() if line.startswith("t2m_mrr"))
    assert float(mrr_row[1]) == pytest.approx(sum(1 / r for r in range(1, pairs + 1)) / pairs, abs=1e-4)
    assert f"random ranking of {pairs} pairs" in table
    assert [r["name"] for r in report["results"]] == ["base", "perturbed_adapter"]
    base, adapted = (r["metrics"] for r in report["results"])
    assert list(base) == list(METRIC_NAMES) == list(adapted)
    assert all(0 <= base[k] <= 1 for k in METRIC_NAMES if "rank" not in k)
    assert base != adapted
    assert report["results"][1]["training_record"]["stage"] == "test"


def test_evaluate_random_tiny_preset_with_and_without_adapter(tiny_model, adapter_dir, tmp_path, capsys):
    data = DEMO / "abc_eval.jsonl"
    printed, report, prefix = run_report(tmp_path, data, ["--preset", "tiny"], [adapter_dir], capsys)
    check_report(printed, report, prefix, pairs=78)

    # the base column is the training's evaluation path (dataset, collate) when nothing is long
    scan = scan_data_file(data)
    dataset = MusicTextDataset(scan.records, tiny_model.tokenizer, train=False)
    assert report["segments"]["long_pieces"] == 0 and report["segments"]["long_texts"] == 0
    batch = collate([dataset[i] for i in range(len(dataset))], tiny_model.tokenizer.pad_token_id)
    with torch.no_grad():
        text = tiny_model.text_features(batch["text_ids"], batch["text_mask"])
        music = tiny_model.music_features(batch["patches"], batch["patch_mask"])
    expected = retrieval_metrics(text, music)
    for name in METRIC_NAMES:
        assert report["results"][0]["metrics"][name] == pytest.approx(expected[name], abs=1e-6)


def test_evaluate_golden_checkpoint_with_and_without_adapter(golden, adapter_dir, tmp_path, capsys):
    weights = golden / "tiny_official_checkpoint.pth"
    data = DEMO / "mtf_eval.jsonl"
    printed, report, prefix = run_report(tmp_path, data, ["--weights", str(weights)], [adapter_dir], capsys)
    check_report(printed, report, prefix, pairs=75)
    assert report["weights"] == str(weights)


@pytest.mark.skipif(not (DEMO / "base" / "clamp3_demo_base.pth").is_file(), reason="demo/base/ not present")
def test_evaluate_demo_uses_the_demo_base_and_tokenizer(tmp_path, capsys):
    """--demo: the demo base checkpoint, tokenizer and segment length, with no other model flag."""
    out = tmp_path / "report"
    code = evaluate.main(["--demo", "--data", str(DEMO / "abc_eval.jsonl"), "--device", "cpu", "--quiet",
                          "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "evaluation_abc_eval.json").read_text())
    assert report["weights"] == "demo/base/clamp3_demo_base.pth" and report["text_model"] == "demo/tokenizer"
    assert report["segments"]["patches"] == 256 and report["pairs"] == 78


def test_an_adapter_of_the_other_format_and_a_replaced_report_are_said(adapter_dir, tmp_path, capsys):
    """An MTF adapter scored on ABC data gets a note (its training record names the stage); a second
    run into the same report names the report it replaced."""
    mtf_adapter = tmp_path / "mtf_adapter"
    shutil.copytree(adapter_dir, mtf_adapter)
    (mtf_adapter / "training_record.json").write_text(json.dumps({"stage": "MTF"}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(json.loads(line), filepaths=[str(DEMO / p) for p in json.loads(line)["filepaths"]]))
                            + "\n" for line in (DEMO / "abc_eval.jsonl").read_text().splitlines()[:4]))
    argv = ["--data", str(data), "--preset", "tiny", "--text-model", TOKENIZER, "--device", "cpu", "--quiet",
            "--out-dir", str(tmp_path / "report"), "--music-root", str(DEMO), "--adapter", str(mtf_adapter)]
    assert evaluate.main(argv) == 0
    first = capsys.readouterr().err
    assert f"{mtf_adapter} was trained on MTF music; this data is ABC" in first and "replaced" not in first
    assert evaluate.main(argv) == 0
    assert f"replaced the earlier report {tmp_path / 'report' / 'evaluation_pairs'}.*" in capsys.readouterr().err


def test_an_eval_set_of_one_pair_is_refused_clearly(tmp_path, capsys):
    record = json.loads((DEMO / "abc_eval.jsonl").read_text().splitlines()[0])
    record["filepaths"] = [str(DEMO / p) for p in record["filepaths"]]
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(record) + "\n")
    code = evaluate.main(["--data", str(data), "--preset", "tiny", "--text-model", TOKENIZER, "--device", "cpu",
                          "--quiet", "--out-dir", str(tmp_path / "report"), "--music-root", str(DEMO)])
    assert code == 2
    assert "1 usable text-music pair(s)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_is_the_default_and_the_cpu_an_explicit_choice(tmp_path, capsys):
    code = evaluate.main(["--data", str(DEMO / "abc_eval.jsonl"), "--preset", "tiny", "--text-model",
                          TOKENIZER, "--out-dir", str(tmp_path), "--quiet"])
    assert code == 2
    assert "--device cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# embed


def test_embed_music_and_text_files(tiny_model, adapter_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    (inputs / "tunes").mkdir(parents=True)
    abc = sorted((DEMO / "abc").glob("*.abc"))[0]
    mtf = sorted((DEMO / "mtf").glob("*.mtf"))[0]
    shutil.copy(abc, inputs / "tunes" / "tune.abc")
    shutil.copy(mtf, inputs / "piece.mtf")
    midi = mido.MidiFile(ticks_per_beat=96)
    midi.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, time=0),
                                       mido.Message("note_off", note=60, time=96)]))
    midi.save(inputs / "tunes" / "melody.mid")
    (inputs / "tunes" / "tune.txt").write_text("A slow air.\n\nA slow air.\nIn G major.\n")
    (inputs / "empty.abc").write_text("  \n")

    out = tmp_path / "features"
    flags = ["--preset", "tiny", "--text-model", TOKENIZER, "--device", "cpu", "--quiet"]
    assert evaluate.main(["embed", str(inputs), "--out-dir", str(out)] + flags) == 1
    assert "empty.abc" in capsys.readouterr().err
    assert "empty.abc" in (out / "embed_errors.txt").read_text()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == ["piece.mtf.npy", "tunes/melody.mid.npy", "tunes/tune.abc.npy", "tunes/tune.txt.npy"]

    features = {name: np.load(out / name) for name in written}
    assert all(f.shape == (64,) and f.dtype == np.float32 for f in features.values())
    for name, source in (("tunes/tune.abc.npy", abc), ("tunes/melody.mid.npy", inputs / "tunes" / "melody.mid")):
        patches = torch.tensor(patchify(read_music(source), truncate=None))
        assert len(patches) <= 512
        np.testing.assert_allclose(features[name], alone(tiny_model.music_features, patches).numpy(),
                                   rtol=1e-4, atol=1e-5)
    tokenizer = tiny_model.tokenizer
    ids = torch.tensor(tokenizer(tokenizer.sep_token.join(["A slow air.", "In G major."]))["input_ids"])
    np.testing.assert_allclose(features["tunes/tune.txt.npy"], alone(tiny_model.text_features, ids).numpy(),
                               rtol=1e-4, atol=1e-5)

    adapted_out = tmp_path / "adapted"
    (inputs / "empty.abc").unlink()
    assert evaluate.main(["embed", str(inputs / "tunes"), "--out-dir", str(adapted_out),
                          "--adapter", str(adapter_dir), "--normalize"] + flags) == 0
    adapted = {name: np.load(adapted_out / name) for name in ("tune.abc.npy", "tune.txt.npy")}
    assert np.linalg.norm(adapted["tune.abc.npy"]) == pytest.approx(1.0, abs=1e-5)
    normalised = features["tunes/tune.txt.npy"] / np.linalg.norm(features["tunes/tune.txt.npy"])
    np.testing.assert_allclose(adapted["tune.txt.npy"], normalised, rtol=1e-4, atol=1e-6)  # text: no adapter
    base_music = features["tunes/tune.abc.npy"] / np.linalg.norm(features["tunes/tune.abc.npy"])
    assert not np.allclose(adapted["tune.abc.npy"], base_music, atol=1e-3)
