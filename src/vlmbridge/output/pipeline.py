"""One output pipeline for every backend: detokenize, match stop strings, split reasoning, finish, count usage.

A backend speaks token ids (`EngineOutput`); the pipeline turns each into a `GenerationChunk` with text. Stop
strings are matched here: when one appears, the pipeline finishes the request ("stop") and asks the backend to
abort it, so backends never see text. When the request has tools, `<tool_call>` blocks in the answer become tool
calls here too (toolcalls.py), the same for every backend; a request that called a tool finishes "tool_calls".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from vlmbridge.engine.types import (
    EngineOutput,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    PromptInfo,
    TokenLogprob,
    Usage,
)
from vlmbridge.output.counting import PromptCounter
from vlmbridge.output.textstream import IncrementalDecoder, ReasoningSplitter, StopMatcher, TextDelta, token_text_table
from vlmbridge.output.toolcalls import ToolCallParser

__all__ = ["OutputPipeline", "TextTools"]


@dataclass
class TextTools:
    """The tokenizer-backed pieces the front needs, built once per model."""

    tokenizer: Any
    counter: PromptCounter | None = None  # counts prompts without the backend (None: ask the backend)

    @cached_property
    def token_text(self) -> Callable[[int], tuple[str, tuple[int, ...]]]:
        return token_text_table(self.tokenizer)  # type: ignore[no-any-return]

    @cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters: no token stands for more characters of text (a byte-level
        piece has one character per byte, and a character of text takes at least one byte)."""
        return max((len(piece) for piece in self.tokenizer.get_vocab()), default=0)


class OutputPipeline:
    """The output side of one request. `feed` each EngineOutput; it returns the chunk to send (None: nothing yet).

    `abort` is called once when a stop string ends the request, so the backend stops generating.
    """

    def __init__(self, request: GenerationRequest, tools: TextTools, abort: Callable[[], None]) -> None:
        self._tools = tools
        self._abort = abort
        self._decoder = IncrementalDecoder(tools.tokenizer)
        self._stopper = StopMatcher(request.sampling.stop)
        self._splitter: ReasoningSplitter | None = None
        self._want_logprobs = request.sampling.logprobs
        self._calls: ToolCallParser | None = None
        if request.parse_tool_calls:
            self._calls = ToolCallParser([str(t.get("function", {}).get("name", "")) for t in request.tools])
        self.prompt = PromptInfo(prompt_tokens=0)
        self.completion_tokens = 0
        self.finished: FinishReason | None = None

    def usage(self) -> Usage:
        p = self.prompt
        return Usage(p.prompt_tokens, self.completion_tokens, p.image_tokens, p.cached_tokens, p.video_tokens)

    def feed(self, out: EngineOutput) -> GenerationChunk | None:
        if self.finished is not None:
            return None  # after a stop string: what the backend still sends before the abort lands
        if out.prompt is not None:
            self.prompt = out.prompt
        if self._splitter is None:
            self._splitter = ReasoningSplitter(self.prompt.reasoning_open)
        if out.finish_reason == "error":
            self.finished = "error"
            return GenerationChunk(finish_reason="error", error=out.error, usage=self.usage())
        if out.finish_reason == "abort":
            self.finished = "cancelled"
            return GenerationChunk(finish_reason="cancelled", usage=self.usage())
        self.completion_tokens += len(out.token_ids)
        text = "".join(self._stopper.feed(self._decoder.add(t)) for t in out.token_ids)
        finish: FinishReason | None = out.finish_reason
        if self._stopper.stopped:
            finish = "stop"
            self._abort()
        elif finish is not None:
            text += self._stopper.feed(self._decoder.flush()) + self._stopper.flush()
        delta = self._splitter.feed(text)
        if finish is not None:
            tail = self._splitter.flush()
            delta = TextDelta(text=delta.text + tail.text, reasoning=delta.reasoning + tail.reasoning)
        calls: list[Any] = []
        if self._calls is not None:
            shown, calls = self._calls.feed(delta.text)
            if finish is not None:
                shown += self._calls.flush()
                if finish == "stop" and self._calls.calls:
                    finish = "tool_calls"
            delta = TextDelta(text=shown, reasoning=delta.reasoning)
        if finish is not None:
            self.finished = finish
        return GenerationChunk(
            tool_calls=tuple(calls),
            text=delta.text,
            reasoning=delta.reasoning,
            token_ids=out.token_ids,
            logprobs=tuple(self._named(c) for c in out.choices) if self._want_logprobs else (),
            finish_reason=finish,
            usage=self.usage() if finish is not None else None,
        )

    def _named(self, choice: Any) -> TokenLogprob:
        text, data = self._tools.token_text(choice.token_id)
        top = tuple((*self._tools.token_text(tid), lp) for tid, lp in choice.top)
        return TokenLogprob(
            token=text, logprob=choice.logprob, token_bytes=data, top=tuple((t, lp, b) for t, b, lp in top)
        )
