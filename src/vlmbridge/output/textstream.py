"""From generated token ids to the text a client sees: incremental decoding, stop strings, thinking split.

- Decoding is incremental with the usual prefix/read offsets, holding back text that ends in an incomplete
  UTF-8 sequence ("�") until the next token completes it.
- Stop strings are never emitted: text that could be the start of a stop string is held back until it is not.
- Text inside `<think>…</think>` (opened by the template or by the model) goes to `reasoning`, not `text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

__all__ = ["IncrementalDecoder", "ReasoningSplitter", "StopMatcher", "TextDelta", "token_text_table"]

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


class IncrementalDecoder:
    """With a fast tokenizer the Rust backend's own `DecodeStream` (as vLLM and TGI use) does the work: the two
    Python-level `decode` calls per token cost 6x as much, on the front's event loop, for every streamed token."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._rust = (backend, DecodeStream(skip_special_tokens=True)) if isinstance(backend, Tokenizer) else None
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._rust is not None:
            backend, stream = self._rust
            piece = stream.step(backend, token_id)  # None: an incomplete character, held back
            if piece is None:
                return ""
            self._prefix, self._read = self._read, len(self._ids)
            return str(piece)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Feeds text through, cutting at the first stop string and holding back possible stop-string prefixes."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
            return out
        hold = self._held_suffix()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def _held_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


@dataclass(frozen=True)
class TextDelta:
    text: str = ""
    reasoning: str = ""


class ReasoningSplitter:
    """Routes text inside a think block to `reasoning`."""

    def __init__(self, starts_in_think_block: bool) -> None:
        self._in_think = starts_in_think_block
        self._seen_content = False
        self._pending = ""

    def feed(self, text: str) -> TextDelta:
        self._pending += text
        text_out: list[str] = []
        reasoning_out: list[str] = []
        while self._pending:
            if self._in_think:
                idx = self._pending.find(_THINK_CLOSE)
                if idx >= 0:
                    reasoning_out.append(self._pending[:idx])
                    self._pending = self._pending[idx + len(_THINK_CLOSE) :].lstrip("\n")
                    self._in_think = False
                    continue
                hold = _partial_suffix(self._pending, _THINK_CLOSE)
                reasoning_out.append(self._pending[: len(self._pending) - hold])
                self._pending = self._pending[len(self._pending) - hold :]
                break
            if not self._seen_content:
                stripped = self._pending.lstrip()
                if stripped.startswith(_THINK_OPEN):
                    self._pending = stripped[len(_THINK_OPEN) :].lstrip("\n")
                    self._in_think = True
                    self._seen_content = True
                    continue
                if _THINK_OPEN.startswith(stripped):  # could still become "<think>"
                    break
            self._seen_content = True
            text_out.append(self._pending)
            self._pending = ""
        return TextDelta(text="".join(text_out), reasoning="".join(reasoning_out))

    def flush(self) -> TextDelta:
        pending, self._pending = self._pending, ""
        return TextDelta(reasoning=pending) if self._in_think else TextDelta(text=pending)


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def token_text_table(tokenizer: Any) -> Any:
    """A function id -> (text, utf-8 bytes) for logprobs, using the byte-level BPE byte mapping."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def lookup(token_id: int) -> tuple[str, tuple[int, ...]]:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return "", ()
        if token_id in special or any(ch not in byte_of for ch in piece):
            data = piece.encode("utf-8")  # added tokens are stored as plain text
        else:
            data = bytes(byte_of[ch] for ch in piece)
        return data.decode("utf-8", errors="replace"), tuple(data)

    return lookup
