"""Fast paths of the encoders: the same function as the transformers modules, computed faster.

`speed.accelerate(model, ...)` switches them on (model.fast = FastPaths); `Clamp3.text_features`
and `music_features` then call its `text_hidden` / `music_hidden` instead of the transformers forward. The weights stay
the transformers/peft parameters (adapters keep peft's standard format); only the computation
differs:

- Unpadded tokens ("packing"): the padded batch [B, L] is cut down to its T real tokens [T, hidden]
  once, every layer works on those only, and attention runs per sample over the packed tokens
  (flash attention's variable-length kernel on CUDA, i.e. block-diagonal attention: each piece
  sees only itself). Nothing is computed on padding, however mixed the lengths are.
- Fused layers: a layer is one plain function (`layer_forward`: the query/key/value projections
  as one matmul, LoRA, attention, residuals, LayerNorm, GELU, dropout). With compile="layer" it is
  one torch.compile graph reused by all layers (weights are inputs); attention sits in it as the
  aten flash-attention call, which inductor runs as an opaque kernel (it cannot rewrite it into
  the slow unfused attention seen when SDPA was compiled).
- Shared LoRA dropout: one dropout mask of a layer's input feeds the LoRA of query, key and value
  (one [T, hidden] x [hidden, 3r] matmul) instead of three masks; each projection's LoRA still sees
  its input dropped with probability p, as in peft.
- Explicit compute dtype: the fast path runs with autocast off, in the autocast dtype of the caller
  (bf16/fp16 matmuls, LayerNorm in fp32, the residual stream in the compute dtype unless fp32_residual=True),
  so frozen weights stored in bf16 are used as they are, without per-step casts.

Measured on an H100 in BENCHMARKS.md (bench/train_step.py).

Semantics kept (tests/test_fast_paths.py compares with the transformers path): BERT/XLM-R post-LN
layers with exact (erf) GELU, hidden and attention-probability dropout in training mode, absolute
positions (the column of a patch in its padded row; XLM-R's positions counted from the pad id),
token type 0, masked mean over the real tokens.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import SpeedConfig
from ..errors import Clamp3LoraError
from . import kernels
from .packing import packing

ATTENTION_MODES = ("auto", "varlen", "padded")


@dataclass(frozen=True)
class FastPaths:
    """The fast encoder paths a model runs (Clamp3.fast, set by speed.accelerate): the SpeedConfig
    switches, and torch.compile's mode resolved for the device ("layer": each whole layer one graph,
    attention in it as the aten flash kernel, an opaque call inductor cannot rewrite; "none": eager,
    always on the CPU). The model calls text_hidden / music_hidden."""

    speed: SpeedConfig
    compile: str = "none"

    def residual_dtype(self, cd):
        """The residual stream's dtype: fp32 with speed.fp32_residual, else the compute dtype."""
        return torch.float32 if self.speed.fp32_residual else cd

    def text_hidden(self, text_model, input_ids, attention_mask, packed=None):
        return text_hidden(text_model, input_ids, attention_mask, self, packed)

    def music_hidden(self, encoder, patches, patch_mask, packed=None):
        return music_hidden(encoder, patches, patch_mask, self, packed)


# --------------------------------------------------------------------------------------------
# Packed tokens


