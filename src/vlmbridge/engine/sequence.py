"""One request while the engine works on it: its sampler, text pipeline, positions and finish state.

Failures are per request: whatever goes wrong while choosing or emitting this request's token fails this request
alone (`EngineFailedError` with a code), and its neighbours in the batch go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmbridge.engine.base import RequestStream
from vlmbridge.engine.sampling import Sampler
from vlmbridge.engine.textstream import IncrementalDecoder, ReasoningSplitter, StopMatcher, TextDelta
from vlmbridge.engine.types import FinishReason, GenerationChunk, TokenLogprob, Usage
from vlmbridge.errors import EngineFailedError, VlmbridgeError

if TYPE_CHECKING:
    from vlmbridge.engine.embedded import PreparedRequest

__all__ = ["FaultHook", "Sequence", "describe", "public_error", "step_error"]

log = logging.getLogger(__name__)

# Test-only: called as hook(stage, request_id) on the worker thread; whatever it raises is what that stage raised.
FaultHook = Callable[[str, str], None]


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
    ended: bool = False  # the last chunk went out: nothing more may be pushed
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

    def step(self, logits: Any, hook: FaultHook | None = None) -> None:
        """Choose this request's next token from its logits row and emit it; a failure fails this request only."""
        code, what = "sampling_failed", "sampling the next token"
        try:
            if hook is not None:
                hook("sample", self.request_id)
            token, logprob = self.sampler.choose(logits)
            code, what = "detokenize_failed", "turning the next token into text"
            if hook is not None:
                hook("accept", self.request_id)
            self.accept(token, logprob)
        except Exception as exc:
            self.fail(step_error(exc, code, what, [self.request_id]))

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
        self._push(
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
        if not self.ended:
            self.finish = "cancelled"
            self._push(GenerationChunk(finish_reason="cancelled", usage=self.usage()))

    def fail(self, exc: BaseException) -> None:
        """End the request with an error; a no-op once its last chunk went out (it stays as it ended)."""
        if not self.ended:
            self.finish = "error"
            self._push(GenerationChunk(finish_reason="error", error=public_error(exc), usage=self.usage()))

    def _push(self, chunk: GenerationChunk) -> None:
        self.ended = chunk.finish_reason is not None
        self.stream.push(chunk)


def describe(exc: BaseException) -> str:
    """One bounded line for the log: type, the first line of the message, and where it was raised."""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (at {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})" if tb is not None else ""
    return f"{type(exc).__name__}: {first}{where}"


def step_error(exc: BaseException, code: str, what: str, request_ids: Iterable[str]) -> Exception:
    """Log a failed step once (bounded; the traceback at debug level) and return the error its requests get."""
    log.error("%s failed for %s: %s", what, ", ".join(request_ids)[:200], describe(exc))
    log.debug("traceback of the failure above", exc_info=exc)
    return public_error(exc, code, what)


def public_error(exc: BaseException, code: str = "engine_error", what: str = "the engine") -> Exception:
    # Typed errors keep their class (status mapping); anything else is classified, without its text: an
    # exception's message may quote tensors or input, which a client must never see.
    if isinstance(exc, VlmbridgeError):
        return exc
    return EngineFailedError(f"{what} failed for this request ({type(exc).__name__}); other requests go on", code=code)
