"""ASGI middleware that refuses requests cheaply: bodies over the limit before they are buffered, and everything
but /health and /metrics while the server drains."""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmbridge.errors import ShuttingDownError
from vlmbridge.memtrim import release_memory
from vlmbridge.server.errors import envelope, error_body, send_error
from vlmbridge.server.state import Lifecycle

__all__ = ["LARGE_REQUEST_BYTES", "BodySizeLimit", "DrainGate"]

LARGE_REQUEST_BYTES = 8 << 20  # after a body this large, memory goes back to the OS before the answer does


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, 413, envelope(self._message(), "invalid_request_error", code="payload_too_large"))
            return
        seen = 0

        async def counting_receive() -> Message:
            # Chunked bodies have no content-length: count as they arrive and stop at the limit.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        async def releasing_send(message: Message) -> None:
            # After a large body, give its memory back before the last byte goes out, so that a client that sees
            # the answer also sees the memory returned.
            if seen >= LARGE_REQUEST_BYTES and message["type"] == "http.response.body" and not message.get("more_body"):
                await asyncio.to_thread(release_memory, collect=True)
            await send(message)

        await self.app(scope, counting_receive, releasing_send)


class DrainGate:
    """While draining, new requests get 503 `shutting_down` before their body is read (a load balancer retries
    them elsewhere); /health says "draining" and /metrics still answers."""

    _OPEN = frozenset({"/health", "/metrics"})

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.lifecycle.draining or scope.get("path") in self._OPEN:
            await self.app(scope, receive, send)
            return
        error = ShuttingDownError("the server is shutting down; retry on another replica", code="shutting_down")
        await send_error(send, 503, error_body(error), (b"retry-after", b"1"))