@dataclass
class Tokens:
    """The real tokens of a padded batch: where they are and how they split into samples."""
    index: torch.Tensor      # [T] flat positions (row * width + column) of the real tokens, row-major
    column: torch.Tensor     # [T] column of each token in its padded row
    cu: torch.Tensor         # [B + 1] int32 cumulative token counts (sample b is cu[b]:cu[b+1])
    batch: int
    width: int               # padded row width L (an upper bound of every sample's length)
    dense_length: int = 0    # L' when the first T / L' samples have exactly L' tokens each and fill
    #                          index in row-major order (the tokens view as [T / L', L']), else 0

    @classmethod
    def of(cls, mask, packed=None):
        """Tokens of a [B, L] mask (nonzero = real token).

        `packed` is (index, cu) of the same mask as `packing` computes it, already on the mask's
        device (the collate function computes it on the CPU, in the DataLoader workers); without it
        they are computed here, which costs a host sync on CUDA (the token count).
        """
        batch, width = mask.shape
        index, cu = packing(mask) if packed is None else packed
        full = index.shape[0] == batch * width  # every row full (a host-side shape: no sync)
        return cls(index=index, column=index % width, cu=cu, batch=batch, width=width,
                   dense_length=width if full else 0)

    def pad(self, x):
        """[T, ...] -> [B, L, ...] with zeros at the padding."""
        out = x.new_zeros((self.batch * self.width,) + tuple(x.shape[1:])).index_copy(0, self.index, x)
        return out.view((self.batch, self.width) + tuple(x.shape[1:]))

    def attention_layout(self, kind):
        """What attention of `kind` needs, as tensors (compiled code sees every size as a tensor
        dimension): "varlen": (cu, an empty [L] tensor whose length bounds every sample, None, None);
        "dense": (None, an empty [dense_length] tensor, None, None); "padded": also the slot of each
        token in a [B, L] layout and the [B, 1, 1, L] key mask."""
        if kind == "dense":
            if not self.dense_length:
                raise ValueError("dense attention needs a batch whose rows are all full")
            return (None, torch.empty(self.dense_length, device=self.cu.device, dtype=torch.int8), None, None)
        bound = torch.empty(self.width, device=self.cu.device, dtype=torch.int8)
        if kind == "varlen":
            return (self.cu, bound, None, None)
        row = self.index // self.width
        rank = torch.arange(row.shape[0], device=row.device) - self.cu.long()[row]  # place in its sample
        slot = row * self.width + rank
        keys = torch.zeros(self.batch * self.width, dtype=torch.bool, device=row.device).index_fill(0, slot, True)
        return (self.cu, bound, slot, keys.view(self.batch, 1, 1, self.width))


# --------------------------------------------------------------------------------------------
# Attention over packed tokens


def varlen_available(device, dtype, head_size):
    """Whether flash attention's variable-length kernel can run (CUDA sm80+, bf16/fp16)."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_size % 8 == 0
            and head_size <= 256 and torch.cuda.get_device_capability(device)[0] >= 8)


def dense_available(device, dtype, head_size):
    """Whether cuDNN's attention runs for dense rows here: CUDA Hopper (sm90, where it was measured
    faster than flash attention, BENCHMARKS.md) with cuDNN 9, bf16/fp16, head size a multiple of 8
    up to 128."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_size % 8 == 0
            and head_size <= 128 and torch.cuda.get_device_capability(device)[0] == 9
            and torch.backends.cudnn.is_available() and torch.backends.cudnn.version() >= 90000
            and torch.backends.cuda.cudnn_sdp_enabled())


def attention_kind(options, tokens, device, dtype, head_size):
    """The attention of a batch: "dense" (rows all full, cuDNN), "varlen" (flash attention over
    packed tokens) or "padded" (SDPA over padded rows), as options.speed.attention allows."""
    if options.speed.attention == "padded":
        return "padded"
    if options.speed.dense_attention and tokens.dense_length and dense_available(device, dtype, head_size):
        return "dense"
    if options.speed.attention == "varlen" or varlen_available(device, dtype, head_size):
        return "varlen"
    return "padded"


def dense_attention(q, k, v, length, dropout_p, scale):
    """Attention over dense rows: q, k, v [B * length, heads, head size] (any row stride) viewed as
    [B, heads, length, head size]; cuDNN's attention on CUDA (aten op with its own autograd, dropout
    inside the kernel), SDPA elsewhere. Returns [B * length, heads, head size]."""
    heads, size = q.shape[1], q.shape[2]
    q, k, v = (x.view(-1, length, heads, size).transpose(1, 2) for x in (q, k, v))
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, q.requires_grad or k.requires_grad or v.requires_grad, dropout_p, False, False,
            scale=scale)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(-1, heads, size)


