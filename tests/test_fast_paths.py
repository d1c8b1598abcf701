"""Fast paths of the training step compute the same function as the plain path (issue 5).

Every fast path (packed tokens with per-sample attention, fused per-layer regions, shared LoRA
dropout, fp32 or compute-dtype residual stream, frozen weights stored in bf16) is compared on the
CPU with the plain transformers/peft path in fp32: features, loss and LoRA gradients, fp32 paths to
1e-5, bf16 paths to 1e-2 (gradients: see test_bf16_paths_match_fp32). The GPU kernels (flash
varlen attention, torch.compile'd regions) are checked the same way by bench/train_step.py before
it times anything.
"""
import itertools

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from clamp3_lora.speed import accelerate, fast
from clamp3_lora.errors import Clamp3LoraError
from clamp3_lora.model import clip_loss, load_model

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def tiny_model(seed=0, lora_dropout=0.1):
    """The tiny model with an adapter whose B matrices are random (so every LoRA gradient is nonzero)."""
    torch.manual_seed(seed)
    model = load_model(None, preset="tiny", text_model=None)
    model.add_adapter(dropout=lora_dropout)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def make_batch(seed=0, lengths=(23, 1, 7, 16, 3), text_lengths=None, width=None, hole=False):
    """Patches/mask padded to `width` (default: the longest) and text ids/mask (pad id 1)."""
    gen = torch.Generator().manual_seed(seed)
    text_lengths = text_lengths or [(17, 5, 9, 2, 12)[i % 5] for i in range(len(lengths))]
    width = width or max(lengths)
    batch = len(lengths)
    patches = torch.randint(0, 128, (batch, width, 64), generator=gen)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    if hole:  # a masked-out patch inside a piece: the mask, not the position, decides what counts
        mask[0, 2] = 0
    patches[mask == 0] = 0
    t_width = max(text_lengths)
    ids = torch.randint(3, 1000, (batch, t_width), generator=gen)
    text_mask = (torch.arange(t_width)[None] < torch.tensor(text_lengths)[:, None]).long()
    ids[text_mask == 0] = 1
    return {"patches": patches, "patch_mask": mask, "text_ids": ids, "text_mask": text_mask}


def step_outputs(model, batch, autocast=False):
    """(music features, text features, loss, {LoRA name: grad}) of one training-style step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        music = model.music_features(batch["patches"], batch["patch_mask"])
        with torch.no_grad():
            text = model.text_features(batch["text_ids"], batch["text_mask"])
        loss = clip_loss(music, text)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return music.detach().float(), text.float(), loss.detach(), grads


def all_grads(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def assert_close(fast_out, plain_out, tol, grad_tol=None):
    music, text, loss, grads = fast_out
    p_music, p_text, p_loss, p_grads = plain_out
    assert rel(music, p_music) <= tol
    assert rel(text, p_text) <= tol
    assert rel(loss, p_loss) <= tol
    assert set(grads) == set(p_grads) and all(g.abs().sum() > 0 for g in p_grads.values())
    worst = max(rel(grads[name], p_grads[name]) for name in p_grads)
    assert worst <= (grad_tol or tol), worst


def no_dropout(model):
    """Set every dropout probability to 0 (hidden, attention and LoRA), so training mode is deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for config in (model.symbolic_model.bert.config, model.text_model.config):
        config.attention_probs_dropout_prob = 0.0


SETTINGS = [dict(shared_lora_dropout=s, fp32_residual=r) for s, r in itertools.product((True, False), repeat=2)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"shared={s['shared_lora_dropout']}"
                                                            f"-fp32res={s['fp32_residual']}")
def test_fp32_fast_path_equals_plain_path_eval(settings):
    model = tiny_model().eval()
    batch = make_batch(hole=True)
    plain = step_outputs(model, batch)
    state = accelerate(model, "fp32", **settings)
    assert state["fast_encoder"] and state["compile_layers"] == "none" and not state["bf16_weights"]
    assert_close(step_outputs(model, batch), plain, FP32_TOL)


def test_fp32_fast_path_equals_plain_path_in_training_mode_without_dropout():
    model = tiny_model().train()
    no_dropout(model)
    batch = make_batch(seed=3, lengths=(30, 2, 11), text_lengths=(4, 9, 6))
    plain = step_outputs(model, batch)
    accelerate(model, "fp32")
    assert_close(step_outputs(model, batch), plain, FP32_TOL)


