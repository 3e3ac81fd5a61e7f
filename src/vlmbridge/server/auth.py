"""API-key check: `Authorization: Bearer KEY`, compared in constant time against every configured key."""

from __future__ import annotations

import hmac

from fastapi import Request

from vlmbridge.errors import AuthenticationError

__all__ = ["require_api_key"]


def require_api_key(request: Request) -> None:
    keys = request.app.state.vlm.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
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
