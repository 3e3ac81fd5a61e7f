"""What the app holds while it runs: settings, the engine slot, metrics, the image loader."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmbridge.engine.base import Engine
from vlmbridge.errors import EngineNotReadyError, QueueFullError, ShuttingDownError, VlmbridgeError, WorkerDiedError
from vlmbridge.media.inflight import PixelGate
from vlmbridge.output.client import ChunkStream, ModelClient
from vlmbridge.output.pipeline import TextTools
from vlmbridge.server.convert import ImageLoader, VideoLoader
from vlmbridge.server.metrics import Metrics
from vlmbridge.settings import Settings

__all__ = ["AppState", "EngineSlot", "Lifecycle"]

log = logging.getLogger(__name__)


class EngineSlot:
    """The serving engine, loaded in the background so /health can say "loading" instead of refusing to connect.

    One slot per served model; a pool of slots is how several models and hot swaps will plug in.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], Engine] | None = None,
        engine: Engine | None = None,
        *,
        tools: Callable[[], TextTools] | None = None,
    ) -> None:
        self.name = name
        self._factory = factory
        self._tools_factory = tools
        self._engine = engine
        self._client: ModelClient | None = None
        self._failure: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._engine is not None:  # handed over ready-made: only the front's tools are left to load
            if self._tools_factory is not None and self._client is None:
                self._client = ModelClient(self._engine, self._tools_factory())
            return
        if self._factory is None:
            return
        self._thread = threading.Thread(target=self._load, name=f"load-{self.name}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        assert self._factory is not None
        try:
            tools = self._tools_factory() if self._tools_factory is not None else None
            engine = self._factory()
            engine.start()
            if tools is not None:
                self._client = ModelClient(engine, tools)
            self._engine = engine
        except VlmbridgeError as exc:
            self._failure = exc.message + (f" — fix: {exc.fix}" if exc.fix else "")
            cause = getattr(exc, "cause", type(exc).__name__)
            log.error("model %s failed to load (cause: %s): %s", self.name, cause, self._failure)
        except Exception as exc:  # a load failure must leave the server up to report it
            self._failure = f"{type(exc).__name__}: {exc}"
            log.exception("model %s failed to load", self.name)

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def state(self) -> str:
        if self._engine is not None:
            return self._engine.state
        return "failed" if self._failure else "loading"

    @property
    def reason(self) -> str:
        if self._engine is not None:
            return self._engine.state_reason
        return self._failure or "loading the model"

    @property
    def engine(self) -> Engine:
        if self._engine is not None and self._engine.state == "restarting":
            raise WorkerDiedError(f"model {self.name!r} is restarting: {self.reason}", code="worker_died")
        if self._engine is None or self._engine.state != "ready":
            raise EngineNotReadyError(f"model {self.name!r} is not ready: {self.reason}")
        return self._engine

    @property
    def client(self) -> ModelClient:
        """The ready engine with the front's text tools (what generation goes through)."""
        engine = self.engine
        if self._client is None or self._client.engine is not engine:
            raise EngineNotReadyError(f"model {self.name!r} has no tokenizer in the front; it cannot generate")
        return self._client

    def peek(self) -> Engine | None:
        return self._engine

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()


class Lifecycle:
    """What the front knows about its own requests: how many are in flight, which streams are open, and whether
    the server is draining (SIGTERM: finish what runs, refuse what comes). Lives on the event loop's thread."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.waiting = 0  # admitted, not yet handed to the engine (decoding images, preparing the prompt)
        self.streams: set[ChunkStream] = set()

    def admit(self, settings: Settings, engine_queue: int) -> None:
        """Refuse a request before any expensive work when the server is draining or its queue is full."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another replica", code="shutting_down")
        if self.waiting + engine_queue >= settings.max_queue:
            raise QueueFullError(
                f"{settings.max_queue} requests are already waiting; retry later", retry_after=1.0, code="queue_full"
            )

    async def drain(self, grace: float, slack: float = 5.0) -> None:
        """Stop taking requests, let those in flight finish within `grace` seconds, then end the rest with a
        shutting_down error (streams get it as their last SSE event) and give them `slack` seconds to say so."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self.in_flight:
            return
        log.warning("drain: %d request(s) still running after %.0fs; ending them", self.in_flight, grace)
        stopping = ShuttingDownError("the server is shutting down", code="shutting_down")
        for stream in list(self.streams):
            stream.fail(stopping)
        deadline = loop.time() + slack
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)


@dataclass
class AppState:
    settings: Settings
    slot: EngineSlot
    metrics: Metrics
    load_image: ImageLoader
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    load_video: VideoLoader | None = None  # None: video files are refused (frame lists still work)
    pixel_gate: PixelGate = field(default_factory=lambda: PixelGate(1 << 34))  # decoded pixels held at once
    # The processor's CPU work (templating, image resizing) runs in threads; bound it so it cannot starve decoding.
    prepare_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
