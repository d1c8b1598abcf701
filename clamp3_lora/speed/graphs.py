"""CUDA graphs of the training step's encoders: the step's thousands of kernel launches replayed at once.

At batch 32 the fast encoders are host bound: the GPU waits on Python and kernel launches for a
third of the step (BENCHMARKS.md). A CUDA graph records the launches of one forward (and backward)
pass once and replays them with one call. A graph has fixed shapes, so each batch is laid out in a
fixed-shape form first ("flat"):

- its real tokens, packed as the fast path does, padded with dummy tokens up to a bucket size
  (`bucket_size`: 8 sizes per doubling, so at most 12.5% extra tokens and few distinct shapes);
- the dummy tokens form extra samples of at most `bound` tokens each (zero-length ones where fewer
  are needed), so attention never mixes them with a real sample and varlen flash attention keeps
  a fixed maximum length;
- the mean over each real sample's tokens and the projection are computed inside the graph; the
  dummy samples' outputs go nowhere.

`music_flat` / `text_flat` compute the same features as Clamp3.music_features / text_features (the
tests compare them on the CPU, where they run eagerly). `EncoderGraphs` captures them on CUDA, one
graph per (batch size, bucket), all in one memory pool, and replays them in training steps: the
music side as an autograd function whose backward replays the captured backward pass (gradients
of the LoRA weights), the frozen text side forward only. Capturing runs the pass once eagerly
first (compilation, lazy initialisation) and restores the CUDA random state afterwards, so a run
resumed from a checkpoint draws the same dropout masks as an uninterrupted one. Dropout inside a
graph draws fresh masks at every replay (the generator's offset advances per replay).

The graphs share one memory pool and, captured on torch's one capture stream, one cuBLAS workspace:
they must replay one after another on one stream (two at once on two streams overwrite each other's
memory; BENCHMARKS.md, run 18).
"""
import torch
import torch.nn.functional as F

from .fast import Tokens, compute_dtype, embed_patches, embeddings, encode, encoder_parts, xlmr_positions

STEPS_PER_DOUBLING = 8


