"""Running the app with uvicorn: in the foreground (`vlmbridge serve`) or in a thread (demo, tests, benchmarks).

In the foreground, SIGTERM/SIGINT drain instead of stopping at once: /health turns 503 "draining", new requests
get 503 `shutting_down`, requests in flight get `shutdown_grace` seconds to finish, and only then does uvicorn
close its sockets. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import FrameType
from typing import Any

import uvicorn

from vlmbridge.server.state import Lifecycle

__all__ = ["DrainingServer", "ServerThread", "uvicorn_config"]

log = logging.getLogger(__name__)

# After the drain, what uvicorn still waits for: responses that are writing their last bytes.
_CLOSE_GRACE = 5


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # our metrics count requests; access logs would carry Dify's signed image URLs
        timeout_graceful_shutdown=_CLOSE_GRACE,
        lifespan="on",
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain of `grace` seconds between the first signal and closing the sockets."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace: float) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._grace = grace
        self._drain_requested = False
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:  # the second signal: stop now, as plain uvicorn does
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        self._drain_requested = True  # a signal handler must not touch the loop; on_tick starts the drain

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain is None:
            log.warning("draining: up to %.0fs for %d request(s) in flight", self._grace, self._lifecycle.in_flight)
            self._drain = asyncio.create_task(self._run_drain())
        return await super().on_tick(counter)

    async def _run_drain(self) -> None:
        try:
            await self._lifecycle.drain(self._grace)
        finally:
            self.should_exit = True


class ServerThread:
    """uvicorn serving `app` on a background thread; `start()` returns the base URL once it accepts connections."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn_config(app, host, port))
        self._thread = threading.Thread(target=self.server.run, name="vlmbridge-http", daemon=True)

    def start(self, timeout: float = 60.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