def attend(q, k, v, layout, dropout_p, scale):
    """Attention of each sample over its own tokens; q, k, v [T, heads, head size] -> same shape.

    layout from Tokens.attention_layout: without cu, dense attention over full rows; without a
    slot tensor, flash attention's variable-length kernel over the packed tokens (aten op with its
    own autograd; dropout inside the kernel); with one, SDPA over rows padded to L with the
    padding keys masked (CPU, fp32).
    """
    cu, bound, slot, keys = layout
    if cu is None:
        return dense_attention(q, k, v, bound.shape[0], dropout_p, scale)
    if slot is None:
        width = bound.shape[0]
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, width, width, dropout_p, False, False, scale=scale)[0]
    batch, width = keys.shape[0], keys.shape[-1]
    heads, size = q.shape[1], q.shape[2]

    def pad(x):
        out = x.new_zeros(batch * width, heads, size).index_copy(0, slot, x)
        return out.view(batch, width, heads, size).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keys, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(batch * width, heads, size).index_select(0, slot)


def padded_attention(q, k, v, tokens, dropout_p, scale):
    """SDPA over rows padded to L, padding keys masked (the CPU path; also a GPU alternative)."""
    return attend(q, k, v, tokens.attention_layout("padded"), dropout_p, scale)


# --------------------------------------------------------------------------------------------
# The two per-layer regions (plain functions of tensors: compilable, and used as they are on CPU)


def _lora(x, lora, training, cd):
    """LoRA term B(A(dropout(x))) * scale of one projection; lora = (A, B, B bias, scale, p)."""
    a, b, b_bias, scale, p = lora
    low = F.linear(F.dropout(x, p, training) if p else x, a.to(cd))
    return F.linear(low, b.to(cd), None if b_bias is None else b_bias.to(cd)) * scale


def _project(x, linear, training, cd):
    """A Linear (weight, bias, loras) applied to x in dtype cd, each LoRA with its own dropout."""
    weight, bias, loras = linear
    y = F.linear(x, weight.to(cd), None if bias is None else bias.to(cd))
    for lora in loras:
        y = y + _lora(x, lora, training, cd)
    return y


def shared_lora_p(query, key, value):
    """The LoRA dropout probability of a layer whose query/key/value LoRAs can share one dropout
    mask (one LoRA each where present, all with the same p), else None."""
    linears = (query, key, value)
    if not all(len(lin[2]) <= 1 for lin in linears):
        return None
    ps = {lin[2][0][4] for lin in linears if lin[2]}
    return ps.pop() if len(ps) == 1 else None


def _drop(x, p, training, keep=None):
    """Dropout of x with probability p in training: with `keep` (a bool keep-mask of x's shape,
    drawn ahead by dropout_keep), x * keep / (1 - p), the function F.dropout computes with its own
    mask."""
    if not training or not p:
        return x
    if keep is None:
        return F.dropout(x, p, True)
    return x * keep * (1.0 / (1.0 - p)) if p < 1 else torch.zeros_like(x)


def dropout_keep(h, layer, seed, lora_p, hidden_p):
    """Keep-masks [3, T, hidden] (bool) of one layer's dropouts, drawn before the layer: the LoRA
    input's (probability lora_p), the attention output's and the feed-forward output's (hidden_p).
    With Triton, kernels.keep_masks draws them from `seed` (a one-element tensor, one per pass) and
    the layer's index; else torch.rand (seed unused)."""
    ps = (lora_p, hidden_p, hidden_p)
    if seed is not None:
        return kernels.keep_masks(seed, layer, h.numel(), ps).view(3, *h.shape)
    uniform = torch.rand((3,) + tuple(h.shape), device=h.device)
    return torch.stack([row >= p for row, p in zip(uniform, ps)])  # no host tensor: CUDA-graph safe


