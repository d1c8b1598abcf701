"""The CLaMP 3 text and symbolic-music encoders, official checkpoint loading, and LoRA adapters.

The module tree is named exactly like the official state dict (`text_model`, `text_proj`,
`symbolic_model.patch_embedding`, `symbolic_model.base`, `symbolic_proj`), so official checkpoints
load key for key. The audio encoder is not built: its `audio_*` keys are skipped when loading.

    model = load_model("weights.pth", text_model="FacebookAI/xlm-roberta-base")
    music = model.music_features(patches, patch_mask)      # [B, projection]
    text = model.text_features(input_ids, attention_mask)  # [B, projection]
    loss = clip_loss(music, text)

Adapters are peft LoRA adapters on `symbolic_model.base` only, stored in peft's standard directory
layout so that they load into other CLaMP 3 LoRA projects and back.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

from .errors import CheckpointError, Clamp3LoraError
from .weights import hub_unreachable

PATCH_SIZE = 64
"""Characters per patch; fixed by the M3 patch format."""
PATCH_CLASSES = 128
"""Character classes of the one-hot patch encoding (ASCII)."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
TRAINING_RECORD = "training_record.json"

# Buffers that older transformers versions saved in the state dict; harmless, accepted and ignored.
_IGNORED_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
_SKIPPED_PREFIXES = ("audio_model.", "audio_proj.")
# adapter_config.json keys that every peft version since LoRA's early days knows (the published
# CLaMP 3 adapters hold exactly these); other fields are written only where they differ from the
# default, so that older peft versions load our adapters too.
_BASIC_ADAPTER_KEYS = (
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type",
    "r", "rank_pattern", "revision", "target_modules", "task_type",
)
# What torch.load raises on a file that is not a checkpoint (garbage, text, truncated, foreign objects).
_UNREADABLE = (pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
               AttributeError, ImportError)


def _size(label):
    """A ModelConfig size field (no default) with the label that error messages use."""
    return field(metadata={"label": label})


