"""The tensors a checkpoint must hold, names and shapes, computed from config.json alone (no torch).

transformers builds these models from a handful of config values, so their state dict is a pure function of them;
importing torch to build one on the meta device would cost the doctor ~2.5 s. A test keeps every family's table
equal to the real model built on the meta device, and defaults equal to transformers' config classes.

Names here are the model's own (transformers 5: `model.language_model.*`, `model.visual.*`). `canonical_name` maps
what a checkpoint stores onto them the way the loader does (legacy Qwen2/2.5-VL names, a base-model prefix), and
`stored_naming` maps them back, so messages name tensors as the checkpoint spells them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "VISION_PREFIX",
    "Shape",
    "TensorSpec",
    "canonical_name",
    "expected_tensors",
    "ignorable",
    "stored_naming",
]

Shape = tuple[int, ...]
_MAX_BLOCKS = 10_000  # the largest models have ~100 layers
VISION_PREFIX = "model.visual."
# Buffers older exports saved that transformers drops on load without a word (modeling_utils
# `_adjust_missing_and_unexpected_keys`): never worth a warning.
_IGNORABLE = re.compile(r"(rotary_emb|rotary_pos_emb)\.inv_freq$|(^|\.)position_ids$")
# Qwen2/2.5-VL checkpoints from before transformers 4.52 (every official repo) keep the flat names; transformers'
# conversion mapping for Qwen2VLForConditionalGeneration renames them on load and back on save.
_LEGACY_VL = ("qwen2_vl", "qwen2_5_vl")
_LEGACY_VISUAL = re.compile(r"^visual\.")
_LEGACY_TEXT = re.compile(r"^model\.(?!language_model\.|visual\.)")


@dataclass(frozen=True)
class TensorSpec:
    shapes: tuple[Shape, ...]  # shapes the loader accepts, the model's own first
    tied_with: str | None = None  # tie_word_embeddings: may be absent when this tensor is stored

    @property
    def shape(self) -> Shape:
        return self.shapes[0]


class _Unusable(ValueError):
    """A config value the table cannot use (not an int, negative): leave the verdict to the config checks."""


class _Values:
    """A config section with transformers' class defaults behind it; every size read is a non-negative int."""

    def __init__(self, values: Any, defaults: Mapping[str, Any]) -> None:
        self.values: Mapping[str, Any] = values if isinstance(values, dict) else {}
        self.defaults = defaults

    def raw(self, key: str, *aliases: str) -> Any:
        for k in (key, *aliases):  # aliases: the config class's attribute_map
            if k in self.values:
                return self.values[k]
        return self.defaults.get(key)

    def size(self, key: str, *aliases: str) -> int:
        return _as_int(self.raw(key, *aliases), key)

    def count(self, key: str, *aliases: str) -> int:
        """A number of layers or blocks, which the table loops over: a garbage value must not hang the doctor."""
        value = self.size(key, *aliases)
        if value > _MAX_BLOCKS:
            raise _Unusable(key)
        return value

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise _Unusable(key)
        return value


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Unusable(key)
    return value


# Defaults of transformers' config classes for the keys the tables read (configuration_<family>.py).
_QWEN2_TEXT = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False,
}  # fmt: skip
_QWEN2_VL_TEXT = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8,
}  # fmt: skip
_QWEN2_VL_VISION = {
    "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "in_channels": 3, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2,
}  # fmt: skip
_QWEN2_5_VL_VISION = {
    "depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "in_channels": 3, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584,
}  # fmt: skip
_QWEN3_VL_TEXT = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "attention_bias": False,
}  # fmt: skip
_QWEN3_VL_MOE_TEXT = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": None, "attention_bias": False,
    "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "num_experts": 60, "mlp_only_layers": None,
}  # fmt: skip
_QWEN3_VL_VISION = {
    "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "in_channels": 3, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584, "num_position_embeddings": 2304,
    "deepstack_visual_indexes": (8, 16, 24),
}  # fmt: skip


class _Table:
    """Collects name → spec in the model's own order."""

    def __init__(self) -> None:
        self.specs: dict[str, TensorSpec] = {}

    def add(self, name: str, *shapes: Shape) -> None:
        self.specs[name] = TensorSpec(tuple(shapes))

    def linear(self, name: str, out_dim: int, in_dim: int, *, bias: bool) -> None:
        self.add(f"{name}.weight", (out_dim, in_dim))
        if bias:
            self.add(f"{name}.bias", (out_dim,))

    def norm(self, name: str, dim: int, *, bias: bool = False) -> None:
        self.add(f"{name}.weight", (dim,))
        if bias:
            self.add(f"{name}.bias", (dim,))

    def tie(self, a: str, b: str) -> None:
        # transformers ties symmetrically on load: whichever of the two is stored fills the other.
        self.specs[a] = TensorSpec(self.specs[a].shapes, tied_with=b)
        self.specs[b] = TensorSpec(self.specs[b].shapes, tied_with=a)


