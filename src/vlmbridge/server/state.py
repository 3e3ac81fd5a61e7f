"""What the app holds while it runs: settings, the model pool, metrics, the image loader."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from vlmbridge.errors import QueueFullError, ShuttingDownError
from vlmbridge.media.inflight import PixelGate
from vlmbridge.output.client import ChunkStream
from vlmbridge.pool import EngineSlot, ModelPool
from vlmbridge.server.convert import ImageLoader, VideoLoader
from vlmbridge.server.metrics import Metrics
from vlmbridge.settings import Settings

__all__ = ["AppState", "EngineSlot", "Lifecycle"]

log = logging.getLogger(__name__)


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
    pool: ModelPool
    metrics: Metrics
    load_image: ImageLoader
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    load_video: VideoLoader | None = None  # None: video files are refused (frame lists still work)
    pixel_gate: PixelGate = field(default_factory=lambda: PixelGate(1 << 34))  # decoded pixels held at once
    # The processor's CPU work (templating, image resizing) runs in threads; bound it so it cannot starve decoding.
    prepare_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    def settings_for(self, slot: EngineSlot) -> Settings:
        """The settings a request to `slot` is converted with: a models-file entry's own (image and video counts,
        pixel and frame budgets) over the server's. The engine reserved for those, so the front admits by them."""
        spec = slot.spec
        if spec is None:
            return self.settings
        return self.settings.model_copy(update=spec.settings.model_dump())
