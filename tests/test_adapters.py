"""LoRA adapters (SPEC §3): peft's directory format, interchangeable with published CLaMP 3 adapters."""
import dataclasses
import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import BertModel

from clamp3_lora.errors import CheckpointError, Clamp3LoraError
from clamp3_lora.model import PRESETS, Clamp3, load_model

TINY = PRESETS["tiny"]
FULL = PRESETS["full"]
LAYER_KEY = "base_model.model.encoder.layer.{}.attention.self.{}.lora_{}.weight"


def expected_keys(layers, targets=("query", "key", "value")):
    """The adapter_model.safetensors keys of a LoRA adapter on the symbolic BertModel."""
    return {LAYER_KEY.format(n, t, ab) for n in range(layers) for t in targets for ab in "AB"}


def full_symbolic_config():
    """Full-size symbolic encoder with the tiny text encoder (fast to build, fits published adapters)."""
    return dataclasses.replace(FULL, **{f.name: getattr(TINY, f.name)
                                        for f in dataclasses.fields(TINY) if f.name.startswith("text_")})


def batch(seed=1, lengths=(5, 9, 3)):
    gen = torch.Generator().manual_seed(seed)
    patches = torch.zeros(len(lengths), max(lengths), 64, dtype=torch.long)
    mask = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        patches[i, :n] = torch.randint(0, 128, (n, 64), generator=gen)
        mask[i, :n] = 1
    return patches, mask


@pytest.fixture
def base_checkpoint(tmp_path):
    """A random tiny model saved in the official layout (the shared base of the adapter tests)."""
    torch.manual_seed(0)
    path = tmp_path / "base.pth"
    torch.save({"model": Clamp3(TINY).state_dict(), "epoch": 1}, path)
    return path


def trained_adapter(model, seed=2):
    """Add an adapter and give every LoRA weight random values (B starts at zero: a no-op adapter)."""
    model.add_adapter()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def features(model, patches, mask):
    with torch.no_grad():
        return model.music_features(patches, mask)


# --- the published adapter -------------------------------------------------------------------


def test_published_adapter_loads_with_peft_into_full_symbolic_encoder(golden):
    path = golden / "adapter_published_abc"
    published = load_file(str(path / "adapter_model.safetensors"))
    assert set(published) == expected_keys(FULL.symbolic_layers)
    torch.manual_seed(0)
    wrapped = PeftModel.from_pretrained(BertModel(FULL.symbolic_config()), str(path))
    loaded = get_peft_model_state_dict(wrapped)
    assert set(loaded) == set(published)
    for key, value in published.items():
        assert torch.equal(loaded[key], value), key


def test_published_adapter_loads_with_load_adapter(golden):
    path = golden / "adapter_published_abc"
    published = load_file(str(path / "adapter_model.safetensors"))
    torch.manual_seed(0)
    model = Clamp3(full_symbolic_config()).eval()
    patches, mask = batch()
    before = features(model, patches, mask)
    model.load_adapter(path)
    lora = model.lora_state_dict()
    assert set(lora) == set(published)
    assert all(torch.equal(lora[k], published[k]) for k in published)
    config = model.lora_config()
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8, {"query", "key", "value"})
    assert not torch.allclose(before, features(model, patches, mask), atol=1e-4)
    assert model.trainable_parameters() == []


def test_adapter_of_another_size_names_the_keys(golden):
    torch.manual_seed(0)
    model = Clamp3(TINY)
    with pytest.raises(CheckpointError, match=r"unexpected LoRA keys: base_model\.model\.encoder\.layer\.\d+\."):
        model.load_adapter(golden / "adapter_published_abc")
    assert not model.has_adapter  # a failed load leaves the model as it was
    assert all(p.requires_grad for p in model.parameters())


# --- our adapters ----------------------------------------------------------------------------


