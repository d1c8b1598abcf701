"""The fixed-shape layout that CUDA graphs replay computes the same features and LoRA gradients as
the fast path (issue 5). The capture itself needs CUDA: bench/train_step.py checks it on the GPU
(features, loss and gradients against the plain fp32 path, fresh dropout masks per replay, the same
masks again after the random state is restored)."""
import pytest
import torch

from clamp3_lora.speed import accelerate, fast, graphs
from clamp3_lora.data import add_packing
from clamp3_lora.model import clip_loss
from test_fast_paths import FP32_TOL, make_batch, no_dropout, rel, step_outputs, tiny_model


def test_bucket_sizes_are_few_and_waste_at_most_an_eighth():
    sizes = [graphs.bucket_size(n) for n in range(1, 70000)]
    assert all(s >= n for n, s in zip(range(1, 70000), sizes))
    assert all(s <= n * 1.125 for n, s in zip(range(17, 70000), sizes[16:]))
    assert sizes == sorted(sizes)
    assert len(set(s for s in sizes if 4096 < s <= 8192)) == graphs.STEPS_PER_DOUBLING
    for full in (512, 16 * 512, 24 * 512, 32 * 512, 128 * 512):  # full-length batches need no dummy tokens
        assert graphs.bucket_size(full) == full


