"""The host-side speed levers compute exactly what the code before them computed (issue 5).

- Packing metadata from the CPU mask (collate -> data.add_packing -> fast.packing) equals what the
  fast path computes from the mask itself, and the features are the same with and without it.
- step.read_scalars reads several values in one copy, exactly; read_scalars_during does too and
  runs its work; step.text_ahead gives the batch's own text features (None where it must not run),
  and train.with_next pairs each item with the next (the trainer's end-to-end check, default
  against --no-text-ahead, is in test_resume.py).
- patches.patch_array (numpy) equals the per-segment reference rows; patchify is pinned by the
  golden file in test_patches.py.
- The dataset's patch cache gives the same samples as the uncached path (a reference written here
  from the public patchify / remove_instrument_info / read_music, as __getitem__ was before), for
  training and evaluation, with and without instrument removal, long pieces and MIDI; a changed
  file is read again; the cache keeps to its memory bound.
"""
import os
import random

import mido
import numpy as np
import pytest
import torch

from clamp3_lora.speed import accelerate, fast
from clamp3_lora.data import (Collator, MusicTextDataset, PatchCache, encode_text, evaluation_text,
                              scan_data_file, training_text)
from clamp3_lora.model import load_model
from clamp3_lora.mtf import read_music
from clamp3_lora.patches import _patch_rows, _segment_to_patch, patch_array, patchify, remove_instrument_info
from clamp3_lora.step import packed_of, read_scalars, read_scalars_during, text_ahead, text_features
from clamp3_lora.train import with_next
from trainer_fixtures import word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer([f"w{i}" for i in range(50)])


def long_abc(bars, voice=True):
    head = "X:1\nT:Tune\nM:4/4\nL:1/8\nK:C\n" + ("V:1 nm=\"Flute\" snm=\"Fl.\"\n" if voice else "")
    body = "".join(f"{'ABcd'[i % 4]}2 c{i % 7}d e2 |" + ("\n" if i % 4 == 3 else "") for i in range(bars))
    return head + body + "\n"


def write_midi(path, notes=300):
    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track.append(mido.Message("program_change", channel=0, program=5, time=0))
    for i in range(notes):
        track.append(mido.Message("note_on", channel=0, note=40 + i % 40, velocity=80, time=0))
        track.append(mido.Message("note_off", channel=0, note=40 + i % 40, velocity=0, time=120))
    midi.save(str(path))


@pytest.fixture
def records(tmp_path):
    (tmp_path / "long.abc").write_text(long_abc(900))
    (tmp_path / "short.abc").write_text(long_abc(6))
    write_midi(tmp_path / "piece.mid")
    (tmp_path / "piece.mtf").write_text(read_music(tmp_path / "piece.mid"))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([
        '{"filepaths": ["long.abc", "short.abc"], "description": "w1 w2\\nw3 w4 w5"}',
        '{"filepaths": ["piece.mid"], "title": "w7", "translations": {"language": "xx", "title": "w8"}}',
        '{"filepaths": ["piece.mtf", "short.abc"], "analysis": "w9 w10 w11"}',
    ]) + "\n")
    return scan_data_file(data).records


def reference_sample(dataset, key):
    """dataset[key] as __getitem__ computed it before the cache (patchify on the file's text)."""
    if not dataset.train:
        index = key if isinstance(key, int) else key[0]
        record = dataset.records[index]
        patches = patchify(read_music(record.paths[0]), truncate="head", max_patches=dataset.max_patches)
        text_ids = encode_text(dataset.tokenizer, evaluation_text(record, dataset.sep), dataset.max_text_tokens)
    else:
        index, seed = key
        record = dataset.records[index]
        rng = random.Random(seed)
        path = rng.choice(record.paths)
        text_ids = encode_text(dataset.tokenizer, training_text(record, dataset.sep, rng), dataset.max_text_tokens, rng)
        music = read_music(path)
        if rng.random() < dataset.instrument_removal_prob:
            music = remove_instrument_info(music)
        patches = patchify(music, truncate="random", rng=rng, max_patches=dataset.max_patches)
    return torch.tensor(patches, dtype=torch.long), torch.tensor(text_ids, dtype=torch.long)


