"""The model contract (SPEC §2): official checkpoints load unchanged and compute the official features."""
import dataclasses
import shutil

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F

from clamp3_lora.errors import CheckpointError, Clamp3LoraError
from clamp3_lora.model import (
    PRESETS,
    Clamp3,
    ModelConfig,
    base_checkpoint_identity,
    clip_loss,
    load_model,
)

TINY = PRESETS["tiny"]


def random_model(config=TINY, seed=0):
    """A random Clamp3 in eval mode, seeded."""
    torch.manual_seed(seed)
    return Clamp3(config).eval()


def save_official(model, path, extra=None, drop=()):
    """Save model in the official checkpoint layout, with fake audio keys (and optional edits)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    hidden = model.config.symbolic_hidden_size
    sd["audio_model.embeddings.word_embeddings.weight"] = torch.randn(1, hidden)
    sd["audio_model.encoder.layer.0.attention.self.query.weight"] = torch.randn(hidden, hidden)
    sd["audio_proj.weight"] = torch.randn(model.config.projection_size, hidden)
    sd.update(extra or {})
    for key in drop:
        del sd[key]
    torch.save({"model": sd, "epoch": 3, "min_eval_loss": 0.5}, path)
    return path


def random_batch(lengths, seed=1, pad_to=None):
    """Random patches [B, L, 64] (ids 0..127, zeros inside patches too) and their mask."""
    gen = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths)
    patches = torch.zeros(len(lengths), width, 64, dtype=torch.long)
    mask = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        patches[i, :n] = torch.randint(0, 128, (n, 64), generator=gen)
        patches[i, :n, 40:] = 0  # pad characters inside a patch
        mask[i, :n] = 1
    return patches, mask


def pad(patches, mask, width):
    """Pad a batch to width patches (zeros, mask 0)."""
    extra = width - patches.shape[1]
    return F.pad(patches, (0, 0, 0, extra)), F.pad(mask, (0, extra))


# --- golden ----------------------------------------------------------------------------------


def test_tiny_preset_equals_golden_configuration(golden):
    ref = torch.load(golden / "tiny_forward.pt", map_location="cpu", weights_only=True)
    text, sym = ref["text_config"], ref["symbolic_config"]
    assert (TINY.text_vocab_size, TINY.text_hidden_size, TINY.text_layers, TINY.text_heads, TINY.text_ffn_size,
            TINY.text_max_positions, TINY.text_type_vocab_size, TINY.text_pad_token_id, TINY.text_layer_norm_eps) == (
        text["vocab_size"], text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
        text["intermediate_size"], text["max_position_embeddings"], text["type_vocab_size"],
        text["pad_token_id"], text["layer_norm_eps"])
    assert (TINY.symbolic_hidden_size, TINY.symbolic_layers, TINY.symbolic_heads, TINY.symbolic_ffn_size,
            TINY.symbolic_max_positions) == (
        sym["hidden_size"], sym["num_hidden_layers"], sym["num_attention_heads"], sym["intermediate_size"],
        sym["max_position_embeddings"])
    assert TINY.projection_size == ref["projection_size"]
    assert TINY.patch_size == ref["patch_size"]


def test_golden_checkpoint_loads_without_configuration(golden):
    model = load_model(golden / "tiny_official_checkpoint.pth", text_model=None)
    assert model.config == TINY
    assert model.tokenizer is None
    assert not model.training
    assert model.base_checkpoint["file"] == "tiny_official_checkpoint.pth"


def test_golden_features_and_loss(golden):
    ref = torch.load(golden / "tiny_forward.pt", map_location="cpu", weights_only=True)
    model = load_model(golden / "tiny_official_checkpoint.pth", text_model=None)
    with torch.no_grad():
        text = model.text_features(ref["text_ids"], ref["text_masks"])
        music = model.music_features(ref["music_patches"], ref["music_masks"])
        loss = clip_loss(music, text)
    assert torch.allclose(text, ref["text_features"], atol=1e-5, rtol=0)
    assert torch.allclose(music, ref["symbolic_features"], atol=1e-5, rtol=0)
    assert abs(loss.item() - ref["loss"].item()) < 1e-5


def test_golden_features_unchanged_when_padded_to_512(golden):
    ref = torch.load(golden / "tiny_forward.pt", map_location="cpu", weights_only=True)
    model = load_model(golden / "tiny_official_checkpoint.pth", text_model=None)
    patches, mask = pad(ref["music_patches"], ref["music_masks"], 512)
    with torch.no_grad():
        music = model.music_features(patches, mask)
    assert torch.allclose(music, ref["symbolic_features"], atol=1e-5, rtol=0)


def test_preset_full_is_the_official_size():
    full = PRESETS["full"]
    assert (full.text_vocab_size, full.text_hidden_size, full.text_layers, full.text_heads,
            full.text_ffn_size, full.text_max_positions) == (250002, 768, 12, 12, 3072, 514)
    assert (full.symbolic_hidden_size, full.symbolic_layers, full.symbolic_heads, full.symbolic_ffn_size,
            full.symbolic_max_positions, full.projection_size) == (768, 12, 12, 3072, 512, 768)


# --- forward semantics (own fixtures) --------------------------------------------------------


def test_gather_sum_equals_one_hot_linear():
    model = random_model()
    encoder = model.symbolic_model
    patches, _ = random_batch([5, 3, 7], seed=3)
    gathered = encoder.embed_patches(patches)
    one_hot = F.one_hot(patches, 128).float().flatten(2)
    reference = encoder.patch_embedding(one_hot)
    assert torch.allclose(gathered, reference, atol=1e-5, rtol=0)
    weight = encoder.patch_embedding.weight
    grad_gathered, = torch.autograd.grad(gathered.square().sum(), weight)
    grad_reference, = torch.autograd.grad(reference.square().sum(), weight)
    assert torch.allclose(grad_gathered, grad_reference, atol=1e-4, rtol=1e-5)


def test_pad_characters_inside_a_patch_contribute():
    encoder = random_model().symbolic_model
    zeros = torch.zeros(1, 1, 64, dtype=torch.long)
    expected = encoder.patch_embedding.weight[:, torch.arange(64) * 128].sum(1) + encoder.patch_embedding.bias
    assert torch.allclose(encoder.embed_patches(zeros)[0, 0], expected, atol=1e-5)


def test_music_features_independent_of_padding_length():
    model = random_model()
    patches, mask = random_batch([9, 2, 17, 5])
    with torch.no_grad():
        short = model.music_features(patches, mask)
        long = model.music_features(*pad(patches, mask, 512))
        alone = model.music_features(patches[1:2, :2], mask[1:2, :2])
    assert torch.allclose(short, long, atol=1e-5, rtol=0)
    assert torch.allclose(short[1:2], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(short[0], short[2], atol=1e-3)


def test_text_features_independent_of_padding_length():
    model = random_model()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, TINY.text_vocab_size, (2, 12), generator=gen)
    mask = torch.ones(2, 12)
    ids[1, 7:] = TINY.text_pad_token_id
    mask[1, 7:] = 0
    padded_ids = F.pad(ids, (0, 30), value=TINY.text_pad_token_id)
    padded_mask = F.pad(mask, (0, 30))
    with torch.no_grad():
        short = model.text_features(ids, mask)
        long = model.text_features(padded_ids, padded_mask)
    assert torch.allclose(short, long, atol=1e-5, rtol=0)


def test_clip_loss_is_symmetric_cross_entropy():
    gen = torch.Generator().manual_seed(5)
    music, text = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    logits = music @ text.T
    diag = logits.diagonal()
    by_music = (logits.logsumexp(1) - diag).mean()
    by_text = (logits.logsumexp(0) - diag).mean()
    assert torch.allclose(clip_loss(music, text), (by_music + by_text) / 2, atol=1e-6)
    assert clip_loss(10 * torch.eye(4), torch.eye(4)) < 1e-3


def test_random_preset_follows_the_callers_seed():
    a, b, c = random_model(seed=7), random_model(seed=7), random_model(seed=8)
    assert torch.equal(a.symbolic_proj.weight, b.symbolic_proj.weight)
    assert not torch.equal(a.symbolic_proj.weight, c.symbolic_proj.weight)
    torch.manual_seed(7)
    d = load_model(None, preset="tiny", text_model=None)
    assert torch.equal(a.symbolic_proj.weight, d.symbolic_proj.weight)


def test_sdpa_attention_is_used():
    model = random_model()
    assert model.text_model.config._attn_implementation == "sdpa"
    assert model.symbolic_model.base.config._attn_implementation == "sdpa"


# --- loading own checkpoints -----------------------------------------------------------------


def test_own_official_layout_checkpoint_round_trips(tmp_path):
    model = random_model()
    path = save_official(model, tmp_path / "weights.pth", extra={
        "text_model.embeddings.position_ids": torch.arange(TINY.text_max_positions)[None],
        "symbolic_model.base.embeddings.position_ids": torch.arange(512)[None],
        "symbolic_model.base.embeddings.token_type_ids": torch.zeros(1, 512, dtype=torch.long),
    })
    loaded = load_model(path, text_model=None)
    assert loaded.config == TINY
    patches, mask = random_batch([4, 6])
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.music_features(patches, mask), loaded.music_features(patches, mask))
        assert torch.equal(model.text_features(ids, torch.ones(2, 9)), loaded.text_features(ids, torch.ones(2, 9)))
    assert loaded.base_checkpoint == base_checkpoint_identity(path)


def test_every_size_is_read_off_the_weights(tmp_path):
    config = dataclasses.replace(
        TINY, text_vocab_size=300, text_hidden_size=192, text_layers=3, text_heads=3, text_ffn_size=100,
        text_max_positions=40, symbolic_hidden_size=256, symbolic_layers=1, symbolic_heads=4,
        symbolic_ffn_size=96, symbolic_max_positions=64, projection_size=32)
    path = save_official(random_model(config), tmp_path / "odd.pth")
    assert load_model(path, text_model=None).config == config


def test_wrong_size_against_preset_names_the_dimension(tmp_path):
    big = dataclasses.replace(TINY, symbolic_hidden_size=256, symbolic_heads=4)
    path = save_official(random_model(big), tmp_path / "big.pth")
    with pytest.raises(CheckpointError, match="symbolic hidden size: checkpoint 256, model 128"):
        load_model(path, text_model=None, preset="tiny")
    with pytest.raises(CheckpointError, match="symbolic hidden size: checkpoint 256, model 768"):
        load_model(path, text_model=None, preset=PRESETS["full"])


def test_missing_key_is_named(tmp_path):
    key = "symbolic_model.base.encoder.layer.1.attention.self.value.bias"
    path = save_official(random_model(), tmp_path / "missing.pth", drop=[key])
    with pytest.raises(CheckpointError, match=f"missing checkpoint keys: {key}"):
        load_model(path, text_model=None)


def test_missing_size_key_is_named(tmp_path):
    key = "symbolic_model.patch_embedding.weight"
    path = save_official(random_model(), tmp_path / "missing.pth", drop=[key])
    with pytest.raises(CheckpointError, match=key):
        load_model(path, text_model=None)


def test_unexpected_key_is_named(tmp_path):
    path = save_official(random_model(), tmp_path / "extra.pth",
                         extra={"symbolic_model.extra_head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected checkpoint keys: symbolic_model.extra_head.weight"):
        load_model(path, text_model=None)


def test_many_keys_are_shortened_but_named(tmp_path):
    model = random_model()
    drop = [k for k in model.state_dict() if k.startswith("text_model.encoder.layer.1.attention.")]
    path = save_official(model, tmp_path / "many.pth", drop=drop)
    with pytest.raises(CheckpointError, match=r"text_model\.encoder\.layer\.1\..* and \d+ more"):
        load_model(path, text_model=None)


def test_shape_mismatch_is_named(tmp_path):
    path = save_official(random_model(), tmp_path / "shape.pth", extra={"text_proj.weight": torch.zeros(64, 100)})
    with pytest.raises(CheckpointError, match=r"text_proj.weight: checkpoint \(64, 100\), model \(64, 128\)"):
        load_model(path, text_model=None)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", bytes(range(256)) * 4])
def test_unreadable_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_model(path, text_model=None)


def test_file_without_model_state_dict_names_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="other.pth"):
        load_model(path, text_model=None)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="other.pth"):
        load_model(path, text_model=None)
    with pytest.raises(CheckpointError, match="nowhere.pth"):
        load_model(tmp_path / "nowhere.pth", text_model=None)


def test_legacy_serialization_loads(tmp_path):
    model = random_model()
    path = tmp_path / "legacy.pth"
    torch.save({"model": model.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert load_model(path, text_model=None).config == TINY


def test_needs_path_or_known_preset():
    with pytest.raises(Clamp3LoraError, match="preset"):
        load_model(None, text_model=None)
    with pytest.raises(Clamp3LoraError, match="huge"):
        load_model(None, text_model=None, preset="huge")


def test_base_checkpoint_identity_follows_content(tmp_path):
    a = tmp_path / "a.pth"
    a.write_bytes(bytes(3_000_000))
    b = tmp_path / "b.pth"
    shutil.copy(a, b)
    assert base_checkpoint_identity(a)["sha256_head_tail"] == base_checkpoint_identity(b)["sha256_head_tail"]
    b.write_bytes(bytes(2_999_999) + b"x")
    assert base_checkpoint_identity(a)["sha256_head_tail"] != base_checkpoint_identity(b)["sha256_head_tail"]
    assert base_checkpoint_identity(a)["size"] == 3_000_000


# --- tokenizer -------------------------------------------------------------------------------


def make_tokenizer(folder, pad_id=1, size=20):
    """A tiny word-level tokenizer saved as a transformers tokenizer folder (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    if pad_id != 1:
        specials[1], specials[pad_id] = specials[pad_id], specials[1]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(size - 4)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", sep_token="</s>")
    tokenizer.save_pretrained(str(folder))
    return folder


def test_text_model_none_gives_no_tokenizer(tmp_path):
    path = save_official(random_model(), tmp_path / "w.pth")
    assert load_model(path, text_model=None).tokenizer is None


def test_tokenizer_from_local_folder(tmp_path):
    path = save_official(random_model(), tmp_path / "w.pth")
    model = load_model(path, text_model=str(make_tokenizer(tmp_path / "tok")))
    assert model.tokenizer.pad_token_id == 1
    ids = model.tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert model.text_features(ids["input_ids"], ids["attention_mask"]).shape == (2, TINY.projection_size)


def test_tokenizer_that_does_not_fit_is_refused(tmp_path):
    path = save_official(random_model(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="pad id 0"):
        load_model(path, text_model=str(make_tokenizer(tmp_path / "pad0", pad_id=0)))
    with pytest.raises(CheckpointError, match="2000 tokens"):
        load_model(path, text_model=str(make_tokenizer(tmp_path / "big", size=2000)))


def test_unavailable_tokenizer_gives_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = save_official(random_model(), tmp_path / "w.pth")
    with pytest.raises(Clamp3LoraError, match="no-such-org/no-such-tokenizer.*not available.*local folder"):
        load_model(path, text_model="no-such-org/no-such-tokenizer")


def test_model_config_is_plain_and_comparable():
    assert ModelConfig(**dataclasses.asdict(TINY)) == TINY
    assert dataclasses.replace(TINY, text_layers=3).differences(TINY) == ["text layers: checkpoint 3, model 2"]
