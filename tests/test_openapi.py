"""/openapi.json describes what the server really sends: its statuses, the OpenAI error envelope, the event stream.

Document checks first, then real answers (an app with no model, or a stand-in engine whose queue is full) validated
against the document by schemathesis; tests/test_fuzz_api.py does the same for generated requests on a real model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import checks
from schemathesis.core.failures import FailureGroup

from vlmbridge.engine.base import Engine
from vlmbridge.server import create_app
from vlmbridge.server.openapi import OPERATION_STATUSES, describe_responses, install_openapi
from vlmbridge.server.state import EngineSlot
from vlmbridge.settings import Settings

MODEL = "tiny"
KEY = "k-openapi"
# 503s are expected here: conformance only.
CONFORMANCE = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def make_app(slot: EngineSlot | None = None, **settings: Any) -> tuple[Any, Settings]:
    cfg = Settings(served_model_name=MODEL, **settings)
    app = create_app(cfg, slot or EngineSlot(MODEL))  # a slot without a factory never loads: "loading" for ever
    install_openapi(app, cfg)
    return app, cfg


def document(**settings: Any) -> dict[str, Any]:
    app, _ = make_app(**settings)
    response = TestClient(app).get("/openapi.json")
    assert response.status_code == 200
    return cast(dict[str, Any], response.json())


def statuses(doc: dict[str, Any], method: str, path: str) -> set[int]:
    return {int(code) for code in doc["paths"][path][method]["responses"]}


def test_document_is_valid_openapi() -> None:
    for settings in ({}, {"api_keys": [KEY]}, {"api_keys": [KEY], "public_metrics": True}):
        schemathesis.openapi.from_dict(document(**settings)).validate()


def test_statuses_are_the_ones_the_server_sends() -> None:
    doc = document()
    assert statuses(doc, "post", "/v1/chat/completions") == {200, 400, 401, 404, 413, 429, 500, 503, 504}
    assert statuses(doc, "post", "/v1/tokenize") == {200, 400, 401, 404, 413, 429, 503}
    assert statuses(doc, "get", "/v1/models") == {200, 401, 503}
    assert statuses(doc, "get", "/health") == {200, 503}
    assert statuses(doc, "get", "/metrics") == {200, 401}
    assert "/tokenize" not in doc["paths"]  # vLLM's spelling stays out of the document
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text and "ValidationError" not in text


def test_every_documented_operation_is_known() -> None:
    """A new route gets FastAPI's bare 200 until OPERATION_STATUSES describes it: make that a failing test."""
    doc = document()
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert described <= set(OPERATION_STATUSES)


