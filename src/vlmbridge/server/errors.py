"""Typed errors → HTTP status and the OpenAI error envelope, defined once for the whole server.

Envelope: {"error": {"message", "type", "param", "code"}}. Client mistakes are 4xx; only our own bugs are 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmbridge.errors import (
    AuthenticationError,
    ContextLengthError,
    EngineNotReadyError,
    InvalidRequestError,
    ModelNotFoundError,
    NotSupportedError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    VlmbridgeError,
)

__all__ = ["envelope", "error_body", "install_error_handlers", "status_for"]

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
    EngineNotReadyError: (503, "service_unavailable", "model_not_ready"),
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


def _response(status: int, body: dict[str, Any]) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def typed(_: Request, exc: Exception) -> JSONResponse:
        status = status_for(exc)[0]
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return _response(status, error_body(exc))

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
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
        return _response(exc.status_code, envelope(text, err_type, code=code or str(exc.status_code)))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", exc)
        return _response(500, envelope("internal server error; see the server log", "internal_error"))

    app.add_exception_handler(VlmbridgeError, typed)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)