def same(item, reference):
    return (item["patches"].dtype == torch.long and torch.equal(item["patches"], reference[0])
            and torch.equal(item["text_ids"], reference[1]))


# --------------------------------------------------------------------------------------------
# Packing metadata from the CPU mask


def test_collated_packing_equals_the_model_side_packing(tokenizer, records):
    dataset = MusicTextDataset(records, tokenizer, train=True, max_patches=40)
    batch = Collator(tokenizer.pad_token_id)([dataset[(i % 3, 50 + i)] for i in range(7)])
    for prefix, mask in (("patch", batch["patch_mask"]), ("text", batch["text_mask"])):
        index, cu = packed_of(batch, prefix)
        ref = fast.Tokens.of(mask)
        got = fast.Tokens.of(mask, (index, cu))
        assert index.dtype == ref.index.dtype == torch.long and cu.dtype == ref.cu.dtype == torch.int32
        assert torch.equal(got.index, ref.index) and torch.equal(got.cu, ref.cu)
        assert torch.equal(got.column, ref.column)
        assert torch.equal(index, mask.reshape(-1).nonzero().squeeze(1))
    assert packed_of({"patch_mask": batch["patch_mask"]}, "patch") is None


def test_features_with_collated_packing_equal_features_without():
    torch.manual_seed(0)
    model = load_model(None, preset="tiny", text_model=None)
    model.add_adapter()
    accelerate(model, "fp32")
    model.eval()
    gen = torch.Generator().manual_seed(3)
    items = [{"patches": torch.randint(0, 128, (n, 64), generator=gen),
              "text_ids": torch.randint(3, 900, (t,), generator=gen), "index": i}
             for i, (n, t) in enumerate(zip((9, 1, 30, 4), (5, 12, 2, 7)))]
    batch = Collator(1)(items)
    with torch.no_grad():
        music = model.music_features(batch["patches"], batch["patch_mask"])
        text = model.text_features(batch["text_ids"], batch["text_mask"])
        music_packed, _ = model(batch["patches"], batch["patch_mask"], packed=packed_of(batch, "patch"))
        text_packed = model.text_features(batch["text_ids"], batch["text_mask"], packed_of(batch, "text"))
    assert torch.equal(music, music_packed) and torch.equal(text, text_packed)


def test_read_scalars_is_exact():
    loss = torch.tensor(1.2345678, dtype=torch.float32)
    norm = torch.tensor([float("inf")]).sum()
    values = read_scalars(loss, norm, torch.tensor(float("nan")))
    assert values[0] == loss.item() and values[1] == float("inf") and values[2] != values[2]


def test_read_scalars_during_reads_exactly_and_runs_the_work():
    calls = []
    values, result = read_scalars_during(lambda: calls.append(1) or "made", torch.tensor(0.1), torch.tensor(2.0))
    assert values == [torch.tensor(0.1).item(), 2.0] and result == "made" and calls == [1]


def test_with_next_pairs_each_item_with_the_next():
    assert list(with_next("abc")) == [("a", "b"), ("b", "c"), ("c", None)]
    assert list(with_next([])) == []


def test_text_ahead_gives_the_batch_own_text_features(monkeypatch):
    torch.manual_seed(0)
    model = load_model(None, preset="tiny", text_model=None)
    model.add_adapter()
    accelerate(model, "fp32")
    model.train()
    model.text_model.eval()
    gen = torch.Generator().manual_seed(4)
    items = [{"patches": torch.randint(0, 128, (n, 64), generator=gen),
              "text_ids": torch.randint(3, 900, (t,), generator=gen), "index": i}
             for i, (n, t) in enumerate(zip((3, 8), (6, 2)))]
    batch = Collator(1)(items)
    device_batch, text = text_ahead(model, batch, torch.device("cpu"), "fp32")
    assert device_batch.keys() == batch.keys() and not text.requires_grad
    assert torch.equal(text, text_features(model, batch))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(type(model), "text_features", out_of_memory)
        assert text_ahead(model, batch, torch.device("cpu"), "fp32") is None  # its own step meets the error
        patch.setattr(type(model), "text_features", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):  # any other error is raised
            text_ahead(model, batch, torch.device("cpu"), "fp32")
    model.text_proj.weight.requires_grad_(True)  # a trainable text side: its pass must follow the update
    assert text_ahead(model, batch, torch.device("cpu"), "fp32") is None


