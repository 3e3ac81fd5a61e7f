"""The front's handle on one served model: a backend (any `Engine`) plus the text tools of its tokenizer.

`generate` hands the request to the backend and returns a `ChunkStream`: the backend's token-level outputs run
through the output pipeline as they are read, so every backend's text, stops, reasoning and usage come out
the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmbridge.engine.base import Engine, RequestStream
from vlmbridge.engine.types import EngineOutput, GenerationChunk, GenerationRequest
from vlmbridge.output.counting import PromptCounter
from vlmbridge.output.pipeline import OutputPipeline, TextTools

__all__ = ["ChunkStream", "ModelClient", "load_text_tools"]


class ChunkStream:
    """One request's chunks, read by a thread (`for`) or an event loop (`await next()`)."""

    def __init__(self, engine: Engine, raw: RequestStream[EngineOutput], pipeline: OutputPipeline) -> None:
        self.request_id = raw.request_id
        self._engine = engine
        self._raw = raw
        self._pipeline = pipeline

    @property
    def finished(self) -> bool:
        return self._pipeline.finished is not None

    async def next(self, timeout: float | None = None) -> GenerationChunk | None:
        """The next chunk, None after the last. TimeoutError if the backend says nothing within `timeout`."""
        while not self.finished:
            out = await self._raw.next(timeout)
            if out is None:
                return None
            chunk = self._pipeline.feed(out)
            if chunk is not None:
                return chunk
        return None

    def __iter__(self) -> Iterator[GenerationChunk]:
        for out in self._raw:
            chunk = self._pipeline.feed(out)
            if chunk is not None:
                yield chunk
            if self.finished:
                return

    def close(self) -> None:
        """Stop the backend's work on this request unless it has finished (a client that went away)."""
        if not self.finished:
            self._engine.abort(self.request_id)

    def fail(self, error: Exception) -> None:
        """End the request now with `error` as its last chunk (the server is draining), and stop the backend."""
        self._raw.push(EngineOutput(finish_reason="error", error=error), last=True)
        self._engine.abort(self.request_id)


class ModelClient:
    def __init__(self, engine: Engine, tools: TextTools) -> None:
        self.engine = engine
        self.tools = tools

    def generate(self, request: GenerationRequest) -> ChunkStream:
        """Blocking (the backend templates and processes images): call it off the event loop."""
        if not request.request_id:  # the front aborts by id: it must know it before the backend does
            request = replace(request, request_id=f"req-{uuid.uuid4().hex}")
        raw = self.engine.generate(request)
        pipeline = OutputPipeline(request, self.tools, abort=lambda: self.engine.abort(request.request_id))
        return ChunkStream(self.engine, raw, pipeline)


def load_text_tools(path: Path, trust_remote_code: Any) -> TextTools:
    """The front's own tokenizer for the folder (remote code only where the allowlist pins it)."""
    from transformers import AutoTokenizer

    from vlmbridge.folder import ModelFolder
    from vlmbridge.remote_code import check_remote_code

    remote = check_remote_code(ModelFolder.open(path), trust_remote_code or {})
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    return TextTools(tokenizer, PromptCounter.for_folder(path, tokenizer))
