"""Every error path answers with its status and the OpenAI envelope; the server stays up for everyone else."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TinyFactory
from tests.helpers import png_bytes, png_claiming
from tests.server_utils import MODEL, Server, data_url, image_message, running


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(
        tiny_model("qwen3_vl"), max_images=2, max_image_bytes=200_000, max_body_bytes=2_000_000, context_length=256
    ) as s:
        yield s


def assert_error(
    r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err  # type: ignore[no-any-return]


def b64_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


IMG0 = "messages[0].content[0].image_url"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,@@not-base64@@", "invalid_base64"),
        (b64_url(b"definitely not an image"), "invalid_image"),
        (b64_url(png_bytes(), "text/plain"), None),
        (b64_url(png_claiming(30000, 30000)), "image_too_large"),
        (b64_url(png_bytes(600, 600, seed=1)), "image_too_large"),  # over max_image_bytes (200 kB)
        ("ftp://example.com/cat.png", None),
        ("file:///etc/passwd", None),
        ("/etc/passwd", None),
    ],
)
def test_bad_images_are_400(server: Server, url: str, code: str | None) -> None:
    err = assert_error(server.post({"model": MODEL, "messages": image_message(url)}), 400, param=IMG0)
    if code:
        assert err["code"] == code
    assert "base64," not in err["message"]  # never echo payloads


def test_too_many_images(server: Server) -> None:
    parts = [{"type": "image_url", "image_url": {"url": data_url(32, 32, seed=i)}} for i in range(3)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]}
    assert_error(server.post(body), 400, code="too_many_images")


def test_prompt_beyond_context_counts_image_tokens(server: Server) -> None:
    err = assert_error(
        server.post({"model": MODEL, "messages": image_message(data_url(640, 480, seed=None))}),
        400,
        code="context_length_exceeded",
    )
    assert "300 of them image tokens" in err["message"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    assert_error(server.post(body), 400, code="context_length_exceeded", param="max_tokens")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "best_of": 3}, "best_of"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "sticker"}]}]}, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         "tools.0.function"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
         "response_format.json_schema"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "not": {}}}}},
         "response_format.json_schema.schema"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, "functions"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]}, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
         "stream_options"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 40}, "stop"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_field(server: Server, body: dict[str, Any], param: str | None) -> None:
    err = assert_error(server.post(body), 400)
    if param is not None:
        assert err["param"] == param


def test_invalid_json(server: Server) -> None:
    r = httpx.post(f"{server.v1}/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_unknown_model_and_paths_are_404(server: Server) -> None:
    assert_error(
        server.post({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}), 404, code="model_not_found"
    )
    for path in ("/v1/completions", "/v1/embeddings", "/v1/audio/speech", "/nope"):
        assert_error(httpx.post(f"{server.base_url}{path}", json={}), 404)


def test_body_too_large_is_413(server: Server) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3_000_000}]}
    assert_error(server.post(big), 413, code="payload_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 100_000
        yield b'"}]}'

    r = httpx.post(f"{server.v1}/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_text_only_model_refuses_images(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen2")) as s:
        err = assert_error(s.post({"model": MODEL, "messages": image_message(data_url())}), 400)
    assert "text-only" in err["message"]


def test_api_keys(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen2"), api_keys=["k1", "k2"]) as s:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        r = s.post(body)
        assert_error(r, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(s.post(body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(s.post(body, headers={"Authorization": "Basic k1"}), 401)
        assert s.post(body, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert_error(httpx.get(f"{s.v1}/models"), 401)
        assert httpx.get(f"{s.base_url}/health").status_code == 200  # health checks need no key
        with pytest.raises(openai.AuthenticationError):
            s.openai(api_key="wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_not_ready_is_503_and_health_says_why(tiny_model: TinyFactory) -> None:
    from vlmbridge.server.factory import build_slot
    from vlmbridge.server.state import EngineSlot
    from vlmbridge.settings import Settings

    release = threading.Event()
    real = build_slot(Settings(served_model_name=MODEL, engine_worker="thread"), tiny_model("qwen2"))

    def slow_factory():  # type: ignore[no-untyped-def]
        release.wait(60)
        return real.build(None)[0]

    slot = EngineSlot(MODEL, factory=slow_factory)
    from tests.server_utils import ServerThread, create_app

    with ServerThread(create_app(Settings(served_model_name=MODEL), slot)) as base:
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(
            f"{base}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert_error(r, 503, code="model_not_ready")
        release.set()
        slot.wait_loaded(60)
        assert httpx.get(f"{base}/health").status_code == 200


def test_failed_load_is_reported_not_fatal(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2")
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)  # a truncated download
    with running(folder, skip_doctor=True) as s:
        health = httpx.get(f"{s.base_url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "safetensor" in health.json()["error"]["message"].lower()
        assert_error(s.post({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}), 503)


def test_request_timeout(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen2"), request_timeout=0.3) as s:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20000,
            "ignore_eos": True,
        }
        assert_error(s.post(body), 504, code="request_timeout")
        with httpx.stream("POST", f"{s.v1}/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            raw = r.read().decode()
        events = [b for b in raw.split("\n\n") if b.startswith("data:")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
        assert s.post({**body, "max_tokens": 2}).status_code == 200  # still serving


def test_bad_requests_do_not_disturb_a_running_stream(server: Server) -> None:
    client = server.openai()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell a story"}], max_tokens=60, stream=True
    )
    got = []
    for i, event in enumerate(stream):
        if i == 2:
            for _ in range(3):
                assert (
                    server.post({"model": MODEL, "messages": image_message("data:image/png;base64,xx")}).status_code
                    == 400
                )
        if event.choices and event.choices[0].finish_reason:
            got.append(event.choices[0].finish_reason)
    assert got == ["length"] or got == ["stop"]
