"""The public API of README.md / SPEC §10, used exactly as a user would."""
import torch

import clamp3_lora


def test_golden_checkpoint_loads_with_no_configuration(golden):
    model = clamp3_lora.load_model(str(golden / "tiny_official_checkpoint.pth"), text_model=None)
    ref = torch.load(golden / "tiny_forward.pt", map_location="cpu", weights_only=True)
    assert model.tokenizer is None
    with torch.no_grad():
        music = model.music_features(ref["music_patches"], ref["music_masks"])
        text = model.text_features(ref["text_ids"], ref["text_masks"])
        loss = clamp3_lora.clip_loss(music, text)
    assert torch.allclose(music, ref["symbolic_features"], atol=1e-5)
    assert torch.allclose(text, ref["text_features"], atol=1e-5)
    assert abs(loss.item() - ref["loss"].item()) < 1e-5


def test_patchify_and_adapter_round_trip_through_the_public_names(tmp_path):
    torch.manual_seed(0)
    model = clamp3_lora.load_model(None, preset="tiny", text_model="demo/tokenizer")
    patches = torch.tensor([clamp3_lora.patchify("X:1\nK:C\nabc|def|\n")])
    assert patches.shape == (1, 6, 64)  # BOS, "X:1", "K:C", "abc|", "def|\n", EOS
    mask = torch.ones(patches.shape[:2], dtype=torch.long)
    model.add_adapter()
    for name, param in model.symbolic_model.base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.eval()
    with torch.no_grad():
        expected = model.music_features(patches, mask)
    model.save_adapter(tmp_path / "adapter")

    torch.manual_seed(0)
    fresh = clamp3_lora.load_model(None, preset="tiny", text_model="demo/tokenizer")
    with torch.no_grad():
        base = fresh.music_features(patches, mask)
    fresh.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        loaded = fresh.music_features(patches, mask)
    assert not torch.allclose(base, expected, atol=1e-4)
    assert torch.allclose(loaded, expected, atol=1e-6)
