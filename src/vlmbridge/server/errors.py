"""Typed errors → HTTP status and the OpenAI error envelope, defined once for the whole server.

Envelope: {"error": {"message", "type", "param", "code"}}. Client mistakes are 4xx; only our own bugs are 500.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmbridge.errors import (
    AuthenticationError,
    ContextLengthError,
    EngineFailedError,
    EngineNotReadyError,
    InvalidRequestError,
    ModelNotFoundError,
    NotSupportedError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
    VlmbridgeError,
)

__all__ = [
    "InternalErrors",
    "bounded_traceback",
    "envelope",
    "error_body",
    "install_error_handlers",
    "retry_after",
    "send_error",
    "status_for",
]

log = logging.getLogger(__name__)

# (status, OpenAI error type, default code); the first class in an exception's MRO found here wins.
_STATUS: dict[type[Exception], tuple[int, str, str | None]] = {
    ContextLengthError: (400, "invalid_request_error", "context_length_exceeded"),
    InvalidRequestError: (400, "invalid_request_error", None),
    NotSupportedError: (400, "invalid_request_error", "not_supported"),
    AuthenticationError: (401, "authentication_error", "invalid_api_key"),
    ModelNotFoundError: (404, "invalid_request_error", "model_not_found"),
    PayloadTooLargeError: (413, "invalid_request_error", "payload_too_large"),
    QueueFullError: (429, "rate_limit_error", "queue_full"),
    ShuttingDownError: (503, "service_unavailable", "shutting_down"),
    EngineNotReadyError: (503, "service_unavailable", "model_not_ready"),
    EngineFailedError: (500, "internal_error", "engine_error"),
    RequestTimeoutError: (504, "timeout_error", "request_timeout"),
}


def status_for(exc: BaseException) -> tuple[int, str, str | None]:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500, "internal_error", "internal_error"


def error_body(exc: BaseException) -> dict[str, Any]:
    """The envelope for a typed error (used for responses and for the final event of a broken stream)."""
    status, err_type, code = status_for(exc)
    if isinstance(exc, VlmbridgeError):
        message = exc.message + (f" ({exc.fix})" if exc.fix and status >= 500 else "")
    else:
        message = "internal server error; see the server log"
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None) or code
    return envelope(message, err_type, param=param, code=code)


def envelope(message: str, err_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


async def send_error(send: Send, status: int, body: dict[str, Any], *headers: tuple[bytes, bytes]) -> None:
    """Answer straight from ASGI middleware (before any route, or instead of one) with an error envelope. The
    connection is closed: the request's body may not have been read, so it cannot carry another request."""
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def retry_after(exc: BaseException) -> str | None:
    """Retry-After (whole seconds) for load and availability errors: clients back off instead of hammering."""
    status = status_for(exc)[0]
    if status not in (429, 503):
        return None
    seconds = float(getattr(exc, "retry_after", 1.0) or 1.0)
    return str(max(1, math.ceil(seconds)))


def _response(status: int, body: dict[str, Any], exc: BaseException | None = None) -> JSONResponse:
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc is not None and (after := retry_after(exc)) is not None:
        headers["Retry-After"] = after
    return JSONResponse(body, status_code=status, headers=headers or None)


def bounded_traceback(exc: BaseException, frames: int = 12, chars: int = 4000) -> str:
    """The last frames of a traceback, cut to a bound: a RecursionError must not write half a megabyte of log."""
    text = "".join(traceback.format_exception(exc, limit=-frames))
    return text if len(text) <= chars else text[: chars // 2] + "\n[…]\n" + text[-chars // 2 :]


class InternalErrors:
    """Turns an unhandled exception (a bug) into one 500 with the envelope and one bounded log entry.

    Without this, Starlette logs the traceback, re-raises it to uvicorn, which logs it again and drops the
    connection without `Connection: close` (a pooled client's next request then fails with a reset).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            request_id = uuid.uuid4().hex[:12]
            log.error(
                "internal error %s on %s %s: %s",
                request_id,
                scope.get("method"),
                scope.get("path"),
                bounded_traceback(exc),
            )
            if started:  # a response is under way: all we can do is end it (uvicorn closes the connection)
                return
            message = f"internal server error (request id {request_id}); see the server log"
            await send_error(send, 500, envelope(message, "internal_error", code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    async def typed(_: Request, exc: Exception) -> JSONResponse:
        status = status_for(exc)[0]
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return _response(status, error_body(exc), exc)

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            why = str((first.get("ctx") or {}).get("error", "")).split(": line ")[0]
            msg, param = "the request body is not valid JSON" + (f": {why}" if why else ""), None
        elif first.get("type") == "extra_forbidden":
            msg = f"unsupported field {loc[-1]!r}" if loc else "unsupported field"
        else:
            msg = f"{param}: {msg}" if param else msg
        return _response(400, envelope(msg, "invalid_request_error", param=param, code="invalid_value"))

    async def http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        text = {404: "no such endpoint", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code)
        err_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        response = _response(exc.status_code, envelope(text, err_type, code=code or str(exc.status_code)))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    app.add_exception_handler(VlmbridgeError, typed)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_middleware(InternalErrors)  # innermost of our middleware: the metrics around it count its 500s
