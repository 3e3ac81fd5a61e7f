"""One request while the engine works on it: its sampler, positions, tokens and finish state.

It speaks token ids (`EngineOutput`); text, stop strings and reasoning are the front's (`vlmbridge.output`).
Failures are per request: whatever goes wrong while choosing this request's token fails this request alone
(`EngineFailedError` with a code), and its neighbours in the batch go on. A finished request's last output is
held until the engine has filed its KV cache (`release`), so whoever sees the end can rely on the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmbridge.engine.base import RequestStream
from vlmbridge.engine.transformers.sampling import Sampler
from vlmbridge.engine.types import EngineFinish, EngineOutput, PromptInfo, TokenChoice
from vlmbridge.errors import EngineFailedError, VlmbridgeError

if TYPE_CHECKING:
    from vlmbridge.engine.transformers.prompt import PreparedRequest

__all__ = ["FaultHook", "Sequence", "describe", "public_error", "step_error"]

log = logging.getLogger(__name__)

# Test-only: called as hook(stage, request_id) on the worker thread; whatever it raises is what that stage raised.
FaultHook = Callable[[str, str], None]


@dataclass
class Sequence:
    prepared: PreparedRequest
    stream: RequestStream[EngineOutput]
    sampler: Sampler
    eos: frozenset[int] = field(default_factory=frozenset)
    text_pos: int = 0  # real tokens in the cache = text position of the next token
    rope_pos: int = 0  # rotary position of the next token (ahead of text_pos after images under M-RoPE)
    next_token: int = -1
    finish: EngineFinish | None = None
    ended: bool = False  # the last output went out: nothing more may be pushed
    tokens: list[int] = field(default_factory=list)  # generated ids, in order
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache
    prompt_keys: list[Hashable] | None = None  # content keys of the prompt, for the prefix cache
    _prompt_sent: bool = False
    _final: EngineOutput | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def request_id(self) -> str:
        return self.prepared.request.request_id

    def _prompt(self) -> PromptInfo | None:
        """The prompt's counts, on the first output only."""
        if self._prompt_sent:
            return None
        self._prompt_sent = True
        inputs = self.prepared.inputs
        return PromptInfo(
            prompt_tokens=inputs.prompt_tokens,
            image_tokens=inputs.image_tokens,
            video_tokens=inputs.video_tokens,
            cached_tokens=self.cached_tokens,
            reasoning_open=inputs.ends_in_think_block,
        )

    def step(self, logits: Any, hook: FaultHook | None = None) -> None:
        """Choose this request's next token from its logits row and emit it; a failure fails this request only."""
        code, what = "sampling_failed", "sampling the next token"
        try:
            if hook is not None:
                hook("sample", self.request_id)
            token, choice = self.sampler.choose(logits)
            code, what = "accept_failed", "taking the next token"
            if hook is not None:
                hook("accept", self.request_id)
            self.accept(token, choice)
        except Exception as exc:
            self.fail(step_error(exc, code, what, [self.request_id]))

    def accept(self, token: int, choice: TokenChoice | None) -> None:
        """Take the sampled token: update the finish state and emit it (the last one is held, see `release`)."""
        self.tokens.append(token)
        self.sampler.observe(token)
        self.next_token = token
        if token in self.eos and not self.prepared.request.sampling.ignore_eos:
            self.finish = "stop"
        elif self.generated >= self.prepared.max_new_tokens:
            self.finish = "length"
        out = EngineOutput(
            token_ids=(token,),
            choices=(choice,) if choice is not None else (),
            finish_reason=self.finish,
            prompt=self._prompt(),
        )
        if self.finish is None:
            self.stream.push(out)
        else:
            self._final = out

    def abort(self) -> None:
        """Stop at the front's request; the "abort" output waits for `release` like any other last output."""
        if not self.ended and self.finish is None:
            self.finish = "abort"
            self._final = EngineOutput(finish_reason="abort", prompt=self._prompt())

    def release(self) -> None:
        """Send the held last output (after the engine filed the request's KV)."""
        if self._final is not None and not self.ended:
            self.ended = True
            self.stream.push(self._final, last=True)
            self._final = None

    def fail(self, exc: BaseException) -> None:
        """End the request with an error at once; a no-op once its last output went out."""
        if not self.ended:
            self.finish = "error"
            self.ended = True
            self._final = None
            self.stream.push(
                EngineOutput(finish_reason="error", error=public_error(exc), prompt=self._prompt()), last=True
            )


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
