"""Caches that make follow-up turns cheap: finished requests' KV cache by token prefix, vision-encoder outputs, and
processed pixels.

Chat clients (Dify included) resend the whole conversation, images and all, every turn. The caches are keyed by
content, never by request: a prompt position holds its token id, or — for image placeholder tokens — the image's
digest (of its bytes) and pixel budget, so the same text with a different picture (even of the same size) never
matches. All are LRU within a byte budget.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["CacheStats", "EncoderCache", "PixelCache", "PrefixCache", "PrefixHit", "ProcessedPixels", "prompt_keys"]

V = TypeVar("V")
BLOCK = 16  # prefix lookups walk hashed blocks of this many positions, then compare the rest one by one


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


def prompt_keys(
    input_ids: Sequence[int], image_spans: Sequence[tuple[int, int]], image_keys: Sequence[str]
) -> list[Hashable]:
    """One key per prompt position: the token id, or (image key, offset) inside an image's placeholder run."""
    keys: list[Hashable] = list(input_ids)
    for (start, end), image in zip(image_spans, image_keys, strict=True):
        for offset in range(end - start):
            keys[start + offset] = (image, offset)
    return keys


def _block_hashes(keys: Sequence[Hashable]) -> list[int]:
    hashes, running = [], 0
    for start in range(0, len(keys) - BLOCK + 1, BLOCK):
        running = hash((running, tuple(keys[start : start + BLOCK])))
        hashes.append(running)
    return hashes


def _nbytes(layers: Sequence[tuple[Any, Any]]) -> int:
    return sum(int(k.numel() * k.element_size() + v.numel() * v.element_size()) for k, v in layers)


@dataclass
class _Entry:
    keys: list[Hashable]
    layers: list[tuple[Any, Any]]  # per layer (keys, values), shape (1, kv_heads, len(keys), head_dim)
    nbytes: int
    blocks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PrefixHit:
    length: int  # positions whose KV can be reused
    layers: list[tuple[Any, Any]]  # views of the cached tensors, cut to `length`


class PrefixCache:
    """KV of finished sequences, found again by the longest common prefix of a new prompt."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._by_block: dict[int, set[int]] = {}
        self._ids = itertools.count()

    def lookup(self, keys: Sequence[Hashable], *, reusable_limit: int) -> PrefixHit | None:
        """Longest cached prefix of `keys`, at most `reusable_limit` positions long."""
        best_id, matched = None, 0
        for depth, block in enumerate(_block_hashes(keys)):
            holders = self._by_block.get(block)
            if not holders:
                break
            best_id, matched = next(iter(holders)), (depth + 1) * BLOCK
        if best_id is None:  # not even one block in common: nothing worth reusing
            self.stats.misses += 1
            return None
        entry = self._entries[best_id]
        limit = min(len(entry.keys), len(keys))
        while matched < limit and entry.keys[matched] == keys[matched]:
            matched += 1
        length = min(matched, reusable_limit)
        if length <= 0:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(best_id)
        self.stats.hits += 1
        return PrefixHit(length=length, layers=[(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers])

    def store(self, keys: list[Hashable], layers: list[tuple[Any, Any]]) -> None:
        nbytes = _nbytes(layers)
        if nbytes > self.budget or len(keys) < BLOCK:
            return
        for entry_id, entry in list(self._entries.items()):
            if entry.keys[: len(keys)] == keys:  # the same sequence, or a longer one, is already cached
                self._entries.move_to_end(entry_id)
                return
            if keys[: len(entry.keys)] == entry.keys:  # ours extends a cached one: keep only ours
                self._drop(entry_id)
        while self._entries and self.stats.bytes + nbytes > self.budget:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        entry_id = next(self._ids)
        entry = _Entry(keys=keys, layers=layers, nbytes=nbytes, blocks=_block_hashes(keys))
        self._entries[entry_id] = entry
        for block in entry.blocks:
            self._by_block.setdefault(block, set()).add(entry_id)
        self.stats.bytes += nbytes
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._by_block.clear()
        self.stats = CacheStats()

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        for block in entry.blocks:
            holders = self._by_block.get(block)
            if holders is not None:
                holders.discard(entry_id)
                if not holders:
                    del self._by_block[block]
        self.stats.bytes -= entry.nbytes
        self.stats.entries = len(self._entries)


class _LruByBytes(Generic[V]):
    """Items by image key, least recently used first out when a new one would pass the byte budget; an item
    larger than the whole budget is not kept. Prompts are built on several threads at once, hence the lock."""

    def __init__(self, budget_bytes: int, size: Callable[[V], int]) -> None:
        self.budget = budget_bytes
        self.stats = CacheStats()
        self._size = size
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.stats = CacheStats()

    def get(self, key: str) -> V | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return found[0]

    def put(self, key: str, item: V) -> None:
        nbytes = self._size(item)
        with self._lock:
            if nbytes > self.budget or key in self._items:
                return
            while self._items and self.stats.bytes + nbytes > self.budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self.stats.bytes -= dropped
                self.stats.evictions += 1
            self._items[key] = (item, nbytes)
            self.stats.bytes += nbytes
            self.stats.entries = len(self._items)


def _feature_bytes(parts: dict[str, Any]) -> int:
    # field name -> tensor, or a list of tensors for per-layer fields (deepstack)
    tensors = [t for v in parts.values() for t in (v if isinstance(v, list) else [v])]
    return sum(int(t.numel() * t.element_size()) for t in tensors)


class EncoderCache(_LruByBytes[dict[str, Any]]):
    """Vision-encoder outputs per image key (digest of the bytes + budget)."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes, _feature_bytes)


@dataclass(frozen=True)
class ProcessedPixels:
    """The image processor's output for one image: its patch rows and its (t, h, w) grid, shape (1, 3)."""

    pixel_values: Any
    image_grid_thw: Any

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in (self.pixel_values, self.image_grid_thw))


class PixelCache(_LruByBytes[Any]):
    """Processed pixels per image key (digest of the bytes + budget): a follow-up turn that resends a picture skips
    decoding it and the image processor. Clips (`videos.ProcessedVideo`, keys `video:…`) share it and its budget."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes, lambda item: item.nbytes)
