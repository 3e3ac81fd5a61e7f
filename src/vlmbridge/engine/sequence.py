"""One request while the engine works on it: its sampler, text pipeline, positions and finish state."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlmbridge.engine.base import RequestStream
from vlmbridge.engine.sampling import Sampler
from vlmbridge.engine.textstream import IncrementalDecoder, ReasoningSplitter, StopMatcher, TextDelta
from vlmbridge.engine.types import FinishReason, GenerationChunk, TokenLogprob, Usage
from vlmbridge.errors import VlmbridgeError

if TYPE_CHECKING:
    from vlmbridge.engine.embedded import PreparedRequest

__all__ = ["Sequence"]


@dataclass
class Sequence:
    prepared: PreparedRequest
    stream: RequestStream
    sampler: Sampler
    decoder: IncrementalDecoder
    stopper: StopMatcher
    splitter: ReasoningSplitter
    eos: frozenset[int] = field(default_factory=frozenset)
    text_pos: int = 0  # real tokens in the cache = text position of the next token
    rope_pos: int = 0  # rotary position of the next token (ahead of text_pos after images under M-RoPE)
    next_token: int = -1
    finish: FinishReason | None = None
    tokens: list[int] = field(default_factory=list)  # generated ids, in order
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache
    prompt_keys: list[Hashable] | None = None  # content keys of the prompt, for the prefix cache

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def request_id(self) -> str:
        return self.prepared.request.request_id

    def usage(self) -> Usage:
        inputs = self.prepared.inputs
        return Usage(
            prompt_tokens=inputs.prompt_tokens,
            completion_tokens=self.generated,
            image_tokens=inputs.image_tokens,
            cached_tokens=self.cached_tokens,
        )

    def accept(self, token: int, logprob: TokenLogprob | None) -> None:
        """Take the sampled token: update text, stop/finish state, and push the chunk to the client."""
        self.tokens.append(token)
        self.sampler.observe(token)
        self.next_token = token
        text = ""
        if token in self.eos and not self.prepared.request.sampling.ignore_eos:
            self.finish = "stop"
        else:
            text = self.stopper.feed(self.decoder.add(token))
            if self.stopper.stopped:
                self.finish = "stop"
            elif self.generated >= self.prepared.max_new_tokens:
                self.finish = "length"
        if self.finish is not None and not self.stopper.stopped:
            text += self.stopper.feed(self.decoder.flush()) + self.stopper.flush()
        delta = self.splitter.feed(text)
        if self.finish is not None:
            tail = self.splitter.flush()
            delta = TextDelta(text=delta.text + tail.text, reasoning=delta.reasoning + tail.reasoning)
        self.stream.push(
            GenerationChunk(
                text=delta.text,
                reasoning=delta.reasoning,
                token_ids=(token,),
                logprobs=(logprob,) if logprob is not None else (),
                finish_reason=self.finish,
                usage=self.usage() if self.finish is not None else None,
            )
        )

    def cancel(self) -> None:
        self.finish = "cancelled"
        self.stream.push(GenerationChunk(finish_reason="cancelled", usage=self.usage()))

    def fail(self, exc: BaseException) -> None:
        self.finish = "error"
        self.stream.push(GenerationChunk(finish_reason="error", error=_public(exc), usage=self.usage()))


def _public(exc: BaseException) -> Exception:
    # Typed errors keep their class (status mapping); anything else becomes a short, bounded message.
    if isinstance(exc, VlmbridgeError):
        return exc
    text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return RuntimeError(f"{type(exc).__name__}: {text}")