def attention_inputs(h, query, key, value, heads, training, shared, cd, keep=None):
    """Region 1 of a layer: q, k, v [T, heads, head size] from h [T, hidden].

    The three frozen projections are one matmul over their concatenated weights, and q, k, v are
    views of its [T, 3 * hidden] output (flash attention reads them strided, no copies). LoRA: with
    `shared`, one dropout mask of h feeds all three LoRA A matrices (one matmul), and one matmul
    with the block-diagonal of the B matrices, each times its scale, adds all three LoRA terms (and
    the biases) to the frozen matmul's output (the ranks padded with zeros to a multiple of 8); else
    each LoRA drops its own copy of h (peft's way). `keep`: the shared dropout's keep-mask, drawn
    ahead (dropout_keep), else F.dropout draws one.
    """
    linears = (query, key, value)
    sizes = [lin[0].shape[0] for lin in linears]
    weight = torch.cat([lin[0] for lin in linears]).to(cd)
    bias = None
    if any(lin[1] is not None for lin in linears):
        bias = torch.cat([lin[0].new_zeros(size) if lin[1] is None else lin[1]
                          for lin, size in zip(linears, sizes)]).to(cd)
    h = h.to(cd)
    with_lora = [j for j, lin in enumerate(linears) if lin[2]]
    p = shared_lora_p(query, key, value)
    if shared and p is not None:
        dropped = _drop(h, p, training, keep)
        loras = [lin[2][0] if lin[2] else None for lin in linears]
        down = torch.cat([lora[0] for lora in loras if lora is not None])
        up = torch.block_diag(*[lin[0].new_zeros(size, 0) if lora is None else lora[1] * lora[3]
                                for lin, lora, size in zip(linears, loras, sizes)])
        pad = -down.shape[0] % 8  # zero ranks up to a multiple of 8: aligned rows for the GPU's matmuls
        if pad:
            down = torch.cat([down, down.new_zeros(pad, down.shape[1])])
            up = torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1)
        low = F.linear(dropped, down.to(cd))
        up = up.to(cd)
        if any(lora is not None and lora[2] is not None for lora in loras):
            lora_bias = torch.cat([lin[0].new_zeros(size) if lora is None or lora[2] is None else lora[2] * lora[3]
                                   for lin, lora, size in zip(linears, loras, sizes)]).to(cd)
            bias = lora_bias if bias is None else bias + lora_bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            qkv = F.linear(h, weight, bias) + F.linear(low, up)
        else:  # the usual case: frozen projections
            qkv = _FrozenPlusLowRank.apply(h, low, weight, up, bias)
        outs = qkv.split(sizes, dim=-1)
    else:
        outs = list(F.linear(h, weight, bias).split(sizes, dim=-1))
        for j in with_lora:
            for lora in linears[j][2]:
                outs[j] = outs[j] + _lora(h, lora, training, cd)
    tokens = h.shape[0]
    return tuple(out.reshape(tokens, heads, -1) for out in outs)


class _FrozenPlusLowRank(torch.autograd.Function):
    """h @ weight^T + low @ up^T + bias with `weight` and `bias` frozen, as ONE matmul: [h | low]
    times [weight | up]^T (the inner dimension padded with zeros to a multiple of 8, as the GPU's
    matmul kernels want). Backward: one matmul gives the gradients of h and low together, one
    more that of `up`; none for the frozen weight (autograd over the concatenated weight would
    compute a full-size weight gradient and throw most of it away)."""

    @staticmethod
    def forward(ctx, h, low, weight, up, bias):
        pad = -(h.shape[1] + low.shape[1]) % 8
        joint = torch.cat([weight, up, up.new_zeros(up.shape[0], pad)], dim=1)
        ctx.save_for_backward(low, joint)
        ctx.split = (h.shape[1], low.shape[1])
        return F.linear(torch.cat([h, low, low.new_zeros(low.shape[0], pad)], dim=1), joint, bias)

    @staticmethod
    def backward(ctx, grad):
        low, joint = ctx.saved_tensors
        hidden, ranks = ctx.split
        if not ctx.needs_input_grad[0]:  # the first layer: its input (the embeddings) is frozen
            return None, grad @ joint[:, hidden:hidden + ranks], None, grad.t() @ low, None
        grad_in = grad @ joint
        return grad_in[:, :hidden], grad_in[:, hidden:hidden + ranks], None, grad.t() @ low, None


