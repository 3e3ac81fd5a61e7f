"""API-key check: `Authorization: Bearer KEY`, compared in constant time against every configured key.

It runs as ASGI middleware, before any route reads the body: an unauthenticated 50 MB upload costs a 401, not
50 MB of parsing.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from vlmbridge.errors import AuthenticationError
from vlmbridge.server.errors import error_body, send_error

__all__ = ["AuthMiddleware", "check_api_key"]

# Paths anyone may read: liveness for orchestrators, and the API description.
_PUBLIC = frozenset({"/health", "/openapi.json"})


def check_api_key(header: str, keys: list[SecretStr]) -> None:
    """Raise AuthenticationError unless `header` is `Bearer <one of keys>` (no keys configured: anyone)."""
    if not keys:
        return
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    given = token.strip().encode()
    # Compare against every key without stopping early, so timing reveals nothing about which key nearly matched.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.get_secret_value().encode())
    if not ok:
        raise AuthenticationError("invalid API key")


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: list[SecretStr], *, public_metrics: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.public = _PUBLIC | ({"/metrics"} if public_metrics else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys or path in self.public or path.startswith("/admin/"):
            await self.app(scope, receive, send)
            return
        header = ""
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            check_api_key(header, self.keys)
        except AuthenticationError as exc:
            await send_error(send, 401, error_body(exc), (b"www-authenticate", b"Bearer"))
            return
        await self.app(scope, receive, send)
