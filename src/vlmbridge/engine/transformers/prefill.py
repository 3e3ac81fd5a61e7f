"""Prefill: turning prompts into KV cache and a first token, reusing what earlier turns already computed.

Prompts that share a cached prefix (an earlier turn of the same conversation) prefill only their new tail on top of
the cached KV; the others are prefilled together in one left-padded batch. Images reach the model as encoder
outputs, computed once per image content and pixel budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.transformers.batch import pack_prompts, prefill_positions
from vlmbridge.engine.transformers.caches import PrefixCache, PrefixHit, prompt_keys
from vlmbridge.engine.transformers.family import IMAGE_INPUTS, VIDEO_INPUTS
from vlmbridge.engine.transformers.sequence import FaultHook, Sequence, describe
from vlmbridge.engine.transformers.vision import VisionFeatures, image_slices, video_slices

__all__ = ["Prefilled", "Prefiller"]

log = logging.getLogger(__name__)


@dataclass
class Prefilled:
    """Sequences still running after their first token, with their KV rows and attention mask."""

    seqs: list[Sequence]
    cache: Any
    mask: Any


class Prefiller:
    def __init__(
        self,
        model: Any,
        device: Any,
        pad_id: int,
        rope_index: Callable[..., tuple[Any, Any]] | None,
        cache_kw: str,
        new_cache: Callable[[list[tuple[Any, Any]] | None], Any],
        prefix_cache: PrefixCache | None,
        vision: VisionFeatures | None,
    ) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.rope_index = rope_index
        self.cache_kw = cache_kw
        self.new_cache = new_cache
        self.prefix_cache = prefix_cache
        self.vision = vision
        self.fault_hook: FaultHook | None = None  # test-only, see TransformersEngine.fault_hook

    # --- prefix reuse -------------------------------------------------------------------------------------
    def find_prefix(self, seq: Sequence) -> PrefixHit | None:
        if self.prefix_cache is None:
            return None
        inputs = seq.prepared.inputs
        hit = self.prefix_cache.lookup(
            self._keys(seq), reusable_limit=inputs.prompt_tokens - 1
        )  # >= 1 token left to run
        if hit is None:
            return None
        length = hit.length
        for start, end in inputs.media_spans:  # never split an image or clip between cache and prefill
            if start < length < end:
                length = start
        if length <= 0:
            return None
        if length < hit.length:
            hit = PrefixHit(length=length, layers=[(k[:, :, :length], v[:, :, :length]) for k, v in hit.layers])
        return hit

    @staticmethod
    def _keys(seq: Sequence) -> list[Hashable]:
        """The prompt's content keys, worked out once per request (lookup at start, filing at the end)."""
        if seq.prompt_keys is None:
            inputs = seq.prepared.inputs
            seq.prompt_keys = prompt_keys(
                inputs.input_ids[0].tolist(), inputs.media_spans, inputs.image_keys + inputs.video_keys
            )
        return seq.prompt_keys

    def retire(self, seq: Sequence, cache: Any, mask_row: Any, row: int) -> None:
        """A finished sequence leaves: its KV is filed for reuse, then its last output goes out."""
        try:
            self.remember(seq, cache, mask_row, row)
        finally:
            seq.release()

    def remember(self, seq: Sequence, cache: Any, mask_row: Any, row: int) -> None:
        """Keep a finished sequence's KV (prompt + all generated tokens but the last, which was never fed).

        A failure here only means this turn is not cached; the request itself has finished.
        """
        if self.prefix_cache is None or seq.finish not in ("stop", "length", "abort"):
            return
        try:
            if self.fault_hook is not None:
                self.fault_hook("remember", seq.request_id)
            self._store(seq, cache, mask_row, row)
        except Exception as exc:
            log.warning("could not keep the KV of %s for reuse: %s", seq.request_id, describe(exc))

    def _store(self, seq: Sequence, cache: Any, mask_row: Any, row: int) -> None:
        assert self.prefix_cache is not None
        keys = self._keys(seq) + seq.tokens[:-1]
        n = int(mask_row.sum())
        if n != len(keys):  # the cache row does not hold what we think: do not risk serving it
            return
        layers = [(layer.keys[row : row + 1, :, -n:, :].clone(), layer.values[row : row + 1, :, -n:, :].clone())
                  for layer in cache.layers]  # fmt: skip
        self.prefix_cache.store(keys, layers)

    # --- running ------------------------------------------------------------------------------------------
    def _encoder_outputs(self, seqs: list[Sequence], after: int = 0) -> dict[str, Any]:
        """mm_encoder_outputs for every image (whose placeholders start at or after `after`), in row order."""
        if self.vision is None:
            return {}
        images = [i for s in seqs for i in image_slices(s.prepared.inputs) if i.span[0] >= after]
        clips = [i for s in seqs for i in video_slices(s.prepared.inputs) if i.span[0] >= after]
        outputs = {
            "image": self.vision.encode(images, self.device),
            "video": self.vision.encode(clips, self.device, video=True),
        }
        outputs = {kind: features for kind, features in outputs.items() if features is not None}
        return {"mm_encoder_outputs": outputs} if outputs else {}

    def _finish(self, seqs: list[Sequence], logits: Any, cache: Any, mask: Any) -> Prefilled | None:
        for row, seq in enumerate(seqs):
            seq.step(logits[row], self.fault_hook)  # a failure ends this row only
            if seq.finish is not None:
                self.retire(seq, cache, mask[row], row)
        keep = [i for i, s in enumerate(seqs) if s.finish is None]
        if not keep:
            return None
        if len(keep) < len(seqs):
            from vlmbridge.engine.transformers import kv

            kv.select_rows(cache, keep)
            mask = mask[keep]
        return Prefilled([seqs[i] for i in keep], cache, mask)

    def together(self, seqs: list[Sequence]) -> Prefilled | None:
        """One left-padded forward pass for prompts without a cached prefix."""
        packed = pack_prompts([s.prepared.inputs for s in seqs], self.pad_id, self.device)
        position_ids, text_next, rope_next = prefill_positions(packed, self.rope_index)
        if self.vision is not None:  # images go in as encoder outputs (cached per image)
            for key in (*IMAGE_INPUTS, *VIDEO_INPUTS):
                packed.pop(key, None)
        cache = self.new_cache(None)
        out = self.model(
            **packed, **self._encoder_outputs(seqs), position_ids=position_ids, use_cache=True, logits_to_keep=1,
            **{self.cache_kw: cache},
        )  # fmt: skip
        for row, seq in enumerate(seqs):
            seq.text_pos, seq.rope_pos = text_next[row], rope_next[row]
        return self._finish(seqs, out.logits[:, -1, :], cache, packed["attention_mask"])

    def on_prefix(self, seq: Sequence, hit: PrefixHit) -> Prefilled | None:
        """Prefill only the part of the prompt after the cached prefix."""
        import torch

        full = pack_prompts([seq.prepared.inputs], self.pad_id, self.device)
        # Positions come from the whole prompt (M-RoPE positions depend on every image before them).
        position_ids, text_next, rope_next = prefill_positions(full, self.rope_index)
        start = hit.length
        tail: dict[str, Any] = {"input_ids": full["input_ids"][:, start:], "attention_mask": full["attention_mask"]}
        if "mm_token_type_ids" in full:
            tail["mm_token_type_ids"] = full["mm_token_type_ids"][:, start:]
        cache = self.new_cache([(k.to(self.device), v.to(self.device)) for k, v in hit.layers])
        out = self.model(
            **tail, **self._encoder_outputs([seq], after=start), position_ids=position_ids[..., start:],
            use_cache=True, logits_to_keep=1, **{self.cache_kw: cache},
        )  # fmt: skip
        seq.text_pos, seq.rope_pos, seq.cached_tokens = text_next[0], rope_next[0], start
        mask = torch.ones_like(full["attention_mask"])
        return self._finish([seq], out.logits[:, -1, :], cache, mask)