def test_flat_layout_keeps_the_real_samples_and_splits_the_dummy_tokens():
    lengths = (5, 1, 7, 8, 3)   # the bound (8) is at least every sample's length, as in use
    batch = add_packing(make_batch(lengths=lengths))
    index, cu = batch["patch_index"], batch["patch_cu"]
    width, real = batch["patch_mask"].shape[1], index.shape[0]
    size, bound = real + 2 * 8 + 5, 8   # three dummy samples of 8, 8 and 5 tokens
    tokens, row = graphs.flat_layout(cu, index, width, size, bound)
    sizes = (tokens.cu[1:] - tokens.cu[:-1]).tolist()
    assert tokens.cu[:6].tolist() == cu.tolist()
    assert sizes[5:] == [8, 8, 5] + [0] * (len(sizes) - 8) and tokens.cu[-1] == size
    assert tokens.batch == len(sizes) and len(sizes) == 5 + -(-size // bound)
    assert row[:real].tolist() == [b for b, n in enumerate(lengths) for _ in range(n)]
    assert set(row[real:].tolist()) == {5}
    assert tokens.column[:real].tolist() == (index % width).tolist()
    assert tokens.column[real:].tolist() == list(range(8)) * 2 + list(range(5))
    segment, rank = tokens.index // bound, tokens.index % bound
    assert (rank == torch.arange(size) - tokens.cu.long()[segment]).all()


def test_flat_layout_marks_full_batches_dense_only_without_dummy_tokens():
    assert graphs.dense_length(24, 3, 8, 24) == 8
    assert graphs.dense_length(24, 3, 8, 28) == 0   # dummy tokens after the real ones
    assert graphs.dense_length(23, 3, 8, 23) == 0   # a row not full
    batch = add_packing(make_batch(lengths=(8, 8, 8)))
    tokens, _ = graphs.flat_layout(batch["patch_cu"], batch["patch_index"], 8, 24, 8)
    assert tokens.dense_length == 8


def flat_outputs(model, batch, size=None, dense=0):
    """(music, text, loss, grads) through music_flat/text_flat with `size` slots (default: the bucket);
    `dense`: the music side's dense_length."""
    model.zero_grad(set_to_none=True)
    music_size = size or graphs.bucket_size(batch["patch_index"].shape[0])
    text_size = size or graphs.bucket_size(batch["text_index"].shape[0])
    cd = pd = torch.float32
    music_in = graphs.music_inputs(model, batch["patches"], batch["patch_mask"],
                                   (batch["patch_index"], batch["patch_cu"]), music_size)
    text_in = graphs.text_inputs(model, batch["text_ids"], batch["text_mask"],
                                 (batch["text_index"], batch["text_cu"]), text_size)
    music = graphs.music_flat(model, *music_in, cd, pd, dense=dense)
    with torch.no_grad():
        text = graphs.text_flat(model, *text_in, cd, pd)
    loss = clip_loss(music, text)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return music.detach(), text, loss.detach(), grads


@pytest.mark.parametrize("extra", [None, 0, 700], ids=["bucket", "no-dummy", "several-dummy-samples"])
@pytest.mark.parametrize("hole", [False, True], ids=["prefix-masks", "masked-patch-inside"])
def test_fixed_shape_layout_equals_the_fast_path_in_fp32(extra, hole):
    model = tiny_model()
    no_dropout(model)
    model.train()
    model.text_model.eval()
    batch = add_packing(make_batch(lengths=(23, 1, 7, 16, 3, 40, 2), hole=hole))
    accelerate(model, "fp32")
    reference = step_outputs(model, batch)
    size = None if extra is None else max(batch["patch_index"].shape[0], batch["text_index"].shape[0]) + extra
    music, text, loss, grads = flat_outputs(model, batch, size)
    assert rel(music, reference[0]) <= FP32_TOL
    assert rel(text, reference[1]) <= FP32_TOL
    assert rel(loss, reference[2]) <= FP32_TOL
    assert set(grads) == set(reference[3])
    assert max(rel(grads[name], reference[3][name]) for name in grads) <= FP32_TOL


def test_fixed_shape_layout_of_a_full_batch_with_dense_attention_equals_the_fast_path(monkeypatch):
    model = tiny_model()
    no_dropout(model)
    model.train()
    model.text_model.eval()
    batch = add_packing(make_batch(lengths=(16, 16, 16, 16)))
    accelerate(model, "fp32")
    reference = step_outputs(model, batch)
    kinds = []
    real_kind = fast.attention_kind
    monkeypatch.setattr(fast, "dense_available", lambda device, dtype, head_size: True)
    monkeypatch.setattr(fast, "attention_kind", lambda *a: kinds.append(real_kind(*a)) or kinds[-1])
    music, text, loss, grads = flat_outputs(model, batch, size=64, dense=16)
    assert kinds[0] == "dense"
    assert rel(music, reference[0]) <= FP32_TOL and rel(loss, reference[2]) <= FP32_TOL
    assert max(rel(grads[name], reference[3][name]) for name in grads) <= FP32_TOL


def test_cuda_graphs_stay_off_on_the_cpu_and_can_be_switched_off():
    model = tiny_model()
    assert accelerate(model, "fp32")["cuda_graphs"] is False and model.graphs is None
    assert accelerate(model, "fp32", cuda_graphs=False)["cuda_graphs"] is False


def test_the_captured_backward_reaches_views_of_the_lora_weights_not_their_gradient_hooks():
    """What EncoderGraphs captures: gradients with respect to views of the LoRA weights equal the
    weights' gradients, and the weights' gradient hooks (DistributedDataParallel's) do not fire."""
    model = tiny_model()
    no_dropout(model)
    model.train()
    accelerate(model, "fp32")
    batch = add_packing(make_batch(lengths=(23, 1, 7, 16)))
    params = [p for p in model.symbolic_model.parameters() if p.requires_grad]
    fired = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    inputs = graphs.music_inputs(model, batch["patches"], batch["patch_mask"],
                                 (batch["patch_index"], batch["patch_cu"]), 64)
    views = {p: p.view_as(p) for p in params}
    out = graphs.music_flat(model, *inputs, torch.float32, torch.float32, views)
    grad_out = torch.randn_like(out)
    by_views = torch.autograd.grad(out, list(views.values()), grad_out)
    assert fired == []
    graphs.music_flat(model, *inputs, torch.float32, torch.float32).backward(grad_out)
    assert len(fired) == len(params)
    for p, g in zip(params, by_views):
        assert rel(g, p.grad) <= FP32_TOL and g.abs().sum() > 0


class _Rerun:
    """Stands in for a CUDA graph on the CPU: replay() runs the recorded function again."""

    def __init__(self, run):
        self.replay = run


class EagerGraphs(graphs.EncoderGraphs):
    """EncoderGraphs whose 'capture' records the pass as a function rerun at each replay (the CPU
    has no CUDA graphs): everything else -- shapes, keys, static inputs, the autograd node, the
    copies out of the static buffers -- is the real code."""

    def _capture(self, fn, inputs, params):
        captured = graphs._Captured([x.clone() for x in inputs], None, None)
        saved = {}

        def forward():
            with torch.set_grad_enabled(params is not None):
                output, views = self._forward(fn, captured.inputs, params)
            saved.update(output=output, views=views)
            if captured.output is None:
                captured.output = output.detach().clone()
                captured.grad_output = torch.empty_like(output)
            captured.output.copy_(output.detach())

        def backward():
            grads = torch.autograd.grad(saved["output"], saved["views"], captured.grad_output)
            if captured.grads is None:
                captured.grads = [torch.empty_like(g) for g in grads]
            for static, g in zip(captured.grads, grads):
                static.copy_(g)

        captured.forward, captured.backward = _Rerun(forward), _Rerun(backward)
        self.captures += 1
        return captured


def test_graph_replays_give_the_fast_path_features_and_accumulate_gradients_correctly():
    """Two batches of one shape and one of another through EncoderGraphs (replays standing in for
    CUDA graphs): features and LoRA gradients equal the fast path's, gradients of two micro-steps
    add up, the features of a replay survive the next replay (copied out of the static buffers),
    one capture per shape and encoder, and a new adapter tensor or dropout drops the captured graphs."""
    model = tiny_model()
    no_dropout(model)
    model.train()
    model.text_model.eval()
    accelerate(model, "fp32")
    first = add_packing(make_batch(seed=1, lengths=(23, 1, 7, 16)))
    second = add_packing(make_batch(seed=2, lengths=(20, 3, 9, 15)))   # the same bucket as `first`
    other = add_packing(make_batch(seed=3, lengths=(40, 30, 2, 9)))

    def losses(batches, via_graphs):
        model.graphs = EagerGraphs(model) if via_graphs else None
        model.zero_grad(set_to_none=True)
        features = []
        for batch in batches:
            music = model.music_features(batch["patches"], batch["patch_mask"],
                                         (batch["patch_index"], batch["patch_cu"]) if via_graphs else None)
            with torch.no_grad():
                text = model.text_features(batch["text_ids"], batch["text_mask"],
                                           (batch["text_index"], batch["text_cu"]) if via_graphs else None)
            clip_loss(music, text).backward()
            features.append((music.detach(), text))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if via_graphs:   # copied out of the graph's buffers at once: the gradients share one storage
            assert len({p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad}) == 1
        return features, grads, model.graphs

    batches = [first, second, other]
    plain_features, plain_grads, _ = losses(batches, via_graphs=False)
    graph_features, graph_grads, replayed = losses(batches, via_graphs=True)
    for (music, text), (p_music, p_text) in zip(graph_features, plain_features):
        assert rel(music, p_music) <= FP32_TOL and rel(text, p_text) <= FP32_TOL
    assert max(rel(graph_grads[n], plain_grads[n]) for n in plain_grads) <= FP32_TOL
    assert replayed.captures == 3 and len(replayed.graphs) == 3   # music: two shapes; text: one (same lengths)
    lora = next(p for p in model.parameters() if p.requires_grad)
    lora.data = lora.data.clone()                                     # another tensor: graphs dropped
    model.music_features(first["patches"], first["patch_mask"], (first["patch_index"], first["patch_cu"]))
    assert replayed.captures == 4 and len(replayed.graphs) == 1
    model.symbolic_model.bert.encoder.layer[0].output.dropout.p = 0.5  # another dropout: dropped too
    model.music_features(first["patches"], first["patch_mask"], (first["patch_index"], first["patch_cu"]))
    assert replayed.captures == 5 and len(replayed.graphs) == 1


def test_the_list_of_trainable_weights_is_kept_between_steps_and_follows_changes():
    """EncoderGraphs._params walks the modules once (it runs before every step's first launch), yet
    gives what a fresh walk gives after requires_grad or the encoder's parts change."""
    model = tiny_model()
    accelerate(model, "fp32")
    kept = graphs.EncoderGraphs(model)

    def same_as_a_fresh_walk():
        fresh = [p for m in (model.symbolic_model, model.symbolic_proj) for p in m.parameters() if p.requires_grad]
        got = kept._params()
        return len(got) == len(fresh) and all(a is b for a, b in zip(got, fresh))

    assert same_as_a_fresh_walk() and len(kept._params()) == len(model.trainable_parameters())
    walked = kept.all_params
    assert same_as_a_fresh_walk() and kept.all_params is walked            # not walked again
    model.symbolic_proj.weight.requires_grad_(True)                           # unfrozen: listed at once
    assert same_as_a_fresh_walk() and any(p is model.symbolic_proj.weight for p in kept._params())
    model.symbolic_model.bert.encoder.layer[0].output.dropout.p = 0.5        # parts rebuilt: walked again
    assert same_as_a_fresh_walk() and kept.all_params is not walked
    walked = kept.all_params
    model.symbolic_proj = torch.nn.Linear(*model.symbolic_proj.weight.shape[::-1])  # another module
    assert same_as_a_fresh_walk() and kept.all_params is not walked


def test_music_inputs_laid_out_ahead_are_used_by_their_own_batch_only(monkeypatch):
    """step.text_ahead queues the layout of the next batch's music inputs (Clamp3.lay_out_music_ahead);
    the music pass of that batch starts from it (no second layout), gives the same features and
    gradients, and a layout made for another batch is never used."""
    from clamp3_lora.step import text_ahead

    model = tiny_model()
    no_dropout(model)
    model.train()
    model.text_model.eval()
    accelerate(model, "fp32")
    model.graphs = EagerGraphs(model)
    first = add_packing(make_batch(seed=1, lengths=(23, 1, 7, 16)))
    other = add_packing(make_batch(seed=2, lengths=(20, 3, 9, 15)))   # the same shape and bucket
    layouts = []
    real_music_inputs = graphs.music_inputs
    monkeypatch.setattr(graphs, "music_inputs", lambda *a: layouts.append(a[1]) or real_music_inputs(*a))

    def music_and_grads(batch):
        model.zero_grad(set_to_none=True)
        music = model.music_features(batch["patches"], batch["patch_mask"], (batch["patch_index"], batch["patch_cu"]))
        music.square().sum().backward()
        return music.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = music_and_grads(first)
    assert len(layouts) == 1
    device_batch, _ = text_ahead(model, first, torch.device("cpu"), "fp32")
    assert len(layouts) == 2 and layouts[-1] is device_batch["patches"]
    music, grads = music_and_grads(device_batch)
    assert len(layouts) == 2 and model.graphs.laid_out is None          # the layout ahead was used
    assert rel(music, reference[0]) <= FP32_TOL
    assert max(rel(grads[n], reference[1][n]) for n in grads) <= FP32_TOL
    model.lay_out_music_ahead(first["patches"], first["patch_mask"], (first["patch_index"], first["patch_cu"]))
    music, _ = music_and_grads(other)                                    # laid out for `first`: not used
    assert len(layouts) == 4 and layouts[-1] is other["patches"]
    assert rel(music, music_and_grads(other)[0]) <= FP32_TOL and rel(music, reference[0]) > 1e-3
