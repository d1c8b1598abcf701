"""`python -m clamp3_lora.merge`: the adapter merged into an official-layout checkpoint that loads as
plain weights and computes base + adapter."""
import dataclasses
import re

import pytest
import torch

from clamp3_lora import load_model, merge
from clamp3_lora.model import PRESETS, Clamp3

PATCHES = 5


def write_base(path, config=PRESETS["tiny"], seed=0):
    """A random model saved in the official layout, with an audio key and an epoch beside it."""
    torch.manual_seed(seed)
    model = Clamp3(config)
    state = dict(model.state_dict(), **{"audio_model.encoder.weight": torch.randn(3, 4)})
    torch.save({"model": state, "epoch": 7}, path)
    return path


def write_adapter(weights, folder, seed=1):
    """An adapter with non-zero weights (a fresh LoRA adds nothing) trained for `weights`."""
    model = load_model(weights, text_model=None)
    model.add_adapter(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.normal_(0, 0.2)
    model.save_adapter(folder)
    return folder


def features(model):
    """(music, text) features of fixed random inputs."""
    torch.manual_seed(3)
    patches = torch.randint(0, 128, (2, PATCHES, 64))
    mask = torch.ones(2, PATCHES, dtype=torch.long)
    ids = torch.randint(4, 50, (2, 9))
    return model.music_features(patches, mask), model.text_features(ids, torch.ones_like(ids))


def test_merged_checkpoint_loads_as_plain_weights_and_equals_base_plus_adapter(tmp_path):
    base = write_base(tmp_path / "base.pth")
    adapter = write_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged.pth"
    assert merge.main(["--weights", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0

    original, merged = torch.load(base, weights_only=True), torch.load(out, weights_only=True)
    assert merged["epoch"] == 7 and set(merged["model"]) == set(original["model"])
    for key, tensor in original["model"].items():
        assert merged["model"][key].shape == tensor.shape and merged["model"][key].dtype == tensor.dtype, key
    changed = {k for k in original["model"] if not torch.equal(original["model"][k], merged["model"][k])}
    assert changed and all(re.search(r"^symbolic_model\.base\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)"
                                     r"\.weight$", k) for k in changed), changed
    assert torch.equal(merged["model"]["audio_model.encoder.weight"], original["model"]["audio_model.encoder.weight"])

    adapted = load_model(base, text_model=None)
    adapted.load_adapter(adapter)
    plain = load_model(out, text_model=None)
    (music_a, text_a), (music_p, text_p) = features(adapted), features(plain)
    assert (music_a - music_p).abs().max() <= 1e-5 and torch.equal(text_a, text_p)
    without = load_model(base, text_model=None)
    assert (features(without)[0] - music_p).abs().max() > 1e-3   # the adapter did change something


def test_merge_refuses_an_adapter_of_another_size_and_an_existing_output(tmp_path, capsys):
    base = write_base(tmp_path / "base.pth")
    deeper = write_base(tmp_path / "deeper.pth", dataclasses.replace(PRESETS["tiny"], symbolic_layers=3))
    adapter = write_adapter(deeper, tmp_path / "adapter")
    out = tmp_path / "merged.pth"
    assert merge.main(["--weights", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trained for a symbolic encoder of 3 layers and hidden size 128; these weights have 2 layers" in err
    assert not out.exists()
    out.write_bytes(b"keep me")
    assert merge.main(["--weights", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "exists; choose another --out or add --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "x.pth")]) == 2
    assert "give --weights" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["weights", "adapter"])
def test_merge_names_a_missing_input(tmp_path, capsys, missing):
    base = write_base(tmp_path / "base.pth")
    adapter = write_adapter(base, tmp_path / "adapter")
    args = {"weights": str(base), "adapter": str(adapter)}
    args[missing] = str(tmp_path / "nowhere")
    assert merge.main(["--weights", args["weights"], "--adapter", args["adapter"], "--out", str(tmp_path / "m.pth")]) == 2
    assert "nowhere" in capsys.readouterr().err
