"""What Dify's OpenAI-compatible provider sends and how it parses answers (shared/reference/dify-facts.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.server_utils import MODEL, Server, data_url, running


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl"), api_keys=["dify-key"], keepalive_interval=0.001) as s:
        yield s


HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer dify-key"}


def dify_stream(server: Server, body: dict) -> tuple[list[dict], list[str]]:  # type: ignore[type-arg]
    """Dify's parser: split the body on the exact '\\n\\n', skip ':' lines, strip 'data:', stop at [DONE]."""
    chunks: list[dict] = []  # type: ignore[type-arg]
    comments: list[str] = []
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=HEADERS, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert "\r\n" not in raw
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        if block.startswith(":"):
            comments.append(block)
            continue
        assert block.startswith("data:"), block
        data = block[len("data:") :].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)  # a non-JSON chunk would end Dify's stream with "Non-JSON encountered."
        assert "choices" in chunk, chunk
        chunks.append(chunk)
    return chunks, comments


def test_validate_credentials_ping(server: Server) -> None:
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "ping"}]}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200
    assert r.json().get("object") in (None, "", "chat.completion")


def test_vision_request_stream_as_dify_parses_it(server: Server) -> None:
    body = {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
        "top_p": 0.9,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "max_tokens": 8,
        "user": "dify-user-123",
        "messages": [
            {"role": "system", "content": "You are a product tagger."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(320, 240, seed=4), "detail": "high"}},
                    {"type": "text", "text": "Tag this product."},
                ],
            },
        ],
    }
    chunks, comments = dify_stream(server, body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert isinstance(text, str)
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["prompt_tokens_details"]["image_tokens"] == 80
    assert all(c.startswith(": keep-alive") for c in comments)


def test_blocking_request_as_dify_reads_it(server: Server) -> None:
    body = {
        "model": MODEL,
        "stream": False,
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(64, 64, seed=2), "detail": "low"}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
    }
    r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200
    payload = r.json()
    assert isinstance(payload["choices"][0]["message"]["content"], str)
    assert payload["usage"]["completion_tokens"] >= 1
    # The picture was fed: 64×64 is raised to Qwen3-VL's 256×256 minimum → 8×8 merged patches.
    assert payload["usage"]["prompt_tokens_details"]["image_tokens"] == 64


def test_extended_mode_chat_template_kwargs(server: Server) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 3,
        "chat_template_kwargs": {"enable_thinking": False},
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert httpx.post(f"{server.v1}/chat/completions", json=body, headers=HEADERS, timeout=120).status_code == 200


def test_stream_error_is_a_final_error_event(server: Server) -> None:
    """Errors found before streaming starts are plain 4xx responses (Dify raises on non-200)."""
    body = {
        "model": MODEL,
        "stream": True,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}
        ],
    }
    r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_extended_mode_top_level_thinking_fields(server: Server) -> None:
    """Dify's built-in provider in extended compatibility mode adds `thinking`/`enable_thinking` at top level."""
    for extra in ({"enable_thinking": False}, {"thinking": {"type": "disabled"}}, {"thinking": True}):
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra}
        r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=HEADERS, timeout=120)
        assert r.status_code == 200, r.text


def test_thinking_switch_reaches_the_template() -> None:
    from vlmbridge.server.schemas import ChatCompletionRequest

    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert ChatCompletionRequest(**base, enable_thinking=False).template_kwargs == {"enable_thinking": False}
    assert ChatCompletionRequest(**base, thinking={"type": "enabled"}).template_kwargs == {"enable_thinking": True}
    explicit = ChatCompletionRequest(**base, enable_thinking=True, chat_template_kwargs={"enable_thinking": False})
    assert explicit.template_kwargs == {"enable_thinking": False}
