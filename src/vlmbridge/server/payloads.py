"""Engine output → OpenAI response objects and SSE framing (exactly the shapes the openai client and Dify parse).

SSE events are `data: <json>\\n\\n` with LF only; every JSON chunk carries `choices` (possibly empty), and the
stream ends with `data: [DONE]`. Keep-alive comments (`: keep-alive`) are skipped by Dify's and OpenAI's parsers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vlmbridge.engine.types import GenerationChunk, TokenLogprob, ToolCall, Usage

__all__ = ["DONE", "KEEPALIVE", "Completion", "sse", "usage_dict"]

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "image_tokens": usage.image_tokens,
            "video_tokens": usage.video_tokens,
        },
    }


def _logprob_entry(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token_bytes),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, v, b in lp.top],
    }


def _call_entry(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@dataclass
class Completion:
    """Builds the response (non-stream) or the chunks (stream) of one chat completion."""

    id: str
    model: str
    created: int
    want_logprobs: bool = False
    include_usage: bool = False  # the client asked: OpenAI's separate final chunk with `choices: []`
    usage_on_finish: bool = False  # it did not, but --stream-usage always: usage rides on the finish chunk
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, chunk: GenerationChunk) -> None:
        self.tool_calls.extend(chunk.tool_calls)
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        self.logprobs.extend(_logprob_entry(lp) for lp in chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.usage = chunk.usage

    # --- non-stream -----------------------------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if self.tool_calls:
            message["content"] = message["content"] or None  # as OpenAI: a call without words has no content
            message["tool_calls"] = [_call_entry(call) for call in self.tool_calls]
        reasoning = "".join(self.reasoning)
        if reasoning:
            message["reasoning_content"] = reasoning
        usage = self.usage or Usage(0, 0)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": {"content": self.logprobs} if self.want_logprobs else None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": usage_dict(usage),
        }

    # --- stream ---------------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            payload["usage"] = None
        return payload

    def role_event(self) -> str:
        return sse(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))

    def delta_events(self, chunk: GenerationChunk) -> list[str]:
        events: list[str] = []
        delta: dict[str, Any] = {}
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        entries = [_logprob_entry(lp) for lp in chunk.logprobs] if self.want_logprobs else []
        if delta or entries:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            if self.want_logprobs:
                choice["logprobs"] = {"content": entries}
            events.append(sse(self._chunk([choice])))
        for call in chunk.tool_calls:
            # Per call, never interleaved: its id, type and name with empty arguments, then only the arguments
            # (the openai client concatenates by index; Dify's SDK matches the id and appends to the last call).
            index = len(self.tool_calls)
            self.tool_calls.append(call)
            head = {"index": index, **_call_entry(call)}
            head["function"] = {"name": call.name, "arguments": ""}
            body = {"index": index, "function": {"arguments": call.arguments}}
            for part in (head, body):
                events.append(sse(self._chunk([{"index": 0, "delta": {"tool_calls": [part]}, "finish_reason": None}])))
        if chunk.finish_reason in ("stop", "length", "tool_calls"):
            finish = self._chunk([{"index": 0, "delta": {}, "finish_reason": chunk.finish_reason}])
            if self.usage_on_finish and not self.include_usage and chunk.usage is not None:
                # Dify's SDK takes `usage` from any chunk; without it, it counts GPT-2 tokens (and downloads
                # tiktoken's encoding, which fails offline). Clients reading choices[0] are not disturbed.
                finish["usage"] = usage_dict(chunk.usage)
            events.append(sse(finish))
            if self.include_usage and chunk.usage is not None:
                final = self._chunk([])
                final["usage"] = usage_dict(chunk.usage)
                events.append(sse(final))
        return events