def attention_output_and_ffn(ctx, h, out_linear, norm1, inter_linear, ffn_linear, norm2, hidden_p,
                             training, cd, rd, keep=None):
    """Region 2 of a layer: attention output projection, dropout, residual + LayerNorm, GELU
    feed-forward, dropout, residual + LayerNorm (post-LN BERT). LayerNorm in fp32; the output (the
    residual stream) in dtype rd. `keep`: the layer's keep-masks (dropout_keep; rows 1 and 2 are
    these two dropouts'), else F.dropout draws them."""
    a = _drop(_project(ctx, out_linear, training, cd), hidden_p, training, None if keep is None else keep[1])
    h1 = _layer_norm(a.float() + h.float(), norm1).to(rd)
    f = F.gelu(_project(h1.to(cd), inter_linear, training, cd))
    f = _drop(_project(f, ffn_linear, training, cd), hidden_p, training, None if keep is None else keep[2])
    return _layer_norm(f.float() + h1.float(), norm2).to(rd)


def embeddings_out(x, token_type, positions, norm, hidden_p, training, rd):
    """Input embeddings + token type 0 + positions, LayerNorm (fp32), dropout; [T, hidden] in rd."""
    e = (x.float() + token_type.float()) + positions.float()
    return F.dropout(_layer_norm(e, norm), hidden_p, training).to(rd)


def layer_forward(h, layout, parts, training, shared, cd, rd, keep=None):
    """One whole layer (both regions and attention) on packed tokens: the unit that "layer"
    compilation turns into one graph, reused by every layer (weights are inputs). `keep`: the
    layer's dropout keep-masks drawn ahead (dropout_keep), else None."""
    (query, key, value, heads, head_size, attention_p, out_linear, norm1, inter, ffn, norm2, hidden_p) = parts
    q, k, v = attention_inputs(h, query, key, value, heads, training, shared, cd, None if keep is None else keep[0])
    ctx = attend(q, k, v, layout, attention_p if training else 0.0, head_size ** -0.5)
    return attention_output_and_ffn(ctx.reshape(ctx.shape[0], -1), h, out_linear, norm1, inter, ffn, norm2,
                                    hidden_p, training, cd, rd, keep)


