"""The OpenAPI document as the server really answers: FastAPI's generated schema, post-processed.

FastAPI documents a 422 with its own validation-error body, which this server never sends (validation errors are
400s in the OpenAI envelope, see errors.py), and knows nothing of the statuses raised from typed errors, the
middleware's 413 or the `text/event-stream` answer of a streamed chat completion. `describe_responses` replaces
each operation's responses with the ones the server sends; `install_openapi` makes `app.openapi()` (and so
/openapi.json) return that document, cached on `app.openapi_schema` as FastAPI caches its own.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from fastapi import FastAPI

from vlmbridge.settings import Settings

__all__ = ["ERROR_RESPONSE", "OPERATION_STATUSES", "describe_responses", "install_openapi"]

Schema = dict[str, Any]

_REF = "#/components/schemas/"
_NULLABLE_STRING: Schema = {"anyOf": [{"type": "string"}, {"type": "null"}]}

ERROR_RESPONSE: Schema = {
    "title": "ErrorResponse",
    "description": "The OpenAI error envelope, used by every error status.",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "description": "What went wrong, for a person to read."},
                "type": {
                    "type": "string",
                    "description": "OpenAI error type, e.g. invalid_request_error, authentication_error, "
                    "rate_limit_error, service_unavailable, internal_error, timeout_error.",
                },
                "param": {**_NULLABLE_STRING, "description": "The request field at fault, dotted, if any."},
                "code": {**_NULLABLE_STRING, "description": "Stable machine-readable code, e.g. model_not_found."},
            },
        }
    },
}

_USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0, "description": "Image tokens included."},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {
                "cached_tokens": {"type": "integer", "minimum": 0},
                "image_tokens": {"type": "integer", "minimum": 0},
                "video_tokens": {"type": "integer", "minimum": 0},
            },
        },
    },
}

_LOGPROBS: Schema = {
    "anyOf": [
        {"type": "null"},
        {"type": "object", "required": ["content"], "properties": {"content": {"type": "array"}}},
    ]
}
_FINISH_REASON: Schema = {"anyOf": [{"type": "string", "enum": ["stop", "length", "tool_calls"]}, {"type": "null"}]}
_TOOL_CALL: Schema = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {
                "name": {"type": "string"},
                "arguments": {"type": "string", "description": "A JSON object, as text."},
            },
        },
    },
}
_TOOL_CALL_DELTA: Schema = {
    "type": "object",
    "required": ["index"],
    "description": 'A call\'s first delta has id, type and function.name (arguments ""); the next ones only '
    "index and function.arguments.",
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "id": {"type": "string"},
        "type": {"type": "string", "const": "function"},
        "function": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}

# Response bodies, registered as components. Objects stay open (no additionalProperties: false) so that adding a
# field to a response is not a breaking change for generated clients.
_COMPONENTS: dict[str, Schema] = {
    "ErrorResponse": ERROR_RESPONSE,
    "Usage": {"title": "Usage", **_USAGE},
    "ChatCompletion": {
        "title": "ChatCompletion",
        "description": "The answer to a chat completion request without `stream: true`.",
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"type": "string", "const": "assistant"},
                                "content": _NULLABLE_STRING,
                                "reasoning_content": {
                                    "type": "string",
                                    "description": "Thinking models' reasoning, apart from the answer.",
                                },
                                "tool_calls": {"type": "array", "items": _TOOL_CALL},
                            },
                        },
                        "logprobs": _LOGPROBS,
                        "finish_reason": _FINISH_REASON,
                    },
                },
            },
            "usage": {"$ref": _REF + "Usage"},
        },
    },
    "ChatCompletionChunk": {
        "title": "ChatCompletionChunk",
        "description": "One server-sent event of a streamed chat completion (`data: <this object>`). A stream that "
        "fails after it started ends with an `ErrorResponse` event instead.",
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "delta"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "delta": {
                            "type": "object",
                            "properties": {
                                "role": {"type": "string"},
                                "content": {"type": "string"},
                                "reasoning_content": {"type": "string"},
                                "tool_calls": {"type": "array", "items": _TOOL_CALL_DELTA},
                            },
                        },
                        "logprobs": _LOGPROBS,
                        "finish_reason": _FINISH_REASON,
                    },
                },
            },
            "usage": {"anyOf": [{"$ref": _REF + "Usage"}, {"type": "null"}]},
        },
    },
    "ModelList": {
        "title": "ModelList",
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"type": "string", "const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                        "max_model_len": {"type": "integer", "description": "Context length, once loaded."},
                        "vlmbridge": {"type": "object", "description": "Model facts, once loaded."},
                    },
                },
            },
        },
    },
    "Health": {
        "title": "Health",
        "type": "object",
        "required": ["status", "model"],
        "properties": {
            "status": {"type": "string", "const": "ok"},
            "model": {"type": "string"},
            "uptime_s": {"type": "number"},
        },
    },
    "HealthNotReady": {
        "title": "HealthNotReady",
        "description": "The error envelope plus `status`: the engine's state (loading, failed, ...).",
        "allOf": [
            {"$ref": _REF + "ErrorResponse"},
            {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        ],
    },
    "TokenizeResponse": {
        "title": "TokenizeResponse",
        "type": "object",
        "required": ["model", "count", "image_tokens", "max_model_len"],
        "properties": {
            "model": {"type": "string"},
            "count": {"type": "integer", "minimum": 0, "description": "Prompt tokens, image tokens included."},
            "image_tokens": {"type": "integer", "minimum": 0},
            "video_tokens": {"type": "integer", "minimum": 0},
            "max_model_len": {"type": "integer"},
        },
    },
}

_RETRY_AFTER: Schema = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 0},
}

# What each error status means here; the body is always the ErrorResponse envelope.
_ERRORS: dict[int, Schema] = {
    400: {
        "description": "Invalid request: body not JSON, a field missing, mistyped or out of range, an unknown field "
        "(named in `param`), an image that cannot be fetched or decoded, too many or too large images, a prompt "
        "beyond the context (image tokens included), or a feature not supported yet."
    },
    401: {
        "description": "Missing or wrong API key (only when the server has API keys).",
        "headers": {
            "WWW-Authenticate": {"description": "Always `Bearer`.", "required": True, "schema": {"type": "string"}}
        },
    },
    404: {"description": "The model named in the request is not served here."},
    413: {"description": "The request body is larger than the server's limit (--max-body-bytes)."},
    429: {
        "description": "The server is at capacity (its queue is full); retry after Retry-After seconds.",
        "headers": {"Retry-After": {**_RETRY_AFTER, "required": True}},
    },
    500: {"description": "The engine failed on this request (a server-side bug); other requests are unaffected."},
    503: {
        "description": "The model is loading, failed to load, or the server is shutting down.",
        "headers": {"Retry-After": {**_RETRY_AFTER, "required": True}},
    },
    504: {"description": "The request ran past the server's request timeout."},
}


# OpenAPI before 3.2 has no `itemSchema`: a text/event-stream `schema` describes each event ({"data", "event",
# "id", "retry"}), the convention 3.2 made explicit and that schemathesis validates, JSON payloads included.
_SSE_EVENT: Schema = {
    "type": "object",
    "description": "One event: `data` holds a ChatCompletionChunk (or an ErrorResponse when the request fails after "
    "the stream started), the last event's `data` is `[DONE]`. Comment lines (`: keep-alive`) may come between.",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"type": "string", "const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [{"$ref": _REF + "ChatCompletionChunk"}, {"$ref": _REF + "ErrorResponse"}]
                    },
                },
            ]
        }
    },
}


def _json(name: str) -> Schema:
    return {"application/json": {"schema": {"$ref": _REF + name}}}


_CHAT_200: Schema = {
    "description": "The completion: a JSON object, or with `stream: true` server-sent events, each "
    "`data: <ChatCompletionChunk>`, ending with `data: [DONE]` (lines starting with `:` are keep-alives).",
    "content": {
        **_json("ChatCompletion"),
        "text/event-stream": {"schema": _SSE_EVENT},
    },
}
_TOKENIZE_200: Schema = {"description": "The prompt's token count.", "content": _json("TokenizeResponse")}
_TOKENIZE = (_TOKENIZE_200, (400, 401, 404, 413, 429, 503))

# (method, path) -> (the 200 response, error statuses). Every path but /health (and /metrics with
# --public-metrics) checks the API key, and every one but /health and /metrics answers 503 while the server drains.
# /tokenize is vLLM's spelling of /v1/tokenize, usually left out of the document; described the same when it is in.
OPERATION_STATUSES: dict[tuple[str, str], tuple[Schema, tuple[int, ...]]] = {
    ("post", "/v1/chat/completions"): (_CHAT_200, (400, 401, 404, 413, 429, 500, 503, 504)),
    ("post", "/v1/tokenize"): _TOKENIZE,
    ("post", "/tokenize"): _TOKENIZE,
    ("get", "/v1/models"): ({"description": "The served model.", "content": _json("ModelList")}, (401, 503)),
    ("get", "/health"): ({"description": "The model is loaded and warmed up.", "content": _json("Health")}, (503,)),
    ("get", "/metrics"): (
        {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        (401,),
    ),
}
_HEALTH_503: Schema = {
    "description": "The model is not ready (loading, failed to load) or the server is draining; `status` says which.",
    "content": _json("HealthNotReady"),
    "headers": {"Retry-After": {**_RETRY_AFTER, "required": True}},
}
_BEARER = "bearerAuth"


def _error(status: int) -> Schema:
    return {**deepcopy(_ERRORS[status]), "content": _json("ErrorResponse")}


def describe_responses(schema: Schema, *, api_keys: bool, public_metrics: bool = False) -> Schema:
    """Replace each known operation's responses with the ones the server sends; drop every 422. In place.

    `api_keys`: the server has keys, so every operation but /health (and /metrics if `public_metrics`) requires a
    bearer token. 401 is listed wherever the key is checked; `security` says whether this server checks it.
    """
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(deepcopy(_COMPONENTS))  # copies: a caller editing its document must not edit ours
    if api_keys:
        components.setdefault("securitySchemes", {})[_BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "description": "One of the server's API keys (--api-key).",
        }
    public = {"/health", "/metrics"} if public_metrics else {"/health"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses: dict[str, Schema] = operation.setdefault("responses", {})
            responses.pop("422", None)
            known = OPERATION_STATUSES.get((method, path))
            if known is None:
                continue  # a route this module does not know yet: FastAPI's 200, nothing invented
            ok, errors = known
            responses.clear()
            responses["200"] = deepcopy(ok)
            for status in errors:
                if status == 401 and path in public:
                    continue
                responses[str(status)] = deepcopy(_HEALTH_503) if path == "/health" else _error(status)
            if api_keys and path not in public:
                operation["security"] = [{_BEARER: []}]
    # FastAPI's 422 body schemas are now unreferenced; left in, they would suggest the server sends them.
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` (served at /openapi.json) return the described document.

    FastAPI's own method generates the document, caches it on `app.openapi_schema` and regenerates it when routes
    change; each document it returns is described once, in place, so the cache holds the described one.
    """
    generate = app.openapi
    app.openapi_schema = None

    def openapi() -> Schema:
        schema = generate()
        if "ErrorResponse" not in schema.get("components", {}).get("schemas", {}):
            describe_responses(schema, api_keys=bool(settings.api_keys), public_metrics=settings.public_metrics)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
