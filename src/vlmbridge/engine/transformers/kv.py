"""Batch surgery on transformers' DynamicCache: join sequences of different lengths, drop finished ones.

Sequences share one cache, left-padded to a common length; the attention mask hides the padding. Every layer
holds `keys`/`values` of shape (batch, kv_heads, length, head_dim).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "concat_caches",
    "left_pad_cache",
    "select_rows",
    "supports_batch_surgery",
    "trim_left",
]


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def supports_batch_surgery(cache: Any) -> bool:
    """Only plain full-attention layers can be padded and concatenated safely (no sliding windows)."""
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def left_pad_cache(cache: Any, n: int) -> None:
    import torch

    if n <= 0:
        return
    for layer in _layers(cache):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        b, h, _, d = layer.keys.shape
        pad_k = torch.zeros((b, h, n, d), dtype=layer.keys.dtype, device=layer.keys.device)
        pad_v = torch.zeros((b, h, n, layer.values.shape[-1]), dtype=layer.values.dtype, device=layer.values.device)
        layer.keys = torch.cat([pad_k, layer.keys], dim=2)
        layer.values = torch.cat([pad_v, layer.values], dim=2)


def concat_caches(target: Any, other: Any) -> None:
    """Append `other`'s rows to `target` (both already padded to the same length)."""
    import torch

    for mine, theirs in zip(_layers(target), _layers(other), strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)


def select_rows(cache: Any, rows: list[int]) -> None:
    import torch

    index = None
    for layer in _layers(cache):
        if index is None:
            index = torch.tensor(rows, dtype=torch.long, device=layer.keys.device)
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)


def trim_left(cache: Any, n: int) -> None:
    """Drop the first n positions (padding every remaining row has)."""
    if n <= 0:
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, n:, :].contiguous()
        layer.values = layer.values[:, :, n:, :].contiguous()