def test_add_adapter_trains_only_lora(base_checkpoint):
    model = load_model(base_checkpoint, text_model=None)
    model.add_adapter(r=4, alpha=8, dropout=0.1)
    assert not any(m.training for m in model.modules())  # peft's new modules follow the eval mode
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(expected_keys(TINY.symbolic_layers))
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sum(p.numel() for p in model.trainable_parameters()) == TINY.symbolic_layers * 3 * 2 * 4 * 128
    assert set(model.lora_state_dict()) == expected_keys(TINY.symbolic_layers)


def test_gradients_reach_only_lora(base_checkpoint):
    model = load_model(base_checkpoint, text_model=None)
    model.add_adapter()
    model.train()
    patches, mask = batch()
    ids = torch.randint(3, TINY.text_vocab_size, (3, 7))
    text = model.text_features(ids, torch.ones(3, 7))
    assert not text.requires_grad  # the frozen text encoder runs without autograd
    clip = model.music_features(patches, mask) @ text.T
    clip.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif ".lora_A." not in name:
            assert p.grad is None, name


def test_double_wrap_is_refused(base_checkpoint, tmp_path):
    model = load_model(base_checkpoint, text_model=None)
    model.add_adapter()
    with pytest.raises(Clamp3LoraError, match="already has a LoRA adapter"):
        model.add_adapter()
    model.save_adapter(tmp_path / "ad")
    other = load_model(base_checkpoint, text_model=None)
    other.load_adapter(tmp_path / "ad")
    with pytest.raises(Clamp3LoraError, match="already has a LoRA adapter"):
        other.add_adapter()


def test_saved_adapter_directory_is_peft_format(base_checkpoint, tmp_path):
    model = trained_adapter(load_model(base_checkpoint, text_model=None))
    record = {"stage": "abc", "data": "abc_train.jsonl", "steps": 120, "best_metric": {"eval_loss": 1.5}}
    model.save_adapter(tmp_path / "lora_abc_adapter", record=record)
    folder = tmp_path / "lora_abc_adapter"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_record.json"]
    assert set(load_file(str(folder / "adapter_model.safetensors"))) == expected_keys(TINY.symbolic_layers)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "FEATURE_EXTRACTION"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert set(config["target_modules"]) == {"query", "key", "value"}
    saved = json.loads((folder / "training_record.json").read_text())
    assert {k: saved[k] for k in record} == record
    assert saved["base_checkpoint"]["file"] == "base.pth"
    assert saved["base_checkpoint"]["sha256_head_tail"] == model.base_checkpoint["sha256_head_tail"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_saved_adapter_reproduces_features_in_a_fresh_model(base_checkpoint, tmp_path):
    patches, mask = batch()
    model = trained_adapter(load_model(base_checkpoint, text_model=None))
    expected = features(model, patches, mask)
    model.save_adapter(tmp_path / "ad")

    fresh = load_model(base_checkpoint, text_model=None)
    assert not torch.allclose(features(fresh, patches, mask), expected, atol=1e-4)
    fresh.load_adapter(tmp_path / "ad")
    assert torch.allclose(features(fresh, patches, mask), expected, atol=1e-6)

    with_peft = load_model(base_checkpoint, text_model=None)
    with_peft.symbolic_model.base = PeftModel.from_pretrained(with_peft.symbolic_model.base, str(tmp_path / "ad"))
    assert torch.allclose(features(with_peft, patches, mask), expected, atol=1e-6)


def test_saving_again_replaces_the_adapter(base_checkpoint, tmp_path):
    model = trained_adapter(load_model(base_checkpoint, text_model=None), seed=3)
    model.save_adapter(tmp_path / "ad", record={"steps": 1})
    trained_adapter_weights = model.lora_state_dict()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.mul_(2)
    model.save_adapter(tmp_path / "ad", record={"steps": 2})
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], 2 * v) for k, v in trained_adapter_weights.items())
    assert json.loads((tmp_path / "ad" / "training_record.json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base.pth"]


def test_load_adapter_into_a_wrapped_model_keeps_the_parameters(base_checkpoint, tmp_path):
    source = trained_adapter(load_model(base_checkpoint, text_model=None))
    source.save_adapter(tmp_path / "ad")
    model = load_model(base_checkpoint, text_model=None)
    model.add_adapter()
    params = model.trainable_parameters()
    model.load_adapter(tmp_path / "ad")
    assert [id(p) for p in model.trainable_parameters()] == [id(p) for p in params]
    loaded = model.lora_state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.lora_state_dict().items())