def test_errors_use_the_openai_envelope() -> None:
    doc = document()
    envelope = doc["components"]["schemas"]["ErrorResponse"]
    assert envelope["required"] == ["error"]
    assert envelope["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for code, response in op["responses"].items():
                if code == "200":
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                wanted = "HealthNotReady" if path == "/health" else "ErrorResponse"
                assert ref == f"#/components/schemas/{wanted}", (path, code)


def test_chat_answers_json_or_an_event_stream() -> None:
    ok = document()["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"] == "#/components/schemas/ChatCompletion"
    event = ok["text/event-stream"]["schema"]
    assert event["required"] == ["data"]
    assert {"const": "[DONE]", "type": "string"} in event["properties"]["data"]["anyOf"]


def test_headers_of_429_503_and_401() -> None:
    doc = document()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    for code in ("429", "503"):
        assert chat[code]["headers"]["Retry-After"]["required"] is True
        assert chat[code]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    assert chat["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert doc["paths"]["/health"]["get"]["responses"]["503"]["headers"]["Retry-After"]["required"] is True


def test_security_follows_the_settings() -> None:
    open_doc = document()
    assert "securitySchemes" not in open_doc["components"]
    assert all("security" not in op for ops in open_doc["paths"].values() for op in ops.values())

    keyed = document(api_keys=[KEY])
    assert keyed["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the server's API keys (--api-key).",
    }
    secured = {path for path, ops in keyed["paths"].items() for op in ops.values() if "security" in op}
    assert secured == {"/v1/chat/completions", "/v1/tokenize", "/v1/models", "/metrics"}

    public = document(api_keys=[KEY], public_metrics=True)
    assert "security" not in public["paths"]["/metrics"]["get"]
    assert statuses(public, "get", "/metrics") == {200}


def test_cached_like_fastapi_and_idempotent() -> None:
    app, cfg = make_app()
    first = app.openapi()
    assert app.openapi() is first and app.openapi_schema is first
    install_openapi(app, cfg)  # a second install (the test's and create_app's own) changes nothing
    assert app.openapi() == first
    assert describe_responses(json.loads(json.dumps(first)), api_keys=False) == first


# --- real answers, validated against the document ------------------------------------------------------------------


class FullQueueEngine:
    """A stand-in for a ready engine whose queue is full: the chat route refuses before touching anything else."""

    state = "ready"
    state_reason = "ready"
    prepares_in_process = True

    def queue_depth(self) -> int:
        return 1_000_000

    def shutdown(self) -> None:
        pass


@pytest.fixture
def no_model() -> Iterator[tuple[TestClient, schemathesis.BaseSchema]]:
    app, _ = make_app(api_keys=[KEY], max_body_bytes=4096)
    with TestClient(app) as client:  # runs the lifespan: app state, the slot "loading"
        yield client, schemathesis.openapi.from_dict(app.openapi())


def conforms(
    schema: schemathesis.BaseSchema, method: str, path: str, response: httpx.Response, body: Any = None
) -> None:
    operation = schema[path][method.upper()]
    case = operation.Case() if body is None else operation.Case(body=body, media_type="application/json")
    case.validate_response(response, checks=CONFORMANCE)


def test_error_answers_conform(no_model: tuple[TestClient, schemathesis.BaseSchema]) -> None:
    client, schema = no_model
    auth = {"Authorization": f"Bearer {KEY}"}
    cases: list[tuple[str, str, Any, dict[str, str], int]] = [
        ("post", "/v1/chat/completions", CHAT, {}, 401),
        ("post", "/v1/chat/completions", {**CHAT, "model": "other"}, auth, 404),
        ("post", "/v1/chat/completions", {**CHAT, "n": 2}, auth, 400),
        ("post", "/v1/chat/completions", {**CHAT, "junk": "x" * 5000}, auth, 413),
        ("post", "/v1/chat/completions", CHAT, auth, 503),  # the model is still "loading"
        ("post", "/v1/tokenize", {"messages": CHAT["messages"]}, auth, 503),
        ("post", "/v1/tokenize", {"messages": []}, auth, 400),
        ("get", "/v1/models", None, {}, 401),
        ("get", "/v1/models", None, auth, 200),
        ("get", "/metrics", None, {}, 401),
        ("get", "/metrics", None, auth, 200),
        ("get", "/health", None, {}, 503),
    ]
    for method, path, body, headers, status in cases:
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code == status, (path, response.text)
        conforms(schema, method, path, response, body)
        if status in (429, 503):
            assert response.headers["Retry-After"].isdigit()
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"


def test_draining_answers_conform(no_model: tuple[TestClient, schemathesis.BaseSchema]) -> None:
    client, schema = no_model
    auth = {"Authorization": f"Bearer {KEY}"}
    client.app.state.lifecycle.draining = True  # type: ignore[attr-defined]
    for method, path, body in (("post", "/v1/chat/completions", CHAT), ("get", "/v1/models", None)):
        response = client.request(method, path, json=body, headers=auth)
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
        conforms(schema, method, path, response, body)
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "draining"
    conforms(schema, "get", "/health", health)


def test_queue_full_429_conforms() -> None:
    app, _ = make_app(slot=EngineSlot(MODEL, engine=cast(Engine, FullQueueEngine())))
    schema = schemathesis.openapi.from_dict(app.openapi())
    with TestClient(app) as client:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/tokenize", {"messages": CHAT["messages"]})):
            response = client.post(path, json=body)
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "queue_full"
            assert response.headers["Retry-After"] == "1"
            conforms(schema, "post", path, response, body)


def sse_response(events: list[str]) -> httpx.Response:
    body = "".join(f"data: {event}\n\n" for event in events)
    request = httpx.Request("POST", "http://test/v1/chat/completions", json={**CHAT, "stream": True})
    headers = {"content-type": "text/event-stream; charset=utf-8"}
    response = httpx.Response(200, headers=headers, text=body, request=request)
    response.elapsed = timedelta(0)  # set by a client's transport; schemathesis reads it
    return response


def test_event_stream_events_are_validated() -> None:
    """The event schema is not decoration: schemathesis checks each event's JSON against ChatCompletionChunk."""
    app, _ = make_app()
    schema = schemathesis.openapi.from_dict(app.openapi())
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    good = [
        json.dumps({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        json.dumps({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
        json.dumps({"error": {"message": "boom", "type": "internal_error", "param": None, "code": "engine_error"}}),
        "[DONE]",
    ]
    conforms(schema, "post", "/v1/chat/completions", sse_response(good), {**CHAT, "stream": True})
    bad = [json.dumps({**chunk, "object": "chat.completion", "choices": "nope"}), "[DONE]"]
    with pytest.raises(FailureGroup) as failed:
        conforms(schema, "post", "/v1/chat/completions", sse_response(bad), {**CHAT, "stream": True})
    assert any("SSE event violates schema" in str(exc) for exc in failed.value.exceptions)
