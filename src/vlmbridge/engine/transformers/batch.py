"""Batches: packing several prompts into one left-padded prefill, and the running decode batch.

Every sequence keeps its own positions: the text position counts its real tokens, and under M-RoPE (all Qwen-VL
families) the rotary position runs ahead by the request's own image offset (`rope_deltas`), which the model
would otherwise cache once for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmbridge.engine.transformers import kv
from vlmbridge.engine.transformers.family import IMAGE_INPUTS, VIDEO_INPUTS
from vlmbridge.engine.transformers.prompt import ModelInputs
from vlmbridge.engine.transformers.sequence import Sequence
from vlmbridge.errors import EngineFailedError

__all__ = ["RunningBatch", "pack_prompts", "prefill_positions"]

RopeIndex = Callable[..., tuple[Any, Any]]


def pack_prompts(inputs: list[ModelInputs], pad_id: int, device: Any) -> dict[str, Any]:
    """One left-padded batch from single prompts; images (any sizes) concatenated in row order."""
    import torch

    width = max(i.prompt_tokens for i in inputs)
    ids, mask, mm_types = [], [], []
    for item in inputs:
        row = item.tensors["input_ids"][0]
        pad = width - row.shape[0]
        ids.append(torch.cat([torch.full((pad,), pad_id, dtype=row.dtype), row]))
        mask.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(row.shape[0], dtype=torch.long)]))
        types = item.tensors.get("mm_token_type_ids")
        types = types[0] if types is not None else torch.zeros_like(row)
        mm_types.append(torch.cat([torch.zeros(pad, dtype=types.dtype), types]))
    packed: dict[str, Any] = {
        "input_ids": torch.stack(ids).to(device),
        "attention_mask": torch.stack(mask).to(device),
    }
    if any("mm_token_type_ids" in i.tensors for i in inputs):
        packed["mm_token_type_ids"] = torch.stack(mm_types).to(device)
    # The model scatters image features into placeholder positions in row-major order: concatenating each
    # prompt's patches in row order keeps every image with its own prompt.
    for key in (*IMAGE_INPUTS, *VIDEO_INPUTS):
        parts = [i.tensors[key] for i in inputs if key in i.tensors]
        if parts:
            packed[key] = torch.cat(parts, dim=0).to(device)
    return packed


def prefill_positions(packed: dict[str, Any], rope_index: RopeIndex | None) -> tuple[Any, list[int], list[int]]:
    """(position_ids for the forward, next text position per row, next rotary position per row)."""
    import torch

    mask = packed["attention_mask"]
    text_pos = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    lengths = [int(n) for n in mask.sum(dim=-1).tolist()]
    if rope_index is None:
        return text_pos, lengths, list(lengths)
    ids = packed["input_ids"]
    extra = {"second_per_grid_ts": packed["second_per_grid_ts"]} if "second_per_grid_ts" in packed else {}
    rope, deltas = rope_index(
        ids,
        mm_token_type_ids=packed.get("mm_token_type_ids", torch.zeros_like(ids)),
        image_grid_thw=packed.get("image_grid_thw"),
        video_grid_thw=packed.get("video_grid_thw"),
        attention_mask=mask,
        **extra,
    )
    rope_next = [n + int(d) for n, d in zip(lengths, deltas.reshape(-1).tolist(), strict=True)]
    return torch.cat([text_pos[None], rope], dim=0), lengths, rope_next


class RunningBatch:
    """Sequences decoding together over one left-padded KV cache and attention mask."""

    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.cache: Any = None
        self.mask: Any = None

    def __len__(self) -> int:
        return len(self.seqs)

    def join(self, seqs: list[Sequence], cache: Any, mask: Any) -> None:
        """Add rows (their cache and mask already hold exactly these sequences, in order).

        Raises EngineFailedError before changing anything when the rows cannot join; any other exception may
        leave the batch half-joined, and the caller must then give up the whole batch.
        """
        import torch

        if not seqs:
            return
        if not self.seqs:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            return
        if not kv.supports_batch_surgery(self.cache):
            raise EngineFailedError(
                "this model's cache layout cannot be batched; use max_batch_size=1", code="not_batchable"
            )
        cur, new = int(self.mask.shape[1]), int(mask.shape[1])
        if new < cur:
            kv.left_pad_cache(cache, cur - new)
            mask = torch.cat([mask.new_zeros((mask.shape[0], cur - new)), mask], dim=1)
        elif new > cur:
            kv.left_pad_cache(self.cache, new - cur)
            self.mask = torch.cat([self.mask.new_zeros((self.mask.shape[0], new - cur)), self.mask], dim=1)
        kv.concat_caches(self.cache, cache)
        self.mask = torch.cat([self.mask, mask], dim=0)
        self.seqs.extend(seqs)

    def drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.seqs) if s.finish is None]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.seqs, self.cache, self.mask = [], None, None
            return
        kv.select_rows(self.cache, keep)
        self.mask = self.mask[keep]
        self.seqs = [self.seqs[i] for i in keep]
        # Columns that are padding in every remaining row can go.
        lead = int((self.mask.cumsum(dim=1) == 0).all(dim=0).sum())
        if lead:
            kv.trim_left(self.cache, lead)
            self.mask = self.mask[:, lead:]

    def step_inputs(self, device: Any, mrope: bool) -> tuple[Any, Any, Any]:
        """(input_ids, attention_mask, position_ids) for one decode step of every row."""
        import torch

        ids = torch.tensor([[s.next_token] for s in self.seqs], dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.seqs), 1))], dim=1)
        text_pos = torch.tensor([[s.text_pos] for s in self.seqs], dtype=torch.long, device=device)
        if not mrope:
            return ids, self.mask, text_pos
        rope = torch.tensor([[s.rope_pos] for s in self.seqs], dtype=torch.long, device=device)
        return ids, self.mask, torch.cat([text_pos[None], rope[None].expand(3, -1, -1)], dim=0)

    def advance(self) -> None:
        for seq in self.seqs:
            seq.text_pos += 1
            seq.rope_pos += 1