def test_load_adapter_trainable_flag(base_checkpoint, tmp_path):
    trained_adapter(load_model(base_checkpoint, text_model=None)).save_adapter(tmp_path / "ad")
    frozen = load_model(base_checkpoint, text_model=None)
    frozen.load_adapter(tmp_path / "ad")
    assert frozen.trainable_parameters() == []
    trainable = load_model(base_checkpoint, text_model=None)
    trainable.load_adapter(tmp_path / "ad", trainable=True)
    assert len(trainable.trainable_parameters()) == len(expected_keys(TINY.symbolic_layers))


def test_rank_mismatch_is_refused(base_checkpoint, tmp_path):
    wide = load_model(base_checkpoint, text_model=None)
    wide.add_adapter(r=8, alpha=16)
    wide.save_adapter(tmp_path / "r8")
    model = load_model(base_checkpoint, text_model=None)
    model.add_adapter(r=4)
    with pytest.raises(CheckpointError, match="r: adapter 8, model 4.*rank mismatch"):
        model.load_adapter(tmp_path / "r8")
    fresh = load_model(base_checkpoint, text_model=None)
    fresh.load_adapter(tmp_path / "r8")  # an unwrapped model takes the adapter's own rank
    assert fresh.lora_config().r == 8


def test_lora_state_dict_round_trip_is_strict(base_checkpoint):
    source = trained_adapter(load_model(base_checkpoint, text_model=None))
    sd = source.lora_state_dict()
    model = load_model(base_checkpoint, text_model=None)
    model.add_adapter()
    key = LAYER_KEY.format(1, "value", "B")

    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(CheckpointError, match=f"missing LoRA keys: {key}"):
        model.load_lora_state_dict(missing)
    with pytest.raises(CheckpointError, match="unexpected LoRA keys: base_model.model.extra"):
        model.load_lora_state_dict({**sd, "base_model.model.extra.lora_A.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=f"{key}: adapter \\(128, 8\\), model \\(128, 4\\)"):
        model.load_lora_state_dict({**sd, key: torch.zeros(128, 8)})
    assert all(v.abs().sum() == 0 for k, v in model.lora_state_dict().items() if ".lora_B." in k)

    model.load_lora_state_dict(sd)
    loaded = model.lora_state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    loaded[key].add_(1)  # a copy: changing it leaves the model alone
    assert torch.equal(model.lora_state_dict()[key], sd[key])


def test_adapter_methods_need_an_adapter(base_checkpoint, tmp_path):
    model = load_model(base_checkpoint, text_model=None)
    with pytest.raises(Clamp3LoraError, match="no LoRA adapter"):
        model.save_adapter(tmp_path / "ad")
    with pytest.raises(Clamp3LoraError, match="no LoRA adapter"):
        model.lora_state_dict()
    with pytest.raises(CheckpointError, match="adapter_config.json not found"):
        model.load_adapter(tmp_path)


def test_adapter_without_task_type_loads(base_checkpoint, tmp_path):
    source = trained_adapter(load_model(base_checkpoint, text_model=None))
    source.save_adapter(tmp_path / "ad")
    config_file = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["task_type"] = None
    config_file.write_text(json.dumps(config))
    patches, mask = batch()
    model = load_model(base_checkpoint, text_model=None)
    model.load_adapter(tmp_path / "ad")
    assert torch.allclose(features(model, patches, mask), features(source, patches, mask), atol=1e-6)