def test_fused_lora_with_a_subset_of_targets_lora_bias_and_odd_scale_equals_plain_path():
    """The shared path folds every LoRA term (its scale and a LoRA bias too) into one block-diagonal
    matmul; projections without LoRA get zero blocks."""
    from peft import LoraConfig
    torch.manual_seed(4)
    model = load_model(None, preset="tiny", text_model=None)
    model._wrap(LoraConfig(r=3, lora_alpha=5, lora_dropout=0.2, target_modules=["query", "value"],
                           lora_bias=True, task_type="FEATURE_EXTRACTION"), trainable=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape) * 0.05)
    model.train()
    no_dropout(model)
    batch = make_batch(seed=6, lengths=(12, 5, 1), text_lengths=(3, 8, 2))
    plain = step_outputs(model, batch)
    assert any("lora_B" in name and name.endswith("bias") for name in plain[3])
    accelerate(model, "fp32", shared_lora_dropout=True)
    assert_close(step_outputs(model, batch), plain, FP32_TOL)


def test_padding_is_invisible_to_the_fast_path():
    model = tiny_model().eval()
    accelerate(model, "fp32")
    tight = make_batch(seed=5, lengths=(6, 3, 9))
    wide = make_batch(seed=5, lengths=(6, 3, 9), width=40)
    wide["patches"][:, :9] = tight["patches"]
    with torch.no_grad():
        a = model.music_features(tight["patches"], tight["patch_mask"])
        b = model.music_features(wide["patches"], wide["patch_mask"])
    assert rel(b, a) <= FP32_TOL


def test_padded_attention_equals_per_sample_attention():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 8]
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()
    tokens = fast.Tokens.of(mask)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=gen) for _ in range(3))
    out = fast.attend(q, k, v, tokens.attention_layout("padded"), 0.0, 0.25)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        ref = torch.softmax(torch.einsum("qhd,khd->hqk", q[part], k[part]) * 0.25, -1)
        ref = torch.einsum("hqk,khd->qhd", ref, v[part])
        assert rel(out[part], ref) <= FP32_TOL
        start += n


def test_dense_attention_over_strided_views_equals_padded_attention():
    """Full rows: the dense path views the packed tokens as [B, heads, L, size] (q, k, v strided
    views of one q/k/v matmul output, as the fast path passes them) and gives what per-sample
    attention gives, gradients included; a batch with a short row has no dense layout."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 6, dtype=torch.long)
    tokens = fast.Tokens.of(mask)
    assert tokens.dense_length == 6
    qkv = torch.randn(18, 3 * 32, generator=gen, requires_grad=True)
    grad = torch.randn(18, 2, 16, generator=gen)
    outs = {}
    for kind in ("dense", "padded"):
        q, k, v = (x.view(18, 2, 16) for x in qkv.split(32, dim=1))
        out = fast.attend(q, k, v, tokens.attention_layout(kind), 0.0, 0.25)
        qkv.grad = None
        out.backward(grad)
        outs[kind] = (out.detach(), qkv.grad.clone())
    assert rel(outs["dense"][0], outs["padded"][0]) <= FP32_TOL
    assert rel(outs["dense"][1], outs["padded"][1]) <= FP32_TOL
    mask[1, 5] = 0
    short = fast.Tokens.of(mask)
    assert short.dense_length == 0
    with pytest.raises(ValueError):
        short.attention_layout("dense")


def test_dense_attention_is_chosen_for_full_rows_only_and_computes_the_same(monkeypatch):
    """attention_kind picks dense attention for full batches where it can run (made to run here on
    the CPU, through SDPA), varlen/padded otherwise; the features, loss and LoRA gradients of a full
    batch are those of the plain path, and dense_attention=False keeps it off."""
    model = tiny_model().train()
    no_dropout(model)
    full = make_batch(seed=8, lengths=(9, 9, 9), text_lengths=(5, 5, 5))
    plain = step_outputs(model, full)
    accelerate(model, "fp32")
    kinds = []
    real_kind = fast.attention_kind
    monkeypatch.setattr(fast, "dense_available", lambda device, dtype, head_size: True)
    monkeypatch.setattr(fast, "attention_kind", lambda *a: kinds.append(real_kind(*a)) or kinds[-1])
    assert_close(step_outputs(model, full), plain, FP32_TOL)
    assert kinds == ["dense", "dense"]  # music and text
    kinds.clear()
    step_outputs(model, make_batch(seed=8, lengths=(9, 4, 9), text_lengths=(5, 5, 5)))
    assert kinds == ["padded", "dense"]  # varlen needs CUDA; the texts are still full
    kinds.clear()
    accelerate(model, "fp32", dense_attention=False)
    step_outputs(model, full)
    assert kinds == ["padded", "padded"]


def test_the_first_layers_frozen_input_gets_no_gradient_and_the_lora_ones_are_unchanged():
    """_FrozenPlusLowRank skips the input gradient when its input needs none (the first layer)."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(10, 16, generator=gen)
    low = torch.randn(10, 3, generator=gen, requires_grad=True)
    weight, bias = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    up = torch.randn(24, 3, generator=gen, requires_grad=True)
    grad = torch.randn(10, 24, generator=gen)
    ref = h @ weight.t() + low @ up.t() + bias
    ref_grads = torch.autograd.grad(ref, (low, up), grad)
    for needs in (False, True):
        x = h.clone().requires_grad_(needs)
        out = fast._FrozenPlusLowRank.apply(x, low, weight, up, bias)
        assert rel(out, ref) <= FP32_TOL
        got = torch.autograd.grad(out, (low, up) + ((x,) if needs else ()), grad)
        assert all(rel(a, b) <= FP32_TOL for a, b in zip(got, ref_grads))
        if needs:
            assert rel(got[2], grad @ weight) <= FP32_TOL