def _layer_norm(x, norm):
    weight, bias, eps = norm
    return F.layer_norm(x, (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)


_REGIONS = {"attention_inputs": attention_inputs, "attention_output_and_ffn": attention_output_and_ffn,
            "embeddings_out": embeddings_out, "layer_forward": layer_forward}
_COMPILED = {}


def _region(name, compiled):
    """The region function, compiled once per process when asked."""
    if not compiled:
        return _REGIONS[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_REGIONS[name], fullgraph=True)
    return _COMPILED[name]


def _dynamic(x, compiled, *dims):
    """Mark the token (or batch) dimensions dynamic: one compiled graph for every batch shape."""
    if compiled and x is not None:
        for dim in dims or (0,):
            torch._dynamo.maybe_mark_dynamic(x, dim)
    return x


def _dynamic_layout(layout, compiled):
    cu, bound, slot, keys = layout
    return (_dynamic(cu, compiled), _dynamic(bound, compiled), _dynamic(slot, compiled),
            _dynamic(keys, compiled, 0, 3))


# --------------------------------------------------------------------------------------------
# Reading the transformers / peft modules


def _linear_parts(module, where):
    """(weight, bias, loras) of an nn.Linear or a peft LoRA Linear; each LoRA is (A, B, B bias, scale, p)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight, module.bias, ()
    if module.merged or module.disable_adapters or getattr(module, "lora_variant", {}):
        raise Clamp3LoraError(
            f"{where}: the fast encoder path supports plain (unmerged, enabled) LoRA only; "
            f"use prepare_for_training(..., fast_encoder=False) for this adapter")
    loras = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        dropout = module.lora_dropout[name]
        p = float(getattr(dropout, "p", 0.0))
        lora_b = module.lora_B[name]
        loras.append((module.lora_A[name].weight, lora_b.weight, lora_b.bias, float(module.scaling[name]), p))
    return base.weight, base.bias, tuple(loras)


def _norm(layer_norm):
    return layer_norm.weight, layer_norm.bias, float(layer_norm.eps)


def check_encoder(bert, where):
    """Raise Clamp3LoraError if a BertModel/XLMRobertaModel has something the fast path does not do."""
    config = bert.config
    problems = []
    if config.hidden_act != "gelu":
        problems.append(f"activation {config.hidden_act!r} (only exact 'gelu')")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        problems.append("decoder / cross-attention layers")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position embeddings {config.position_embedding_type!r}")
    if problems:
        raise Clamp3LoraError(f"{where}: the fast encoder path cannot run this encoder: " + "; ".join(problems))
    for i, layer in enumerate(bert.encoder.layer):
        _layer_parts(layer, f"{where} layer {i}")


def _layer_parts(layer, where):
    """The tensors and settings of one BERT layer, as the tuple layer_forward takes."""
    attention = layer.attention.self
    return (_linear_parts(attention.query, where), _linear_parts(attention.key, where),
            _linear_parts(attention.value, where), attention.num_attention_heads, attention.attention_head_size,
            float(attention.dropout.p), _linear_parts(layer.attention.output.dense, where),
            _norm(layer.attention.output.LayerNorm), _linear_parts(layer.intermediate.dense, where),
            _linear_parts(layer.output.dense, where), _norm(layer.output.LayerNorm), float(layer.output.dropout.p))


def encoder_parts(bert):
    """Every layer's parts, cached on the encoder: rebuilt when an adapter is added, removed,
    merged, disabled or switched, or a dropout probability changes (checked on the first layer)."""
    first = bert.encoder.layer[0]
    query = first.attention.self.query
    lora_p = tuple(float(getattr(d, "p", 0.0)) for d in getattr(query, "lora_dropout", {}).values())
    key = (id(query), getattr(query, "merged", None), getattr(query, "disable_adapters", None),
           tuple(getattr(query, "active_adapters", ())), lora_p, float(first.attention.self.dropout.p),
           float(first.output.dropout.p), len(bert.encoder.layer))
    cached = bert.__dict__.get("_clamp3_fast_parts")
    if cached is None or cached[0] != key:
        parts = [_layer_parts(layer, f"layer {i}") for i, layer in enumerate(bert.encoder.layer)]
        cached = (key, parts)
        bert.__dict__["_clamp3_fast_parts"] = cached
    return cached[1]


# --------------------------------------------------------------------------------------------
# Encoders


def compute_dtype(device_type, weight):
    """The autocast dtype when autocast is on for the device, else the weights' dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def encode(bert, h, tokens, options, cd, parts=None):
    """Run the layers of a BertModel/XLMRobertaModel over packed tokens h [T, hidden] -> [T, hidden].
    `parts`: the layers' tensors (default: encoder_parts(bert), the module's own)."""
    training = bert.training
    mode = options.compile if h.is_cuda else "none"
    compiled = mode != "none"
    rd = options.residual_dtype(cd)
    parts = encoder_parts(bert) if parts is None else parts
    head_size = parts[0][4]
    kind = attention_kind(options, tokens, h.device, cd, head_size)
    layout = _dynamic_layout(tokens.attention_layout(kind), compiled)
    draw = options.speed.keep_masks and training
    seed = torch.randint(2 ** 62, (1,), device=h.device) if draw and kernels.available(h.device) else None

    def keep(i, layer_parts):
        """Layer i's keep-masks, drawn ahead of it (None: the layer's own F.dropout draws, if any)."""
        query, key, value = layer_parts[:3]
        lora_p = (shared_lora_p(query, key, value) if options.speed.shared_lora_dropout else None) or 0.0
        if not draw or not (lora_p or layer_parts[-1]):
            return None
        return _dynamic(dropout_keep(h, i, seed, lora_p, layer_parts[-1]), compiled, 1)

    layer = _region("layer_forward", mode == "layer")
    for i, layer_parts in enumerate(parts):
        h = layer(_dynamic(h, compiled), layout, layer_parts, training, options.speed.shared_lora_dropout, cd, rd,
                  keep(i, layer_parts))
    return h


def embeddings(bert, x, positions, options, cd):
    """The embedding layer's output [T, hidden] for token inputs x [T, hidden] at `positions`."""
    module = bert.embeddings
    compiled = options.compile != "none" and x.is_cuda
    region = _region("embeddings_out", compiled)
    rows = module.position_embeddings.weight.index_select(0, positions)
    token_type = module.token_type_embeddings.weight[0]
    return region(_dynamic(x, compiled), token_type, _dynamic(rows, compiled),
                  _norm(module.LayerNorm), float(module.dropout.p), bert.training,
                  options.residual_dtype(cd))


def embed_patches(encoder, flat, options):
    """flat [N, P] patches -> [N, hidden]: encoder.embed_patches, or the Triton gather-sum (the same
    sums) when options.speed.patch_kernel and it can run and the embedding is frozen."""
    linear = encoder.patch_embedding
    if options.speed.patch_kernel and kernels.available(flat.device) and not linear.weight.requires_grad:
        return kernels.patch_embedding(flat, linear.weight.t().contiguous(), linear.bias, encoder.patch_classes)
    return encoder.embed_patches(flat.unsqueeze(0)).squeeze(0)


def music_hidden(encoder, patches, patch_mask, options, packed=None):
    """Last hidden state [B, L, hidden] (fp32, zeros at padding) of a SymbolicEncoder, packed
    (`packed`: the mask's (index, cu) from `packing`, on the device; None computes them)."""
    bert = encoder.bert
    device_type = patches.device.type
    cd = compute_dtype(device_type, bert.encoder.layer[0].intermediate.dense.weight)
    tokens = Tokens.of(patch_mask, packed)
    flat = patches.reshape(-1, patches.shape[-1]).index_select(0, tokens.index)
    with torch.autocast(device_type, enabled=False):
        x = embed_patches(encoder, flat, options)
        h = embeddings(bert, x, tokens.column, options, cd)
        h = encode(bert, h, tokens, options, cd)
        return tokens.pad(h.float())


def xlmr_positions(input_ids, pad_id):
    """XLM-R's position ids [B, T]: real tokens count from pad_id + 1, padding sits at pad_id."""
    not_pad = input_ids.ne(pad_id).int()
    return (torch.cumsum(not_pad, dim=1).type_as(not_pad) * not_pad).long() + pad_id


def text_hidden(text_model, input_ids, attention_mask, options, packed=None):
    """Last hidden state [B, T, hidden] (fp32, zeros at padding) of an XLMRobertaModel, packed
    (`packed` as in music_hidden)."""
    device_type = input_ids.device.type
    cd = compute_dtype(device_type, text_model.encoder.layer[0].intermediate.dense.weight)
    tokens = Tokens.of(attention_mask, packed)
    pad_id = text_model.embeddings.padding_idx
    positions = xlmr_positions(input_ids, pad_id)
    ids = input_ids.reshape(-1).index_select(0, tokens.index)
    positions = positions.reshape(-1).index_select(0, tokens.index)
    with torch.autocast(device_type, enabled=False):
        x = text_model.embeddings.word_embeddings.weight.index_select(0, ids)
        h = embeddings(text_model, x, positions, options, cd)
        h = encode(text_model, h, tokens, options, cd)
        return tokens.pad(h.float())


def store_frozen_weights(model, dtype):
    """Store every frozen floating-point matrix (Linear weights, embedding tables) in `dtype`, in
    place; biases, LayerNorm parameters and trainable (LoRA) parameters keep their dtype."""
    converted = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dim() == 2 and param.dtype != dtype:
            param.data = param.data.to(dtype)
            converted += param.numel()
    return converted
