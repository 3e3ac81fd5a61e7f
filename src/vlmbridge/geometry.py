"""Model geometry from config.json (layers, KV heads, vision tower, pixel limits) and the token math on it:
image tokens under a pixel budget (a pure-Python copy of transformers' `smart_resize`) and KV bytes per token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlmbridge.families import family_for

__all__ = [
    "ModelGeometry",
    "VisionGeometry",
    "geometry_from_config",
    "image_tokens",
    "kv_bytes_per_token",
    "smart_resize",
    "tokens_for_image",
]

_DEFAULT_PIXELS = {16: (65536, 16777216), 14: (3136, 12845056)}  # Qwen3-VL / Qwen2(.5)-VL processor defaults


# --- geometry ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionGeometry:
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    hidden: int
    intermediate: int
    depth: int
    in_channels: int
    out_hidden: int
    deepstack_layers: int
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class ModelGeometry:
    """The config numbers the estimate needs (language model, and the vision tower for VLMs)."""

    layers: int
    kv_layers: int  # layers that keep a KV cache (linear-attention layers do not)
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int  # per token: dense MLP width, or active experts × expert width for MoE
    vocab: int
    max_context: int
    vision: VisionGeometry | None = None


def _int(source: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = source.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is None:
        raise ValueError(f"config lacks a positive integer {' / '.join(keys)}")
    return default


def _pixels(processor: Mapping[str, Any] | None, patch: int) -> tuple[int, int]:
    lo, hi = _DEFAULT_PIXELS.get(patch, _DEFAULT_PIXELS[16])
    if not processor:
        return lo, hi
    raw = processor.get("size")
    size: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    lo = _int(processor, "min_pixels", default=_int(size, "shortest_edge", "min_pixels", default=lo))
    hi = _int(processor, "max_pixels", default=_int(size, "longest_edge", "max_pixels", default=hi))
    return lo, hi


def geometry_from_config(config: Mapping[str, Any], processor: Mapping[str, Any] | None = None) -> ModelGeometry:
    """Read the geometry from a config.json (flat legacy or nested text_config). Raises ValueError if incomplete."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    assert isinstance(text, Mapping)
    layers = _int(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(text, "num_attention_heads", "n_head")
    hidden = _int(text, "hidden_size", "n_embd")
    kinds = text.get("layer_types")
    kv_layers = layers
    if isinstance(kinds, list) and len(kinds) == layers:
        kv_layers = sum(1 for k in kinds if isinstance(k, str) and "linear" not in k) or layers
    experts_per_tok = text.get("num_experts_per_tok")
    if isinstance(experts_per_tok, int) and isinstance(text.get("moe_intermediate_size"), int):
        intermediate = experts_per_tok * int(text["moe_intermediate_size"])
    else:
        intermediate = _int(text, "intermediate_size", "ffn_dim", default=4 * hidden)
    head_dim = _int(text, "head_dim", default=hidden // heads)
    vision = _vision_geometry(config, processor, hidden)
    return ModelGeometry(
        layers=layers,
        kv_layers=kv_layers,
        kv_heads=_int(text, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        hidden=hidden,
        intermediate=intermediate,
        vocab=_int(text, "vocab_size", default=_int(config, "vocab_size", default=1)),
        max_context=_int(
            text, "max_position_embeddings", default=_int(config, "max_position_embeddings", default=4096)
        ),
        vision=vision,
    )


def _vision_geometry(
    config: Mapping[str, Any], processor: Mapping[str, Any] | None, text_hidden: int
) -> VisionGeometry | None:
    vc = config.get("vision_config")
    if not isinstance(vc, Mapping):
        return None
    fam = family_for(config.get("model_type") if isinstance(config.get("model_type"), str) else None)
    proc = processor or {}
    patch = _int(vc, "patch_size", default=_int(proc, "patch_size", default=fam.patch_size if fam else 14))
    merge = _int(vc, "spatial_merge_size", default=_int(proc, "merge_size", default=fam.merge_size if fam else 2))
    # Qwen2-VL calls the vision width embed_dim and uses hidden_size for the merger's output.
    width = _int(vc, "embed_dim", "hidden_size")
    ratio = vc.get("mlp_ratio")
    inter = _int(vc, "intermediate_size", default=int(width * ratio) if isinstance(ratio, int | float) else 4 * width)
    deepstack = vc.get("deepstack_visual_indexes")
    lo, hi = _pixels(processor, patch)
    return VisionGeometry(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=_int(vc, "temporal_patch_size", default=2),
        hidden=width,
        intermediate=inter,
        depth=_int(vc, "depth", "num_hidden_layers", default=1),
        in_channels=_int(vc, "in_channels", "in_chans", default=3),
        out_hidden=_int(vc, "out_hidden_size", default=text_hidden),
        deepstack_layers=len(deepstack) if isinstance(deepstack, list) else 0,
        min_pixels=lo,
        max_pixels=hi,
    )


# --- tokens ------------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' `qwen2_vl.image_processing_qwen2_vl.smart_resize`, without torch: sides become multiples of
    `factor` and the area lands within [min_pixels, max_pixels], keeping the aspect ratio."""
    if height <= 0 or width <= 0:
        raise ValueError("image sides must be positive")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width):g}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def tokens_for_image(
    width: int, height: int, *, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int
) -> int:
    """The one image-token rule (engine, doctor and plan all use it): `<|image_pad|>` tokens for a width×height
    image resized into [min_pixels, max_pixels], the 2 boundary tokens not included."""
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return (h // patch_size) * (w // patch_size) // (merge_size**2)


def image_tokens(width: int, height: int, vision: VisionGeometry, max_pixels: int | None = None) -> int:
    """`<|image_pad|>` tokens for one image under the pixel budget, from the model's vision geometry."""
    cap = min(vision.max_pixels, max_pixels) if max_pixels else vision.max_pixels
    return tokens_for_image(
        width, height, patch_size=vision.patch_size, merge_size=vision.merge_size,
        min_pixels=min(vision.min_pixels, cap), max_pixels=cap,
    )  # fmt: skip


def kv_bytes_per_token(geo: ModelGeometry, dtype_bytes: int = 2) -> int:
    """2 (K and V) × layers × kv_heads × head_dim × bytes: 144 KiB for Qwen3-VL-8B in bf16."""
    return 2 * geo.kv_layers * geo.kv_heads * geo.head_dim * dtype_bytes