def bucket_size(n):
    """n rounded up to the next size m * 2**k with m in 8..15 (at most 12.5% more; 8 sizes per doubling)."""
    if n <= 2 * STEPS_PER_DOUBLING:
        return max(n, 1)
    step = 1 << (n.bit_length() - 4)  # n has 4 leading bits at this granularity
    return -(-n // step) * step


def flat_layout(cu, index, width, size, bound):
    """The fixed-shape layout of `size` token slots holding a batch's T real tokens first.

    cu [B + 1] int32 and index [T] (flat positions row * width + column) as fast.packing gives them.
    Returns (tokens, row): tokens (fast.Tokens) describe B real samples followed by ceil(size /
    bound) dummy samples of at most `bound` tokens that hold the slots T..size-1 (zero-length where
    fewer are needed); tokens.column is each real token's column in its padded row (its position)
    and each dummy token's place in its dummy sample; row [size] is the real sample of each slot,
    B for the dummy slots. No host sync.
    """
    batch = cu.shape[0] - 1
    total = index.shape[0]
    extra = -(-size // bound)
    ends = torch.clamp(cu[-1:].long() + bound * torch.arange(1, extra + 1, device=cu.device), max=size)
    seg_cu = torch.cat([cu.long(), ends])
    slots = torch.arange(size, device=cu.device)
    segment = torch.searchsorted(seg_cu[1:], slots, right=True)
    rank = slots - seg_cu[segment]
    column = torch.cat([index % width, rank[total:]])
    tokens = Tokens(index=segment * bound + rank, column=column, cu=seg_cu.to(torch.int32),
                    batch=seg_cu.shape[0] - 1, width=bound, dense_length=dense_length(total, batch, width, size))
    return tokens, segment.clamp(max=batch)


def dense_length(total, batch, width, size):
    """The row length when a batch of `total` real tokens in `batch` rows of `width` has every row
    full and fills all `size` slots (no dummy tokens), so its tokens view as [batch, width]; else 0."""
    return width if total == batch * width == size else 0


def _pool_and_project(h, row, counts, proj, proj_dtype):
    """Mean of each real sample's tokens (h [size, hidden], row [size]; the dummy row dropped), then
    the projection computed in proj_dtype (what autocast does for the plain path's Linear)."""
    batch = counts.shape[0]
    sums = h.float().new_zeros(batch + 1, h.shape[1]).index_add_(0, row, h.float())
    pooled = sums[:batch] / counts.unsqueeze(1)
    bias = None if proj.bias is None else proj.bias.to(proj_dtype)
    return F.linear(pooled.to(proj_dtype), proj.weight.to(proj_dtype), bias)


def music_inputs(model, patches, patch_mask, packed, size):
    """The fixed-shape inputs of music_flat for a batch: (flat patches [size, P], positions [size],
    cu, slot index [size], row [size], counts [B]); `packed` = (index, cu) of patch_mask."""
    index, cu = packed
    batch, width = patch_mask.shape
    bound = model.config.symbolic_max_positions
    tokens, row = flat_layout(cu, index, width, size, bound)
    flat = patches.reshape(-1, patches.shape[-1]).index_select(0, index)
    flat = F.pad(flat, (0, 0, 0, size - index.shape[0]))
    counts = (cu[1:] - cu[:-1]).float().clamp(min=1)
    return flat, tokens.column, tokens.cu, tokens.index, row, counts


def music_flat(model, flat, positions, cu, slot_index, row, counts, cd, proj_dtype, weights=None, dense=0):
    """Music features [B, projection] from music_inputs(...): the fast path over the fixed-shape layout
    (the same function as Clamp3.music_features with the fast encoder). `weights` {parameter: tensor}
    replaces layer parameters by other tensors (the graphs use views of the LoRA weights); `dense`:
    the batch's dense_length (rows all full, no dummy tokens; see flat_layout), else 0."""
    encoder = model.symbolic_model
    bert = encoder.bert
    tokens = Tokens(index=slot_index, column=positions, cu=cu, batch=cu.shape[0] - 1,
                    width=model.config.symbolic_max_positions, dense_length=dense)
    parts = encoder_parts(bert)
    if weights:
        parts = _substitute(parts, {id(p): t for p, t in weights.items()})
    with torch.autocast(flat.device.type, enabled=False):
        x = embed_patches(encoder, flat, model.fast)
        h = embeddings(bert, x, positions, model.fast, cd)
        h = encode(bert, h, tokens, model.fast, cd, parts)
        return _pool_and_project(h, row, counts, model.symbolic_proj, proj_dtype)


def _substitute(parts, by_id):
    """The nested tuples of parts with each tensor found in by_id (keyed by id) replaced."""
    if isinstance(parts, (tuple, list)):
        return type(parts)(_substitute(x, by_id) for x in parts)
    if isinstance(parts, torch.Tensor):
        return by_id.get(id(parts), parts)
    return parts


def text_bound(model):
    """The longest text the position table allows (XLM-R positions start after the pad id)."""
    return model.config.text_max_positions - model.text_model.embeddings.padding_idx - 1


def text_inputs(model, input_ids, attention_mask, packed, size):
    """The fixed-shape inputs of text_flat: (token ids [size], positions [size], cu, slot index,
    row, counts), positions as XLM-R counts them (from the pad id on)."""
    index, cu = packed
    batch, width = attention_mask.shape
    pad_id = model.text_model.embeddings.padding_idx
    tokens, row = flat_layout(cu, index, width, size, text_bound(model))
    positions = xlmr_positions(input_ids, pad_id)
    real = index.shape[0]
    ids = F.pad(input_ids.reshape(-1).index_select(0, index), (0, size - real), value=pad_id)
    positions = torch.cat([positions.reshape(-1).index_select(0, index), tokens.column[real:] + pad_id + 1])
    counts = (cu[1:] - cu[:-1]).float().clamp(min=1)
    return ids, positions, tokens.cu, tokens.index, row, counts


def text_flat(model, ids, positions, cu, slot_index, row, counts, cd, proj_dtype, dense=0):
    """Text features [B, projection] from text_inputs(...) (as Clamp3.text_features, frozen text side;
    `dense` as in music_flat)."""
    text = model.text_model
    tokens = Tokens(index=slot_index, column=positions, cu=cu, batch=cu.shape[0] - 1, width=text_bound(model),
                    dense_length=dense)
    with torch.autocast(ids.device.type, enabled=False):
        x = text.embeddings.word_embeddings.weight.index_select(0, ids)
        h = embeddings(text, x, positions, model.fast, cd)
        h = encode(text, h, tokens, model.fast, cd)
        return _pool_and_project(h, row, counts, model.text_proj, proj_dtype)


class _Captured:
    """One captured pass: static inputs, the forward graph and its output, and (music) the backward
    graph with its gradient-of-output input and the LoRA gradients it writes."""

    def __init__(self, inputs, forward, output, backward=None, grad_output=None, grads=None):
        self.inputs, self.forward, self.output = inputs, forward, output
        self.backward, self.grad_output, self.grads = backward, grad_output, grads


class _Replay(torch.autograd.Function):
    """The captured music pass as one autograd node: forward replays the forward graph, backward the
    backward graph. The outputs are copied out of the graph's static buffers (the next replay
    overwrites them; gradient accumulation adds the copies): the LoRA gradients in one copy, each
    parameter's gradient a view of it."""

    @staticmethod
    def forward(ctx, captured, *params):
        captured.forward.replay()
        ctx.captured = captured
        return captured.output.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        captured = ctx.captured
        captured.grad_output.copy_(grad)
        captured.backward.replay()
        grads = captured.grads
        if len({(g.dtype, g.device) for g in grads}) != 1:
            return (None,) + tuple(g.clone() for g in grads)
        # One copy of all the LoRA gradients out of the static buffers (one kernel instead of one
        # per tensor); each parameter gets a view of it.
        flat = torch.cat([g.reshape(-1) for g in grads])
        return (None,) + tuple(part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads))


class EncoderGraphs:
    """Captured training passes of one model (Clamp3.graphs after prepare_for_training on CUDA).

    music(...) / text(...) return the features of a batch by replaying the graph of its (batch
    size, bucket) shape, capturing it on first use. Graphs are dropped (and captured again) when the
    adapter, its dropout, the encoder dropout or the LoRA weight tensors change.
    """

    def __init__(self, model):
        self.model = model
        self.pool = None  # the memory pool all graphs share, made at the first capture
        self.graphs = {}
        self.signature = None
        self.all_params = None  # ((encoder parts, symbolic_proj), every music-side parameter); see _params
        self.laid_out = None  # (patches, music_inputs(...)) of the next batch; see lay_out_music
        self.captures = 0

    def _check_signature(self, params):
        """Drop the graphs when the layers' tensors were gathered anew (fast.encoder_parts rebuilds
        them when the adapter or a dropout changes; held here, so an identity check is safe) or a
        LoRA weight (`params`, from _params) is another tensor."""
        model = self.model
        parts = (encoder_parts(model.symbolic_model.bert), encoder_parts(model.text_model))
        pointers = tuple(p.data_ptr() for p in params)
        if self.signature is None or any(a is not b for a, b in zip(parts, self.signature[0])) \
                or pointers != self.signature[1]:
            self.graphs.clear()
            self.signature = (parts, pointers)

    def _params(self):
        """The music side's parameters that require grad (the LoRA weights). Walking the modules
        takes ~1 ms of Python for the full-size model, and this runs while the GPU waits for the
        step's first launch, so the list of all parameters is kept while the symbolic encoder's
        parts (fast.encoder_parts, rebuilt when an adapter or a dropout changes) and the
        projection module stay the same objects; only the requires_grad filter runs at every step."""
        model = self.model
        key = (encoder_parts(model.symbolic_model.bert), model.symbolic_proj)
        if self.all_params is None or any(a is not b for a, b in zip(key, self.all_params[0])):
            self.all_params = (key, [p for module in (model.symbolic_model, model.symbolic_proj)
                                     for p in module.parameters()])
        return [p for p in self.all_params[1] if p.requires_grad]

    def music(self, patches, patch_mask, packed):
        """Music features with grad (an autograd node replaying the captured backward)."""
        model = self.model
        cd = compute_dtype("cuda", model.symbolic_model.bert.encoder.layer[0].intermediate.dense.weight)
        pd = compute_dtype("cuda", model.symbolic_proj.weight)
        size = bucket_size(packed[0].shape[0])
        dense = dense_length(packed[0].shape[0], *patch_mask.shape, size)
        laid_out, self.laid_out = self.laid_out, None
        if laid_out is not None and laid_out[0] is patches:
            inputs = laid_out[1]
        else:
            inputs = music_inputs(model, patches, patch_mask, packed, size)
        params = self._params()
        captured = self._graph(("music", patch_mask.shape[0], size, dense, cd, pd), inputs, params,
                               lambda *args, weights: music_flat(model, *args, cd, pd, weights, dense))
        return _Replay.apply(captured, *params)

    def lay_out_music(self, patches, patch_mask, packed):
        """Queue the fixed-shape layout of a batch's music inputs now, for its music() call later
        (kept for the batch whose `patches` tensor that call gets): its dozen small launches then
        happen while the host waits on the previous step, not while the GPU waits for this one."""
        self.laid_out = (patches, music_inputs(self.model, patches, patch_mask, packed,
                                               bucket_size(packed[0].shape[0])))

    def text(self, input_ids, attention_mask, packed):
        """Text features without grad (the frozen text side)."""
        model = self.model
        cd = compute_dtype("cuda", model.text_model.encoder.layer[0].intermediate.dense.weight)
        pd = compute_dtype("cuda", model.text_proj.weight)
        size = bucket_size(packed[0].shape[0])
        dense = dense_length(packed[0].shape[0], *attention_mask.shape, size)
        inputs = text_inputs(model, input_ids, attention_mask, packed, size)
        captured = self._graph(("text", attention_mask.shape[0], size, dense, cd, pd), inputs, None,
                               lambda *args: text_flat(model, *args, cd, pd, dense))
        captured.forward.replay()
        return captured.output.clone()

    def _graph(self, key, inputs, params, fn):
        """The graph of `key` (captured now if it is new), its static inputs set to `inputs`;
        `params`: the LoRA weights the captured backward differentiates (None: forward only)."""
        self._check_signature(self._params() if params is None else params)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(fn, inputs, params)
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        return captured

    def _capture(self, fn, inputs, params):
        """Run fn once eagerly (on a side stream), then capture its forward and, with params (the
        LoRA weights), its backward; the CUDA random state is left as it was.

        With params, fn(*inputs, weights=...) computes with views of the weights made inside each pass,
        and the backward is taken with respect to those views: the autograd graph then lies wholly
        on the capturing stream, and the weights' own gradient hooks (DistributedDataParallel's)
        fire only at replay, in _Replay's backward, never while capturing.
        """
        device = inputs[0].device
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        rng = torch.cuda.get_rng_state(device)
        static = [x.clone() for x in inputs]
        try:
            with torch.autocast("cuda", enabled=False), torch.set_grad_enabled(params is not None):
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    output, views = self._forward(fn, static, params)
                    if views is not None:
                        torch.autograd.grad(output, views, torch.ones_like(output))
                    output = views = None
                torch.cuda.current_stream(device).wait_stream(side)
                forward = torch.cuda.CUDAGraph()
                with torch.cuda.graph(forward, pool=self.pool, capture_error_mode="thread_local"):
                    output, views = self._forward(fn, static, params)
                captured = _Captured(static, forward, output)
                if views is not None:
                    captured.grad_output = torch.empty_like(output)
                    captured.backward = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(captured.backward, pool=self.pool, capture_error_mode="thread_local"):
                        captured.grads = torch.autograd.grad(output, views, captured.grad_output)
                    captured.output = output.detach()
        finally:
            torch.cuda.set_rng_state(rng, device)
        self.captures += 1
        return captured

    @staticmethod
    def _forward(fn, inputs, params):
        """(output, views of params or None): one pass of fn, made in the current stream."""
        if params is None:
            return fn(*inputs), None
        views = {p: p.view_as(p) for p in params}
        return fn(*inputs, weights=views), list(views.values())


__all__ = ["bucket_size", "flat_layout", "dense_length", "music_inputs", "music_flat", "text_inputs", "text_flat",
           "EncoderGraphs", "STEPS_PER_DOUBLING"]