@dataclass(frozen=True)
class _Decoder:
    """What differs between the Qwen text decoders."""

    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    head_dim: int


def _decoder(t: _Table, prefix: str, text: _Values, d: _Decoder, moe: Callable[[int], bool] | None = None) -> None:
    hidden, vocab = text.size("hidden_size"), text.size("vocab_size")
    heads, layers = text.size("num_attention_heads"), text.count("num_hidden_layers")
    kv_raw = text.raw("num_key_value_heads")
    kv = heads if kv_raw is None else _as_int(kv_raw, "num_key_value_heads")  # None means "as many as heads"
    t.add(f"{prefix}embed_tokens.weight", (vocab, hidden))
    for i in range(layers):
        layer = f"{prefix}layers.{i}"
        t.norm(f"{layer}.input_layernorm", hidden)
        t.norm(f"{layer}.post_attention_layernorm", hidden)
        attn = f"{layer}.self_attn"
        t.linear(f"{attn}.q_proj", heads * d.head_dim, hidden, bias=d.qkv_bias)
        t.linear(f"{attn}.k_proj", kv * d.head_dim, hidden, bias=d.qkv_bias)
        t.linear(f"{attn}.v_proj", kv * d.head_dim, hidden, bias=d.qkv_bias)
        t.linear(f"{attn}.o_proj", hidden, heads * d.head_dim, bias=d.o_bias)
        if d.qk_norm:
            t.norm(f"{attn}.q_norm", d.head_dim)
            t.norm(f"{attn}.k_norm", d.head_dim)
        if moe is not None and moe(i):
            _experts(t, f"{layer}.mlp", text, hidden)
        else:
            inter = text.size("intermediate_size")
            t.linear(f"{layer}.mlp.gate_proj", inter, hidden, bias=False)
            t.linear(f"{layer}.mlp.up_proj", inter, hidden, bias=False)
            t.linear(f"{layer}.mlp.down_proj", hidden, inter, bias=False)
    t.norm(f"{prefix}norm", hidden)


def _experts(t: _Table, mlp: str, text: _Values, hidden: int) -> None:
    experts, inter = text.size("num_experts", "num_local_experts"), text.size("moe_intermediate_size")
    t.add(f"{mlp}.gate.weight", (experts, hidden))
    # Fused experts. The official Qwen3-VL-MoE repos (and transformers 4.57) store them transposed; transformers 5
    # transposes on load when the shape differs (conversion_mapping "qwen3_vl_moe", Transpose(check_dims=True)).
    t.add(f"{mlp}.experts.gate_up_proj", (experts, 2 * inter, hidden), (experts, hidden, 2 * inter))
    t.add(f"{mlp}.experts.down_proj", (experts, hidden, inter), (experts, inter, hidden))


def _lm_head(t: _Table, embed: str, text: _Values, tied: bool) -> None:
    t.add("lm_head.weight", (text.size("vocab_size"), text.size("hidden_size")))
    if tied:
        t.tie("lm_head.weight", embed)


def _patch_embed(t: _Table, prefix: str, vision: _Values, width: int, *, bias: bool) -> None:
    patch = vision.size("patch_size")
    kernel = (width, vision.size("in_channels", "in_chans"), vision.size("temporal_patch_size"), patch, patch)
    t.add(f"{prefix}patch_embed.proj.weight", kernel)
    if bias:
        t.add(f"{prefix}patch_embed.proj.bias", (width,))


def _vision_attention(t: _Table, block: str, width: int) -> None:
    t.linear(f"{block}.attn.qkv", 3 * width, width, bias=True)
    t.linear(f"{block}.attn.proj", width, width, bias=True)