# --------------------------------------------------------------------------------------------
# Patches as a numpy array


@pytest.mark.parametrize("seed", range(5))
def test_patch_array_equals_the_per_segment_rows(seed):
    rng = random.Random(seed)
    alphabet = "abcXYZ |:[]/^_=,'0123456789\t\"%"
    lines = ["X:1", "K:C"] + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 150)))
                              for _ in range(60)]
    text = "\n".join(lines) + "\n"
    rows = patch_array(text, add_special_patches=False)
    assert rows.dtype == np.uint8 and rows.shape[1] == 64
    assert rows.tolist() == patchify(text, add_special_patches=False, truncate=None)
    # the rows of the segments, one by one (the reference the golden file pins)
    lengths = {len(row) for row in rows.tolist()}
    assert lengths == {64}
    for segment in ("", "a", "x" * 61, "y" * 62, "z" * 63, "w" * 200):
        assert _patch_rows([segment]).tolist() == [_segment_to_patch(segment)]


def test_patch_array_of_non_ascii_text_equals_patchify():
    text = "X:1\nT:Café Ünïcode ☃\nK:C\nabc|def|\n"
    assert patch_array(text).tolist() == patchify(text, truncate=None)


# --------------------------------------------------------------------------------------------
# The patch cache


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("removal", [0.0, 0.5, 1.0])
def test_cached_samples_equal_uncached_samples(tokenizer, records, train, removal):
    dataset = MusicTextDataset(records, tokenizer, train=train, max_patches=64, max_text_tokens=8,
                               instrument_removal_prob=removal)
    uncached = MusicTextDataset(records, tokenizer, train=train, max_patches=64, max_text_tokens=8,
                                instrument_removal_prob=removal, cache_mb=0)
    keys = [(i % 3, 1000 + 17 * i) for i in range(40)]
    for key in keys + keys:  # the second pass is served by the cache
        reference = reference_sample(dataset, key)
        assert same(dataset[key], reference) and same(uncached[key], reference)
    assert dataset.cache.entries and not uncached.cache.entries


def test_midi_text_is_cached_and_long_pieces_vary_their_window(tokenizer, records):
    dataset = MusicTextDataset(records, tokenizer, train=True, max_patches=32)
    windows = {tuple(dataset[(0, seed)]["patches"][:, 1].tolist()) for seed in range(30)}
    assert len(windows) > 2
    dataset[(1, 5)]
    assert any(key[1] == "mtf" for key in dataset.cache.entries)


def test_a_changed_file_is_read_again(tokenizer, records, tmp_path):
    dataset = MusicTextDataset(records, tokenizer, train=False, max_patches=512)
    before = dataset[0]["patches"]
    path = tmp_path / "long.abc"
    stat = os.stat(path)
    path.write_text(long_abc(50))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    after = dataset[0]["patches"]
    assert len(after) < len(before) and same(dataset[0], reference_sample(dataset, 0))


def test_cache_keeps_to_its_bound():
    cache = PatchCache(100)
    for i in range(10):
        cache.put(i, np.zeros(30, dtype=np.uint8), 30)
    assert cache.bytes <= 100 and list(cache.entries) == [7, 8, 9]
    assert cache.get(7) is not None
    cache.put(10, np.zeros(30, dtype=np.uint8), 30)
    assert list(cache.entries) == [9, 7, 10]
    cache.put("big", np.zeros(200, dtype=np.uint8), 200)
    assert "big" not in cache.entries and cache.get("big") is None
