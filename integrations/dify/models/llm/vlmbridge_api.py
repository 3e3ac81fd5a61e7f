"""The vlmbridge server's HTTP API as the plugin uses it: typed errors from its envelope, /models, /tokenize, chat.

Error tree (each class decides which Dify invoke error it becomes, so nothing matches on message text):

    ServerError            a non-200 answer; carries status, message, type, code, param from the OpenAI envelope
    ├── BadRequest         400, 404, 413, 422 and other 4xx: the request (or the model name) is wrong
    ├── Unauthorized       401, 403: missing or wrong API key
    ├── RateLimited        429: the server's queue is full
    ├── TimedOut           408, 504: the request ran past the server's deadline
    └── Unavailable        500, 502, 503: the model is loading, failed, or the server broke
"""

from __future__ import annotations

import json
from typing import Any

import requests
from dify_plugin.errors.model import (
    InvokeAuthorizationError,
    InvokeBadRequestError,
    InvokeConnectionError,
    InvokeError,
    InvokeRateLimitError,
    InvokeServerUnavailableError,
)

CONNECT_TIMEOUT = 10.0
PROBE_TIMEOUT = (CONNECT_TIMEOUT, 60.0)  # /models and /tokenize answer in well under a minute, even with images


class ServerError(Exception):
    """A non-200 answer from the server."""

    def __init__(self, status: int, message: str, *, err_type: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code

    def __str__(self) -> str:
        return f"HTTP {self.status}{f' ({self.code})' if self.code else ''}: {self.message}"


class BadRequest(ServerError):
    pass


class Unauthorized(ServerError):
    pass


class RateLimited(ServerError):
    pass


class TimedOut(ServerError):
    pass


class Unavailable(ServerError):
    pass


# What `LargeLanguageModel.invoke` turns an exception raised by `_invoke` into (the first matching class wins).
INVOKE_ERROR_MAPPING: dict[type[InvokeError], list[type[Exception]]] = {
    InvokeConnectionError: [requests.exceptions.ConnectionError, requests.exceptions.Timeout, TimedOut],
    InvokeServerUnavailableError: [Unavailable],
    InvokeRateLimitError: [RateLimited],
    InvokeAuthorizationError: [Unauthorized],
    InvokeBadRequestError: [BadRequest, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema],
}

# The envelope's `type` of an error sent inside a stream (after the 200 status line) → Dify's error class.
_EVENT_ERRORS: dict[str, type[InvokeError]] = {
    "invalid_request_error": InvokeBadRequestError,
    "authentication_error": InvokeAuthorizationError,
    "rate_limit_error": InvokeRateLimitError,
    "timeout_error": InvokeConnectionError,
}


def _class_for(status: int) -> type[ServerError]:
    if status in (401, 403):
        return Unauthorized
    if status == 429:
        return RateLimited
    if status in (408, 504):
        return TimedOut
    if status >= 500:
        return Unavailable
    return BadRequest


def error_from_response(response: requests.Response) -> ServerError:
    """The typed error for a non-200 response, with the envelope's message (or the start of the body)."""
    err: dict[str, Any] = {}
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
    except ValueError:
        pass
    message = str(err.get("message") or response.text[:500] or response.reason or "no details")
    cls = _class_for(response.status_code)
    return cls(response.status_code, message, err_type=err.get("type"), code=err.get("code"))


def error_from_event(error: Any) -> InvokeError:
    """Dify's error for an `{"error": {...}}` event that ended a stream."""
    if not isinstance(error, dict):
        return InvokeServerUnavailableError(f"[vlmbridge] the stream ended with an error: {error}")
    cls = _EVENT_ERRORS.get(str(error.get("type")), InvokeServerUnavailableError)
    code = f" ({error['code']})" if error.get("code") else ""
    return cls(f"[vlmbridge] {cls.description}{code}: {error.get('message', error)}")


def base_url(credentials: dict[str, Any]) -> str:
    return str(credentials["endpoint_url"]).strip().rstrip("/")


def headers(credentials: dict[str, Any]) -> dict[str, str]:
    out = {"Content-Type": "application/json", "Accept-Charset": "utf-8"}
    extra = credentials.get("extra_headers")
    if isinstance(extra, dict):
        out.update({str(k): str(v) for k, v in extra.items()})
    if credentials.get("api_key"):
        out["Authorization"] = f"Bearer {credentials['api_key']}"
    return out


def _checked(response: requests.Response) -> requests.Response:
    if response.status_code != 200:
        try:
            raise error_from_response(response)
        finally:
            response.close()
    if response.encoding is None or response.encoding == "ISO-8859-1":
        response.encoding = "utf-8"  # JSON and SSE are UTF-8; requests guesses Latin-1 for text/* without charset
    return response


def post_chat(credentials: dict[str, Any], body: dict[str, Any], *, read_timeout: float) -> requests.Response:
    """POST /chat/completions; returns the open 200 response (streamed when body["stream"]) or raises ServerError."""
    response = requests.post(
        f"{base_url(credentials)}/chat/completions",
        headers=headers(credentials),
        data=json.dumps(body, ensure_ascii=False).encode(),
        timeout=(CONNECT_TIMEOUT, read_timeout),
        stream=bool(body.get("stream")),
    )
    return _checked(response)


def list_models(credentials: dict[str, Any]) -> list[dict[str, Any]]:
    """GET /models: the entries the server serves (id, max_model_len, the "vlmbridge" extension)."""
    response = _checked(
        requests.get(f"{base_url(credentials)}/models", headers=headers(credentials), timeout=PROBE_TIMEOUT)
    )
    data = response.json().get("data")
    return [m for m in data if isinstance(m, dict) and m.get("id")] if isinstance(data, list) else []


def count_tokens(credentials: dict[str, Any], model: str, messages: list[dict[str, Any]]) -> int:
    """Prompt tokens as the server's own tokenizer and image processor count them (POST /tokenize)."""
    response = _checked(
        requests.post(
            f"{base_url(credentials)}/tokenize",
            headers=headers(credentials),
            data=json.dumps({"model": model, "messages": messages}, ensure_ascii=False).encode(),
            timeout=PROBE_TIMEOUT,
        )
    )
    return int(response.json()["count"])