def _qwen2(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    text = _Values(config, _QWEN2_TEXT)
    hidden, heads = text.size("hidden_size"), text.size("num_attention_heads")
    head_dim = text.raw("head_dim")  # Qwen2Attention: getattr(config, "head_dim", hidden // heads)
    d = _Decoder(qkv_bias=True, o_bias=False, qk_norm=False, head_dim=_head_dim(head_dim, hidden, heads))
    t = _Table()
    _decoder(t, "model.", text, d)
    _lm_head(t, "model.embed_tokens.weight", text, text.flag("tie_word_embeddings"))
    return t.specs


def _head_dim(value: Any, hidden: int, heads: int) -> int:
    if value is None:
        if heads == 0:
            raise _Unusable("num_attention_heads")
        return hidden // heads
    return _as_int(value, "head_dim")


def _qwen2_vl_text(config: Mapping[str, Any], t: _Table) -> _Values:
    """The Qwen2/2.5-VL language model; legacy configs keep its fields at the top level."""
    nested = config.get("text_config")
    text = _Values(nested if isinstance(nested, dict) else config, _QWEN2_VL_TEXT)
    hidden, heads = text.size("hidden_size"), text.size("num_attention_heads")
    if heads == 0:
        raise _Unusable("num_attention_heads")
    d = _Decoder(qkv_bias=True, o_bias=False, qk_norm=False, head_dim=hidden // heads)  # head_dim is ignored
    _decoder(t, "model.language_model.", text, d)
    # The outer flag, or (pre-v5 saves) text_config's: Qwen2VLConfig.__post_init__ forwards it.
    tied = config.get("tie_word_embeddings") is True or (
        isinstance(nested, dict) and text.raw("tie_word_embeddings") is True
    )
    _lm_head(t, "model.language_model.embed_tokens.weight", text, tied)
    return text


def _qwen2_vl(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    t = _Table()
    _qwen2_vl_text(config, t)
    v = _Values(config.get("vision_config"), _QWEN2_VL_VISION)
    p = VISION_PREFIX
    width, merged = v.size("embed_dim"), v.size("embed_dim") * v.size("spatial_merge_size") ** 2
    mlp = width * v.size("mlp_ratio")  # an int: transformers' strict config rejects a float
    _patch_embed(t, p, v, width, bias=False)
    for i in range(v.count("depth", "num_hidden_layers")):
        block = f"{p}blocks.{i}"
        t.norm(f"{block}.norm1", width, bias=True)
        t.norm(f"{block}.norm2", width, bias=True)
        _vision_attention(t, block, width)
        t.linear(f"{block}.mlp.fc1", mlp, width, bias=True)
        t.linear(f"{block}.mlp.fc2", width, mlp, bias=True)
    t.norm(f"{p}merger.ln_q", width, bias=True)
    t.linear(f"{p}merger.mlp.0", merged, merged, bias=True)
    t.linear(f"{p}merger.mlp.2", v.size("hidden_size"), merged, bias=True)
    return _ordered(t.specs)


def _qwen2_5_vl(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    t = _Table()
    _qwen2_vl_text(config, t)
    v = _Values(config.get("vision_config"), _QWEN2_5_VL_VISION)
    p = VISION_PREFIX
    width, inter = v.size("hidden_size"), v.size("intermediate_size")
    merged = width * v.size("spatial_merge_size") ** 2
    _patch_embed(t, p, v, width, bias=False)
    for i in range(v.count("depth", "num_hidden_layers")):
        block = f"{p}blocks.{i}"
        t.norm(f"{block}.norm1", width)  # RMSNorm: no bias
        t.norm(f"{block}.norm2", width)
        _vision_attention(t, block, width)
        t.linear(f"{block}.mlp.gate_proj", inter, width, bias=True)
        t.linear(f"{block}.mlp.up_proj", inter, width, bias=True)
        t.linear(f"{block}.mlp.down_proj", width, inter, bias=True)
    t.norm(f"{p}merger.ln_q", width)
    t.linear(f"{p}merger.mlp.0", merged, merged, bias=True)
    t.linear(f"{p}merger.mlp.2", v.size("out_hidden_size"), merged, bias=True)
    return _ordered(t.specs)


def _qwen3_vl_vision(t: _Table, config: Mapping[str, Any]) -> None:
    v = _Values(config.get("vision_config"), _QWEN3_VL_VISION)
    p = VISION_PREFIX
    width, inter, out = v.size("hidden_size"), v.size("intermediate_size"), v.size("out_hidden_size")
    merged = width * v.size("spatial_merge_size") ** 2
    _patch_embed(t, p, v, width, bias=True)
    t.add(f"{p}pos_embed.weight", (v.size("num_position_embeddings"), width))
    for i in range(v.count("depth", "num_hidden_layers")):
        block = f"{p}blocks.{i}"
        t.norm(f"{block}.norm1", width, bias=True)
        t.norm(f"{block}.norm2", width, bias=True)
        _vision_attention(t, block, width)
        t.linear(f"{block}.mlp.linear_fc1", inter, width, bias=True)
        t.linear(f"{block}.mlp.linear_fc2", width, inter, bias=True)
    t.norm(f"{p}merger.norm", width, bias=True)  # before the 2×2 shuffle
    t.linear(f"{p}merger.linear_fc1", merged, merged, bias=True)
    t.linear(f"{p}merger.linear_fc2", out, merged, bias=True)
    deepstack = v.raw("deepstack_visual_indexes")
    if not isinstance(deepstack, list | tuple):
        raise _Unusable("deepstack_visual_indexes")
    for k in range(len(deepstack)):
        merger = f"{p}deepstack_merger_list.{k}"
        t.norm(f"{merger}.norm", merged, bias=True)  # after the shuffle
        t.linear(f"{merger}.linear_fc1", merged, merged, bias=True)
        t.linear(f"{merger}.linear_fc2", out, merged, bias=True)


def _qwen3_vl(config: Mapping[str, Any], *, moe: bool) -> dict[str, TensorSpec]:
    # Qwen3VLConfig reads only text_config (top-level text fields are ignored, unlike Qwen2/2.5-VL).
    text = _Values(config.get("text_config"), _QWEN3_VL_MOE_TEXT if moe else _QWEN3_VL_TEXT)
    bias = text.flag("attention_bias")
    head_dim = _head_dim(text.raw("head_dim"), text.size("hidden_size"), text.size("num_attention_heads"))
    d = _Decoder(qkv_bias=bias, o_bias=bias, qk_norm=True, head_dim=head_dim)
    t = _Table()
    _decoder(t, "model.language_model.", text, d, _sparse_layers(text) if moe else None)
    _lm_head(t, "model.language_model.embed_tokens.weight", text, config.get("tie_word_embeddings") is True)
    _qwen3_vl_vision(t, config)
    return _ordered(t.specs)


def _sparse_layers(text: _Values) -> Callable[[int], bool]:
    """Qwen3VLMoeTextDecoderLayer: experts unless listed in mlp_only_layers or off the decoder_sparse_step."""
    dense = text.raw("mlp_only_layers") or []
    if not isinstance(dense, list | tuple) or not all(isinstance(i, int) for i in dense):
        raise _Unusable("mlp_only_layers")
    step, experts = text.size("decoder_sparse_step"), text.size("num_experts", "num_local_experts")
    if step == 0:
        raise _Unusable("decoder_sparse_step")
    return lambda i: i not in dense and experts > 0 and (i + 1) % step == 0


def _ordered(specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    # The model's module order: visual tower, language model, then the head (messages list the first few).
    def rank(name: str) -> int:
        return 0 if name.startswith(VISION_PREFIX) else 2 if name == "lm_head.weight" else 1

    return dict(sorted(specs.items(), key=lambda kv: rank(kv[0])))


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], dict[str, TensorSpec]]] = {
    "qwen2": _qwen2,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": lambda c: _qwen3_vl(c, moe=False),
    "qwen3_vl_moe": lambda c: _qwen3_vl(c, moe=True),
}


def expected_tensors(config: Mapping[str, Any]) -> dict[str, TensorSpec] | None:
    """Model tensor name → accepted shapes, for the families vlmbridge knows; None for any other model_type or a
    config whose sizes are not usable (the config checks report those)."""
    build = _BUILDERS.get(str(config.get("model_type")))
    if build is None:
        return None
    try:
        return build(config)
    except (_Unusable, OverflowError, MemoryError):
        return None


def canonical_name(model_type: str, stored: str, expected: Mapping[str, Any]) -> str:
    """The model tensor a stored name loads into, as transformers renames it (core_model_loading.rename_source_key):
    the family's conversion renames, then the base-model prefix added or stripped where that makes it match."""
    name = stored
    if model_type in _LEGACY_VL:
        name = _LEGACY_VISUAL.sub("model.visual.", name)
        name = _LEGACY_TEXT.sub("model.language_model.", name)
    if name not in expected:
        if f"model.{name}" in expected:
            name = f"model.{name}"
        elif name.startswith("model.") and name[6:] in expected:
            name = name[6:]
    return name


def stored_naming(model_type: str, stored: Iterable[str]) -> Callable[[str], str]:
    """Canonical name → how this checkpoint spells it, so a missing tensor is named as the user would grep it."""
    if model_type in _LEGACY_VL and any(_LEGACY_VISUAL.match(s) or _LEGACY_TEXT.match(s) for s in stored):

        def legacy(name: str) -> str:
            if name.startswith(VISION_PREFIX):
                return "visual." + name.removeprefix(VISION_PREFIX)
            return re.sub(r"^model\.language_model\.", "model.", name)

        return legacy
    return lambda name: name


def ignorable(stored: str) -> bool:
    return _IGNORABLE.search(stored) is not None