@dataclass(frozen=True)
class ModelConfig:
    """Every size of a CLaMP 3 text + symbolic model (the audio encoder is not built)."""

    text_vocab_size: int = _size("text vocabulary size")
    text_hidden_size: int = _size("text hidden size")
    text_layers: int = _size("text layers")
    text_heads: int = _size("text attention heads")
    text_ffn_size: int = _size("text feed-forward size")
    text_max_positions: int = _size("text max positions")
    text_type_vocab_size: int = _size("text token type vocabulary size")
    symbolic_hidden_size: int = _size("symbolic hidden size")
    symbolic_layers: int = _size("symbolic layers")
    symbolic_heads: int = _size("symbolic attention heads")
    symbolic_ffn_size: int = _size("symbolic feed-forward size")
    symbolic_max_positions: int = _size("symbolic max positions (patches)")
    symbolic_type_vocab_size: int = _size("symbolic token type vocabulary size")
    projection_size: int = _size("projection size")
    patch_size: int = field(default=PATCH_SIZE, metadata={"label": "patch size"})
    patch_classes: int = field(default=PATCH_CLASSES, metadata={"label": "patch character classes"})
    text_pad_token_id: int = field(default=1, metadata={"label": "text pad token id"})
    text_layer_norm_eps: float = field(default=1e-5, metadata={"label": "text LayerNorm eps"})
    symbolic_layer_norm_eps: float = field(default=1e-12, metadata={"label": "symbolic LayerNorm eps"})

    @classmethod
    def from_state_dict(cls, sd):
        """Read every size off the weights of an official-layout state dict (audio keys ignored).

        Heads are hidden // 64 (at least 1), as in every official CLaMP 3 model. Raises
        CheckpointError naming a key that is needed to read a size but absent.
        """
        def shape(key):
            if key not in sd:
                raise CheckpointError(f"missing key {key} (needed to read the model size)")
            return tuple(sd[key].shape)

        def layers(prefix):
            indices = set()
            for key in sd:
                if key.startswith(prefix):
                    index = key[len(prefix):].split(".", 1)[0]
                    if index.isdigit():
                        indices.add(int(index))
            if not indices:
                raise CheckpointError(f"no keys {prefix}N.* (needed to read the number of layers)")
            return max(indices) + 1

        text_vocab, text_hidden = shape("text_model.embeddings.word_embeddings.weight")
        sym_hidden, patch_in = shape("symbolic_model.patch_embedding.weight")
        if patch_in % PATCH_CLASSES:
            raise CheckpointError(
                f"patch embedding input size {patch_in} is not a multiple of {PATCH_CLASSES} character classes")
        return cls(
            text_vocab_size=text_vocab,
            text_hidden_size=text_hidden,
            text_layers=layers("text_model.encoder.layer."),
            text_heads=max(1, text_hidden // 64),
            text_ffn_size=shape("text_model.encoder.layer.0.intermediate.dense.weight")[0],
            text_max_positions=shape("text_model.embeddings.position_embeddings.weight")[0],
            text_type_vocab_size=shape("text_model.embeddings.token_type_embeddings.weight")[0],
            symbolic_hidden_size=shape("symbolic_model.base.embeddings.position_embeddings.weight")[1],
            symbolic_layers=layers("symbolic_model.base.encoder.layer."),
            symbolic_heads=max(1, sym_hidden // 64),
            symbolic_ffn_size=shape("symbolic_model.base.encoder.layer.0.intermediate.dense.weight")[0],
            symbolic_max_positions=shape("symbolic_model.base.embeddings.position_embeddings.weight")[0],
            symbolic_type_vocab_size=shape("symbolic_model.base.embeddings.token_type_embeddings.weight")[0],
            projection_size=shape("symbolic_proj.weight")[0],
            patch_size=patch_in // PATCH_CLASSES,
        )

    def differences(self, other, mine="checkpoint", theirs="model"):
        """Lines "LABEL: checkpoint X, model Y" for every field where self and other differ."""
        return [
            f"{f.metadata['label']}: {mine} {getattr(self, f.name)}, {theirs} {getattr(other, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def text_config(self):
        """The transformers XLMRobertaConfig of the text encoder (SDPA attention)."""
        return XLMRobertaConfig(
            vocab_size=self.text_vocab_size,
            hidden_size=self.text_hidden_size,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.text_ffn_size,
            max_position_embeddings=self.text_max_positions,
            type_vocab_size=self.text_type_vocab_size,
            pad_token_id=self.text_pad_token_id,
            bos_token_id=0,
            eos_token_id=2,
            layer_norm_eps=self.text_layer_norm_eps,
            attn_implementation="sdpa",
        )

    def symbolic_config(self):
        """The transformers BertConfig of the symbolic encoder (vocab 1, fed by inputs_embeds; SDPA)."""
        return BertConfig(
            vocab_size=1,
            hidden_size=self.symbolic_hidden_size,
            num_hidden_layers=self.symbolic_layers,
            num_attention_heads=self.symbolic_heads,
            intermediate_size=self.symbolic_ffn_size,
            max_position_embeddings=self.symbolic_max_positions,
            type_vocab_size=self.symbolic_type_vocab_size,
            layer_norm_eps=self.symbolic_layer_norm_eps,
            attn_implementation="sdpa",
        )


PRESETS = {
    # The golden tiny model (../shared/golden/tiny_forward.pt: text_config, symbolic_config).
    "tiny": ModelConfig(
        text_vocab_size=1000, text_hidden_size=128, text_layers=2, text_heads=2, text_ffn_size=256,
        text_max_positions=130, text_type_vocab_size=1,
        symbolic_hidden_size=128, symbolic_layers=2, symbolic_heads=2, symbolic_ffn_size=512,
        symbolic_max_positions=512, symbolic_type_vocab_size=2,
        projection_size=64,
    ),
    # The official CLaMP 3 model: XLM-R base text encoder, 12-layer M3 symbolic encoder, 768 projections.
    "full": ModelConfig(
        text_vocab_size=250002, text_hidden_size=768, text_layers=12, text_heads=12, text_ffn_size=3072,
        text_max_positions=514, text_type_vocab_size=1,
        symbolic_hidden_size=768, symbolic_layers=12, symbolic_heads=12, symbolic_ffn_size=3072,
        symbolic_max_positions=512, symbolic_type_vocab_size=2,
        projection_size=768,
    ),
}


def masked_mean(hidden, mask):
    """Mean of hidden [B, L, H] over the positions where mask [B, L] is nonzero."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class SymbolicEncoder(nn.Module):
    """The M3 patch encoder: one-hot patch embedding (computed as a gather-sum) + BertModel."""

    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_classes = config.patch_classes
        self.patch_embedding = nn.Linear(config.patch_size * config.patch_classes, config.symbolic_hidden_size)
        self.base = BertModel(config.symbolic_config(), add_pooling_layer=True)

    @property
    def bert(self):
        """The BertModel, with LoRA layers injected when an adapter is on (bypasses peft's forward)."""
        return self.base.get_base_model() if isinstance(self.base, PeftModel) else self.base

    def embed_patches(self, patches):
        """patches [B, L, P] ints in 0..127 -> [B, L, hidden], equal to patch_embedding(one_hot(patches)).

        The one-hot matmul is the sum of P columns of the weight (column = position * 128 + char)
        plus the bias; embedding_bag computes that sum without materialising the one-hot. The
        weight is gathered from a contiguous [P * 128, hidden] copy (a few MB; rows read whole, so
        GPU reads coalesce), in its own dtype: embedding_bag is outside autocast's cast lists.
        """
        batch, length, size = patches.shape
        if size != self.patch_size:
            raise ValueError(f"patches have {size} characters each, the model expects {self.patch_size}")
        if patches.device.type == "cpu" and patches.numel() and (
                patches.min() < 0 or patches.max() >= self.patch_classes):
            raise ValueError(f"patch character ids must be in 0..{self.patch_classes - 1}")
        offsets = torch.arange(size, device=patches.device) * self.patch_classes
        ids = (patches.long() + offsets).reshape(batch * length, size)
        table = self.patch_embedding.weight.t().contiguous()
        summed = F.embedding_bag(ids, table, mode="sum")
        return (summed + self.patch_embedding.bias).reshape(batch, length, -1)

    def forward(self, patches, patch_mask):
        """Last hidden state [B, L, hidden] of the BertModel over the embedded patches."""
        embeds = self.embed_patches(patches)
        return self.bert(inputs_embeds=embeds, attention_mask=patch_mask).last_hidden_state


class Clamp3(nn.Module):
    """CLaMP 3 text encoder (XLM-R) and symbolic-music encoder (M3), each with its projection."""

    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.base_checkpoint = None  # identity of the weights this model was loaded from (for records)
        # The speed paths, set by clamp3_lora.speed.accelerate (this module knows nothing of them):
        # `fast` computes the encoders' hidden states (.text_hidden / .music_hidden), `graphs`
        # replays training passes as CUDA graphs (.text / .music / .lay_out_music). None: the plain
        # transformers forward.
        self.fast = None
        self.graphs = None
        self.text_model = XLMRobertaModel(config.text_config(), add_pooling_layer=True)
        self.text_proj = nn.Linear(config.text_hidden_size, config.projection_size)
        self.symbolic_model = SymbolicEncoder(config)
        self.symbolic_proj = nn.Linear(config.symbolic_hidden_size, config.projection_size)

    # --- features ---------------------------------------------------------------------------

    @property
    def text_frozen(self):
        """Whether the text side (XLM-R and text_proj) has no trainable parameter (the usual case)."""
        return not any(p.requires_grad for module in (self.text_model, self.text_proj) for p in module.parameters())

    def text_features(self, input_ids, attention_mask, packed=None):
        """Global text features [B, projection]: XLM-R last hidden state, masked mean, text_proj.

        Runs without autograd when the text side is frozen (the usual case in LoRA training).
        `packed`: (index, cu) of attention_mask from fast.packing, on the device (the collated
        batch's text_index/text_cu), so the fast path needs no host sync; ignored by the plain path.
        """
        frozen = self.text_frozen
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            if self.graphs is not None and self.training and frozen and packed is not None:
                return self.graphs.text(input_ids, attention_mask, packed)
            if self.fast is not None:
                hidden = self.fast.text_hidden(self.text_model, input_ids, attention_mask, packed)
            else:
                hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return _apply_linear(self.text_proj, masked_mean(hidden, attention_mask))

    def music_features(self, patches, patch_mask, packed=None):
        """Global music features [B, projection] from patches [B, L, 64] and patch_mask [B, L]
        (`packed`: as in text_features, of patch_mask). In training mode with CUDA graphs on (and
        `packed` given), the captured pass of graphs.EncoderGraphs computes them."""
        if self.graphs is not None and self.training and torch.is_grad_enabled() and packed is not None:
            return self.graphs.music(patches, patch_mask, packed)
        if self.fast is not None:
            hidden = self.fast.music_hidden(self.symbolic_model, patches, patch_mask, packed)
        else:
            hidden = self.symbolic_model(patches, patch_mask)
        return _apply_linear(self.symbolic_proj, masked_mean(hidden, patch_mask))

    def lay_out_music_ahead(self, patches, patch_mask, packed=None):
        """With CUDA graphs in a training pass: queue the layout of a batch's music inputs before
        its step (step.text_ahead does, for the next batch); music_features then starts from it
        when given the same `patches` tensor. The same features either way; no-op without graphs."""
        if self.graphs is not None and self.training and packed is not None:
            self.graphs.lay_out_music(patches, patch_mask, packed)

    def forward(self, patches, patch_mask, input_ids=None, attention_mask=None, packed=None, text_packed=None):
        """(music features, text features or None); the entry point for DistributedDataParallel."""
        music = self.music_features(patches, patch_mask, packed)
        text = None if input_ids is None else self.text_features(input_ids, attention_mask, text_packed)
        return music, text

    # --- adapters ---------------------------------------------------------------------------

    @property
    def has_adapter(self):
        """Whether symbolic_model.base is wrapped by peft."""
        return isinstance(self.symbolic_model.base, PeftModel)

    def add_adapter(self, r=4, alpha=8, dropout=0.1, targets=("query", "key", "value")):
        """Wrap symbolic_model.base with a new LoRA adapter; freeze everything but the LoRA weights.

        Refuses to wrap a model that already has an adapter (on resume, load the adapter weights
        with load_lora_state_dict or load_adapter instead of wrapping again).
        """
        lora = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
            bias="none", task_type="FEATURE_EXTRACTION",
        )
        self._wrap(lora, trainable=True)

    def _wrap(self, lora, trainable):
        """Freeze the whole model and wrap symbolic_model.base with the peft LoRA config."""
        if self.has_adapter:
            raise Clamp3LoraError(
                "the model already has a LoRA adapter; wrapping it again would nest adapters. "
                "Load adapter weights with load_adapter(path) or load_lora_state_dict(sd) instead")
        for p in self.parameters():
            p.requires_grad_(False)
        lora = dataclasses.replace(lora, inference_mode=not trainable)
        self.symbolic_model.base = get_peft_model(self.symbolic_model.base, lora)
        for p in self._lora_parameters().values():
            p.requires_grad_(trainable)
        self.train(self.training)  # the new peft modules start in training mode; follow the model's mode

    def _require_adapter(self):
        if not self.has_adapter:
            raise Clamp3LoraError("the model has no LoRA adapter: call add_adapter() or load_adapter(path) first")
        return self.symbolic_model.base

    def _lora_parameters(self):
        """{peft file key: parameter} of the active adapter, keys as in adapter_model.safetensors."""
        peft_model = self._require_adapter()
        adapter = peft_model.active_adapter
        params = {}
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                params[name.replace(f".{adapter}.", ".")] = param
        return params

    def lora_config(self):
        """The peft LoraConfig of the current adapter."""
        peft_model = self._require_adapter()
        return peft_model.peft_config[peft_model.active_adapter]

    def trainable_parameters(self):
        """The parameters that require grad (the LoRA weights once an adapter is added)."""
        return [p for p in self.parameters() if p.requires_grad]

    def lora_state_dict(self):
        """LoRA tensors only (CPU copies), keyed as in peft's adapter_model.safetensors."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self._lora_parameters().items()}

    def check_lora_state_dict(self, sd):
        """Raise CheckpointError naming missing or unexpected LoRA keys or shape mismatches of `sd`
        against the current adapter; return the adapter's {key: parameter} when it fits."""
        params = self._lora_parameters()
        _check_keys(set(params), set(sd), what="LoRA")
        bad = [f"{k}: adapter {tuple(sd[k].shape)}, model {tuple(params[k].shape)}"
               for k in sorted(params) if tuple(sd[k].shape) != tuple(params[k].shape)]
        if bad:
            raise CheckpointError(
                "LoRA shape mismatch (different rank or hidden size?): " + _name_keys(bad))
        return params

    def load_lora_state_dict(self, sd):
        """Copy LoRA tensors into the current adapter in place (the parameter objects stay the same).

        Strict: any missing or unexpected key, or a shape mismatch, raises CheckpointError and
        leaves the adapter unchanged.
        """
        params = self.check_lora_state_dict(sd)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(sd[k])

    def save_adapter(self, path, record=None):
        """Write the adapter as a peft directory (adapter_config.json + adapter_model.safetensors)
        plus training_record.json (record, with the base checkpoint identity added).

        The directory is written beside its final place and swapped in, so an interrupted save
        leaves either the old adapter or the new one, never a mixture.
        """
        path = Path(path)
        lora = dataclasses.replace(self.lora_config(), inference_mode=True, base_model_name_or_path="")
        record = dict(record or {})
        record.setdefault("base_checkpoint", self.base_checkpoint)
        record.setdefault("lora", {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                                   "targets": sorted(lora.target_modules)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_json(tmp / ADAPTER_CONFIG, _adapter_config_dict(lora))
        save_safetensors({k: v.contiguous() for k, v in self.lora_state_dict().items()},
                         str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / TRAINING_RECORD, record)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            _fsync(tmp / name)
        _replace_dir(tmp, path)

    def load_adapter(self, path, trainable=False):
        """Load a peft LoRA adapter directory (this project's or another CLaMP 3 LoRA project's).

        Without an adapter, wraps symbolic_model.base with the directory's LoRA config (the LoRA
        weights require grad only if trainable). With one, replaces its weights in place; the
        directory's r, alpha and targets must then match. Missing or unexpected LoRA keys and rank
        mismatches raise CheckpointError naming them.
        """
        path = Path(path)
        lora = _read_lora_config(path)
        sd = _read_adapter_weights(path)
        if self.has_adapter:
            _check_same_lora(self.lora_config(), lora, path)
            try:
                self.load_lora_state_dict(sd)
            except CheckpointError as error:
                raise CheckpointError(f"adapter {path} does not fit this model: {error}") from error
            return
        saved_grad = {n: p.requires_grad for n, p in self.named_parameters()}
        self._wrap(lora, trainable=trainable)
        try:
            self.load_lora_state_dict(sd)
        except CheckpointError as error:
            self.symbolic_model.base = self.symbolic_model.base.unload()
            for n, p in self.named_parameters():
                p.requires_grad_(saved_grad.get(n, False))
            raise CheckpointError(f"adapter {path} does not fit this model: {error}") from error


def _apply_linear(linear, x):
    """linear(x); outside autocast, x is first cast to the weight's dtype (frozen weights stored in bf16)."""
    weight = linear.weight
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return linear(x)
    bias = None if linear.bias is None else linear.bias.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias)


def clip_loss(music_features, text_features):
    """CLIP InfoNCE with logit scale 1: mean of CE over music @ text.T and its transpose."""
    logits = music_features.float() @ text_features.float().t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


# --- loading ---------------------------------------------------------------------------------


def load_model(path, text_model="FacebookAI/xlm-roberta-base", preset=None, device="cpu"):
    """Load an official-layout CLaMP 3 checkpoint (or build a random preset model when path is None).

    path: .pth with {"model": state_dict, ...}; every size is read off the weights, audio_* keys
    are skipped, and any other missing/unexpected key or size mismatch raises CheckpointError.
    text_model: tokenizer hub id or local folder (None: no tokenizer). preset: a PRESETS name or a
    ModelConfig; with a path, the checkpoint must have exactly that size. The model is returned in
    eval mode on device; a random model's weights come from the caller's torch RNG.
    """
    wanted = _preset_config(preset)
    if path is None:
        if wanted is None:
            raise Clamp3LoraError("load_model needs a checkpoint path or a preset (e.g. preset='tiny')")
        model = Clamp3(wanted)
        model.base_checkpoint = {"preset": preset if isinstance(preset, str) else "custom"}
    else:
        sd = _read_official_state_dict(path)
        config = ModelConfig.from_state_dict(sd)
        if wanted is not None and config != wanted:
            raise CheckpointError(f"checkpoint {path} does not have the requested size: "
                                  + "; ".join(config.differences(wanted)))
        if config.patch_size != PATCH_SIZE:
            raise CheckpointError(f"checkpoint {path}: patch size: checkpoint {config.patch_size}, "
                                  f"model {PATCH_SIZE}")
        with _skip_weight_init():  # every weight comes from the checkpoint (the key check makes sure)
            model = Clamp3(config)
        _load_official_weights(model, sd, path)
        model.base_checkpoint = base_checkpoint_identity(path)
    if text_model is not None:
        model.tokenizer = load_tokenizer(text_model)
        _check_tokenizer(model.tokenizer, model.config, text_model)
    return model.to(device).eval()


def _skip_weight_init():
    """transformers' context that skips random weight initialisation (seconds for the full model)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _preset_config(preset):
    if preset is None or isinstance(preset, ModelConfig):
        return preset
    if preset not in PRESETS:
        raise Clamp3LoraError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _read_official_state_dict(path):
    """The state dict of an official checkpoint, without audio keys and legacy buffer keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = _torch_load(path, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
        checkpoint = _torch_load(path, mmap=False)  # a legacy (non-zip) file cannot be memory-mapped
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(
            f"{path} is not an official CLaMP 3 checkpoint: expected a dict with a 'model' state dict")
    sd = {}
    for key, value in checkpoint["model"].items():
        if key.startswith(_SKIPPED_PREFIXES) or key.endswith(_IGNORED_BUFFER_SUFFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state dict entry {key} is not a tensor")
        sd[key] = value
    return sd


def _torch_load(path, mmap):
    """torch.load with weights only; a file that cannot be unpickled raises CheckpointError naming it.

    RuntimeError is passed through when mmap is on, so the caller can retry a legacy file without it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as error:
        if mmap:
            raise
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    except _UNREADABLE as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error


def _load_official_weights(model, sd, path):
    """Copy sd into model key for key; missing/unexpected keys or shape mismatches raise CheckpointError."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(_IGNORED_BUFFER_SUFFIXES)}
    try:
        _check_keys(set(own), set(sd), what="checkpoint")
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
           for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: size mismatch: " + _name_keys(bad))
    model.load_state_dict(sd, strict=False)


def _check_keys(expected, found, what):
    """Raise CheckpointError naming the missing and unexpected keys of a key set."""
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    parts = []
    if missing:
        parts.append(f"missing {what} keys: {_name_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected {what} keys: {_name_keys(unexpected)}")
    if parts:
        raise CheckpointError("; ".join(parts))


def _name_keys(keys, limit=8):
    """'a, b, c' or 'a, ..., h and N more' for long lists."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def base_checkpoint_identity(path):
    """A cheap identity of a checkpoint file: name, size and sha256 of its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    chunk = 1 << 20
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            digest.update(f.read(chunk))
    return {"file": path.name, "path": str(path.resolve()), "size": size,
            "sha256_head_tail": digest.hexdigest()}


# --- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(name):
    """The text tokenizer from a local folder or a hub id (from the local cache first, then online).

    Raises Clamp3LoraError explaining how to get the tokenizer when it is not available.
    """
    from transformers import AutoTokenizer

    if Path(name).is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(name))
        except (OSError, ValueError) as error:
            raise Clamp3LoraError(f"cannot load the tokenizer in folder {name}: {error}") from error
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as cached_error:
        first_error = cached_error
    unreachable = hub_unreachable()
    if not unreachable:  # offline or no network: fail now, not after the download library's ten retries
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            first_error = error
    raise Clamp3LoraError(
        f"tokenizer {name!r} is not available: it is neither a local folder nor in the Hugging Face "
        f"cache, and it could not be downloaded ({unreachable or first_error.__class__.__name__}). Download it "
        f"once on a machine with network access (e.g. `hf download {name} --local-dir tokenizer/`) and "
        f"pass that folder as --text-model, or run once with network access to fill the cache.")



def _check_tokenizer(tokenizer, config, name):
    """The tokenizer must fit the text encoder: ids inside the vocabulary, XLM-R's pad id."""
    if len(tokenizer) > config.text_vocab_size:
        raise CheckpointError(
            f"tokenizer {name} has {len(tokenizer)} tokens, more than the text vocabulary of the "
            f"checkpoint ({config.text_vocab_size})")
    if tokenizer.pad_token_id != config.text_pad_token_id:
        raise CheckpointError(
            f"tokenizer {name} has pad id {tokenizer.pad_token_id}; the text encoder (XLM-R) needs "
            f"pad id {config.text_pad_token_id}")


# --- adapter files ---------------------------------------------------------------------------


def read_adapter(path):
    """(LoraConfig, {key: tensor}) of a peft adapter directory; CheckpointError naming it if unusable."""
    path = Path(path)
    return _read_lora_config(path), _read_adapter_weights(path)


def _read_lora_config(path):
    """The LoraConfig of a peft adapter directory (CheckpointError naming the directory if unusable)."""
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a peft adapter directory: {ADAPTER_CONFIG} not found")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {config_file}: {error}") from error
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_file} is not a LoRA adapter config (peft_type "
                              f"{raw.get('peft_type') if isinstance(raw, dict) else None!r})")
    try:
        lora = LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"cannot use the LoRA config in {config_file}: {error}") from error
    return dataclasses.replace(lora, task_type="FEATURE_EXTRACTION", base_model_name_or_path=None)


def _read_adapter_weights(path):
    """The tensors of adapter_model.safetensors (or the older adapter_model.bin) in a peft directory."""
    weights = path / ADAPTER_WEIGHTS
    try:
        if weights.is_file():
            return load_safetensors(str(weights))
        legacy = path / ADAPTER_WEIGHTS_BIN
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"cannot read the adapter weights in {path}: {error}") from error
    raise CheckpointError(f"{path} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")


def _check_same_lora(current, loaded, path):
    """The adapter on disk must have the current adapter's r, alpha and targets to replace its weights."""
    pairs = [("r", current.r, loaded.r), ("alpha", current.lora_alpha, loaded.lora_alpha),
             ("targets", sorted(current.target_modules), sorted(loaded.target_modules))]
    diffs = [f"{name}: adapter {theirs}, model {mine}" for name, mine, theirs in pairs if mine != theirs]
    if diffs:
        raise CheckpointError(f"adapter {path} does not match the model's adapter ("
                              + "; ".join(diffs) + ")" + (" — rank mismatch" if current.r != loaded.r else ""))


def _adapter_config_dict(lora):
    """adapter_config.json contents: the basic LoRA keys plus any non-default newer field."""
    config = lora.to_dict()
    defaults = LoraConfig().to_dict()
    out = {}
    for key, value in config.items():
        if key in _BASIC_ADAPTER_KEYS or (key != "peft_version" and value != defaults.get(key)):
            out[key] = sorted(value) if isinstance(value, set) else value
    out["peft_type"] = "LORA"
    return out


def _write_json(path, data):
    """Write JSON atomically: temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(new, target):
    """Put directory new in place of target (which may exist): old moved aside, new renamed, old removed."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)