def test_bf16_paths_match_fp32():
    """Frozen weights stored in bf16 + bf16 compute vs the plain fp32 path: features and loss within
    1e-2. LoRA gradients: the plain bf16 autocast path itself is 1.0-1.4e-2 off fp32 on this tiny
    random model (bf16 rounding, not the fast path), so the fast path must be within 2e-2 overall
    and within 1.5x of the plain bf16 path's own error."""
    model = tiny_model().eval()
    batch = make_batch(seed=7)
    plain = step_outputs(model, batch)
    plain_bf16 = step_outputs(model, batch, autocast=True)
    for settings in SETTINGS:
        model.fast = None
        accelerate(model, "bf16", **settings)
        fast.store_frozen_weights(model, torch.bfloat16)  # accelerate does this on CUDA only
        out = step_outputs(model, batch, autocast=True)
        assert_close(out, plain, BF16_TOL, grad_tol=1.0)
        error = rel(all_grads(out[3]), all_grads(plain[3]))
        reference = rel(all_grads(plain_bf16[3]), all_grads(plain[3]))
        assert error <= 2e-2 and error <= 1.5 * reference + 1e-3, (error, reference)


def test_bf16_storage_keeps_lora_weights_fp32_and_adapters_standard(tmp_path):
    model = tiny_model()
    lora_before = {k: v.clone() for k, v in model.lora_state_dict().items()}
    converted = fast.store_frozen_weights(model, torch.bfloat16)
    assert converted > 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, name
        elif param.dim() == 2:
            assert param.dtype == torch.bfloat16, name
    accelerate(model, "fp32")
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(model.music_features(batch["patches"], batch["patch_mask"]),
                         model.text_features(batch["text_ids"], batch["text_mask"]))
    loss.backward()
    model.save_adapter(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(lora_before)
    assert all(t.dtype == torch.float32 for t in saved.values())


@pytest.mark.parametrize("shared,ahead", [(True, True), (True, False), (False, True), (False, False)])
def test_lora_dropout_masks_per_layer(monkeypatch, shared, ahead):
    """Shared: one LoRA dropout draw per layer input (for query, key and value together); else one
    per projection. With the masks drawn ahead (keep_masks), the shared draw is row 0 of the layer's
    keep-masks (fast.dropout_keep), else an F.dropout call; a layer with no dropout drawn ahead (all
    its p zero) draws no masks. Hidden/attention dropout are off here, so every draw with p=0.37 is
    LoRA's."""
    model = tiny_model(lora_dropout=0.37).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p != 0.37:
            module.p = 0.0
    accelerate(model, "fp32", shared_lora_dropout=shared, keep_masks=ahead)
    draws, ahead_draws = [], []
    real_dropout, real_keep = torch.nn.functional.dropout, fast.dropout_keep

    def counting(x, p=0.5, training=True, inplace=False):
        if p == 0.37 and training:
            draws.append(tuple(x.shape))
        return real_dropout(x, p, training, inplace)

    def counting_keep(h, layer, seed, lora_p, hidden_p):
        ahead_draws.append((tuple(h.shape), lora_p, hidden_p))
        return real_keep(h, layer, seed, lora_p, hidden_p)

    monkeypatch.setattr(torch.nn.functional, "dropout", counting)
    monkeypatch.setattr(fast, "dropout_keep", counting_keep)
    batch = make_batch()
    model.music_features(batch["patches"], batch["patch_mask"])
    layers = model.config.symbolic_layers
    tokens = int(batch["patch_mask"].sum())
    shape = (tokens, model.config.symbolic_hidden_size)
    assert len(draws) == (0 if shared and ahead else layers * (1 if shared else 3))
    assert all(s == shape for s in draws)
    assert ahead_draws == ([(shape, 0.37, 0.0)] * layers if shared and ahead else [])  # nothing to draw else


def test_training_mode_dropout_is_random_and_eval_is_not():
    model = tiny_model()
    accelerate(model, "fp32")
    batch = make_batch()
    model.train()
    with torch.no_grad():
        a = model.music_features(batch["patches"], batch["patch_mask"])
        b = model.music_features(batch["patches"], batch["patch_mask"])
    assert rel(a, b) > 1e-4
    model.eval()
    with torch.no_grad():
        c = model.music_features(batch["patches"], batch["patch_mask"])
        d = model.music_features(batch["patches"], batch["patch_mask"])
    assert torch.equal(c, d)


def test_accelerate_on_cpu_and_off_switch():
    model = tiny_model()
    state = accelerate(model, "bf16")
    assert state == {"fast_encoder": True, "compile_layers": "none", "bf16_weights": False,
                     "shared_lora_dropout": True, "fp32_residual": False, "patch_kernel": False,
                     "attention": "auto", "dense_attention": False, "keep_masks": True, "text_ahead": True,
                     "cuda_graphs": False}
    assert accelerate(model, "bf16", fast_encoder=False)["fast_encoder"] is False
    assert model.fast is None
    with pytest.raises(Clamp3LoraError, match="attention mode"):
        accelerate(model, "bf16", attention="magic")
    with pytest.raises(Clamp3LoraError, match="unknown speed switch"):
        accelerate(model, "bf16", compile="everything")


def test_accelerate_reports_dense_attention_where_it_runs(monkeypatch):
    from clamp3_lora import speed as model_module
    asked = []

    def available(device, dtype, head_size):
        asked.append((device.type, dtype, head_size))
        return True
    monkeypatch.setattr(model_module, "dense_available", available)
    model = tiny_model()
    assert accelerate(model, "fp16")["dense_attention"] is True
    config = model.symbolic_model.bert.config
    assert asked == [("cpu", torch.float16, config.hidden_size // config.num_attention_heads)]
    assert accelerate(model, "fp16", dense_attention=False)["dense_attention"] is False
    assert accelerate(model, "fp16", fast_encoder=False)["dense_attention"] is False


def test_every_speed_switch_is_one_field_one_flag_and_reaches_the_speed_paths():
    """SpeedConfig's fields are the flags of the help's speed group, under the same names, and
    accelerate reads them from a SpeedConfig; --plain turns every switch off (explicit flags win)."""
    import dataclasses

    from clamp3_lora.cli import build_parser, parse_config
    from clamp3_lora.config import SpeedConfig
    parser = build_parser("test")
    group = next(g for g in parser._action_groups if g.title == "speed switches")
    flags = {action.dest for action in group._group_actions}
    assert flags == {f.name for f in dataclasses.fields(SpeedConfig)}
    for field in dataclasses.fields(SpeedConfig):
        if field.type in (bool, "bool"):
            flipped = not field.default
            flag = f"--{'' if flipped else 'no-'}{field.name.replace('_', '-')}"
            assert getattr(parse_config([flag]).speed, field.name) is flipped
    plain = parse_config(["--plain"]).speed
    assert not any(getattr(plain, f.name) for f in dataclasses.fields(SpeedConfig) if f.type in (bool, "bool"))
    assert parse_config(["--plain", "--cuda-graphs"]).speed.cuda_graphs is True
    model = tiny_model()
    assert accelerate(model, "fp32", plain)["fast_encoder"] is False and model.fast is None
    state = accelerate(model, "fp32", SpeedConfig(shared_lora_dropout=False, keep_masks=False))
    assert model.fast.speed.shared_lora_dropout is False and state["keep_masks"] is False
