"""The engine interface every backend implements (embedded transformers now; vLLM and a multi-model pool later).

An engine takes `GenerationRequest`s from any thread or event loop and answers each with a `RequestStream` of
`GenerationChunk`s. It knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from vlmbridge.engine.types import ChatMessage, GenerationChunk, GenerationRequest

if TYPE_CHECKING:
    from vlmbridge.engine.embedded import PreparedRequest

__all__ = ["Engine", "EngineInfo", "EngineState", "PromptStats", "RequestStream"]

EngineState = Literal["loading", "warming_up", "ready", "failed", "stopped"]


@dataclass(frozen=True)
class EngineInfo:
    model_id: str  # the name clients use
    model_path: str
    model_type: str
    model_class: str
    kind: Literal["vlm", "text"]
    context_length: int
    dtype: str
    device: str
    quantization: str = "none"
    quantization_reason: str = ""
    # Most characters one ordinary token can stand for: a prompt with more than context × this many characters
    # cannot fit, so the front refuses it before tokenizing anything. 0 = unknown (no early check).
    max_token_chars: int = 0


@dataclass(frozen=True)
class PromptStats:
    prompt_tokens: int
    image_tokens: int


class RequestStream:
    """Chunks of one request, pushed by the engine's worker, read by a thread or an event loop.

    Created on the consumer's side: inside a running event loop it delivers through an asyncio queue (woken with
    call_soon_threadsafe), otherwise through a thread-safe queue.
    """

    _END = object()

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._cancelled = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._async_q: asyncio.Queue[object] | None = asyncio.Queue() if self._loop else None
        self._sync_q: queue.SimpleQueue[object] = queue.SimpleQueue()

    # --- producer side (engine worker) ---------------------------------------------------------------
    def push(self, chunk: GenerationChunk) -> None:
        self._deliver(chunk)
        if chunk.finish_reason is not None:
            self._deliver(self._END)

    def _deliver(self, item: object) -> None:
        if self._loop is not None and self._async_q is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_q.put_nowait, item)
            except RuntimeError:  # loop closed: the consumer is gone
                self._cancelled.set()
        else:
            self._sync_q.put(item)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- consumer side ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (e.g. the client disconnected)."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            item = self._sync_q.get()
            if item is self._END:
                return
            assert isinstance(item, GenerationChunk)
            yield item

    async def next(self, timeout: float | None = None) -> GenerationChunk | None:
        """The next chunk, or None after the last one. Raises TimeoutError if none arrives within `timeout`.

        Waiting can be abandoned (timeout, cancellation) without losing a chunk.
        """
        assert self._async_q is not None, "async reading needs a stream created inside the event loop"
        try:
            item = self._async_q.get_nowait()  # the common case while decoding: no task, no timer
        except asyncio.QueueEmpty:
            item = await asyncio.wait_for(self._async_q.get(), timeout)
        if item is self._END:
            self._async_q.put_nowait(item)  # stay at the end for further calls
            return None
        assert isinstance(item, GenerationChunk)
        return item

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        while (chunk := await self.next()) is not None:
            yield chunk


class Engine(Protocol):
    """What the server and the CLI need from a backend."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def state(self) -> EngineState: ...

    @property
    def state_reason(self) -> str: ...

    def start(self, *, warm_up: bool = True) -> None:
        """Start the worker and (by default) run one real generation before accepting requests. Blocking."""

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Template, tokenize and process images; check limits. CPU work, thread-safe. Raises 4xx errors."""

    def submit(self, prepared: PreparedRequest) -> RequestStream:
        """Queue a prepared request. Raises QueueFullError / EngineNotReadyError."""

    def count_prompt(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        """Tokens the prompt would take (images included), without generating."""

    def queue_depth(self) -> int: ...

    def shutdown(self) -> None: ...
