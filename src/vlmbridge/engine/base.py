"""The engine contract every backend implements (the transformers backend now; vLLM next).

A backend takes a `GenerationRequest` (messages with decoded images, sampling settings, limits) and answers it
with a `RequestStream` of token-level `EngineOutput`s; the front turns those into text (`vlmbridge.output`).
It does its own templating and image processing, knows nothing about HTTP, and nothing here imports torch or
any backend.

    engine = build_engine(settings, path, name)     # vlmbridge.engine.factory
    engine.start()                                   # load is done; warm up, then state == "ready"
    stream = engine.generate(request)                # any thread or event loop
    engine.abort(request.request_id)                 # stop it at the next step boundary
    engine.stats()                                   # a typed snapshot for /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from vlmbridge.engine.types import ChatMessage, EngineOutput, EngineStats, GenerationRequest

__all__ = ["Engine", "EngineInfo", "EngineState", "PromptStats", "RequestStream", "wake_streams"]

EngineState = Literal["loading", "warming_up", "ready", "restarting", "failed", "stopped"]
T = TypeVar("T")


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


@dataclass(frozen=True)
class PromptStats:
    prompt_tokens: int
    image_tokens: int
    video_tokens: int = 0


class RequestStream(Generic[T]):
    """The outputs of one request: pushed by a producer on any thread, read by a thread or by an event loop.

    Items go into one thread-safe queue; an async reader also gets a wake-up on its loop. Either kind of reader
    works whichever thread created the stream, so no reader can wait on a queue that is never filled.
    """

    _END = object()

    def __init__(self, request_id: str, *, forward: Callable[[T, bool], None] | None = None) -> None:
        """`forward(item, last)` makes this a pass-through: every push goes straight to it (a worker process
        sends outputs to the front this way, from the engine's own thread) and nothing is queued to read."""
        self.request_id = request_id
        self._forward = forward
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._ended = False

    # --- producer side -----------------------------------------------------------------------------------
    def push(self, item: T, *, last: bool = False, wake: bool = True) -> None:
        """`wake=False`: the caller wakes the reader itself (`wake_streams`, one wake-up for many streams)."""
        if self._forward is not None:
            self._forward(item, last)
            return
        self._items.put(item)
        if last:
            self._items.put(self._END)
        if wake:
            wake_streams((self,))

    def _waker(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Event] | None:
        """The async reader's loop and event when it may be waiting (an event already set needs no wake-up: the
        reader clears it before it looks at the queue, which already holds the item)."""
        with self._lock:
            loop, ready = self._loop, self._ready
        if loop is None or ready is None or ready.is_set():
            return None
        return loop, ready

    # --- consumer side -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[T]:
        """Blocking iteration, for threads; refused inside an event loop (it would stall the loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("iterate a RequestStream with `async for` (or `await next()`) inside an event loop")
        while not self._ended:
            item = self._items.get()
            if item is self._END:
                self._ended = True
                return
            yield item  # type: ignore[misc]

    async def next(self, timeout: float | None = None) -> T | None:
        """The next item, or None after the last one. Raises TimeoutError if none arrives within `timeout`;
        waiting can be abandoned (timeout, cancellation) without losing an item."""
        if self._ready is None:
            with self._lock:
                self._loop, self._ready = asyncio.get_running_loop(), asyncio.Event()
        ready, loop = self._ready, self._loop
        assert ready is not None and loop is not None
        until = None if timeout is None else loop.time() + timeout
        while True:
            if self._ended:
                return None
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                ready.clear()
                if not self._items.empty():  # pushed between the check and the clear
                    continue
                if until is None:
                    await ready.wait()
                    continue
                if loop.time() >= until:
                    raise TimeoutError from None
                # One timer handle that sets the event (not asyncio.timeout, or wait_for's task per wait: this runs
                # once per streamed token); a wake-up that brings no item does not restart the clock.
                timer = loop.call_at(until, ready.set)
                try:
                    await ready.wait()
                finally:
                    timer.cancel()
                continue
            if item is self._END:
                self._ended = True
                return None
            return item  # type: ignore[return-value]

    async def __aiter__(self) -> AsyncIterator[T]:
        while (item := await self.next()) is not None:
            yield item


def wake_streams(streams: Iterable[RequestStream[Any]]) -> None:
    """Wake the async readers of `streams`: one call into each reader loop, however many streams it reads (an
    engine step's outputs arrive together)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for stream in streams:
        waker = stream._waker()
        if waker is not None:
            by_loop.setdefault(waker[0], []).append(waker[1])
    for loop, events in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the reader's loop is closed: nobody is listening
            loop.call_soon_threadsafe(_set_all, events)


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class Engine(Protocol):
    """What the front needs from a backend."""

    # Whether `generate` does the request's CPU work (templating, pixels) in this process: the front then bounds how
    # many run at once. An engine in a worker process prepares there, and the worker bounds its own.
    prepares_in_process: bool

    @property
    def info(self) -> EngineInfo: ...

    @property
    def state(self) -> EngineState: ...

    @property
    def state_reason(self) -> str: ...

    def start(self, *, warm_up: bool = True) -> None:
        """Start working and (by default) run one real generation before accepting requests. Blocking."""

    def generate(
        self, request: GenerationRequest, stream: RequestStream[EngineOutput] | None = None
    ) -> RequestStream[EngineOutput]:
        """Template, tokenize and process the request, then queue it; its outputs go to `stream` (default: a new
        one, returned). Blocking CPU work: call it off the event loop. Raises 4xx errors (context, images),
        QueueFullError and EngineNotReadyError."""

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary; its stream ends with finish_reason "abort". Idempotent."""

    def count_prompt(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        """Tokens the prompt would take (images included), without generating."""

    def queue_depth(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
