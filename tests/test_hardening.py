"""Hardening: requests that used to stop the engine, exhaust memory or answer 500 now get a clear 4xx, and the server
goes on serving. Each test ends by asking a normal question about a picture and checking the picture's tokens
reached the model."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.helpers import decoded
from tests.memory_probe import MiB, peak_rss, rss
from tests.server_utils import MODEL, Server, data_url, image_message, running
from vlmbridge.media.decode import DecodedImage
from vlmbridge.server import create_app
from vlmbridge.server.factory import build_slot
from vlmbridge.server.runner import ServerThread
from vlmbridge.settings import Settings

IMAGE_TOKENS = 80  # a 320×240 picture on the tiny Qwen3-VL


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl")) as s:
        yield s


def assert_still_serving(s: Server, headers: dict[str, str] | None = None) -> None:
    assert httpx.get(f"{s.base_url}/health").status_code == 200
    r = s.post({"model": MODEL, "messages": image_message(data_url()), "max_tokens": 4}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == IMAGE_TOKENS


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **extra}


# --- 1. sampling cannot stop the engine ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repetition_penalty", 1e-39),  # the request that killed the worker thread
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 10.5),
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", 0),
        ("top_k", -2),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
    ],
)
def test_sampling_out_of_bounds_is_a_400_naming_the_field(server: Server, field: str, value: float) -> None:
    r = server.post(chat(**{field: value, "temperature": 1.0} if field != "temperature" else chat(**{field: value})))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}',
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"x": -Infinity}}',
    ],
)
def test_nan_and_infinity_anywhere_are_a_400(server: Server, raw: str) -> None:
    r = httpx.post(f"{server.v1}/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "not valid JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "extremes",
    [
        {"repetition_penalty": 0.01, "temperature": 1.0},
        {"repetition_penalty": 0.01, "temperature": 2.0},
        {"repetition_penalty": 10.0, "temperature": 2.0},
        {"presence_penalty": 2.0, "frequency_penalty": 2.0, "temperature": 2.0},
        {"presence_penalty": -2.0, "frequency_penalty": -2.0, "temperature": 1.0},
        {"top_p": 1e-9, "temperature": 1.0},
        {"top_k": 1, "temperature": 2.0},
        {"temperature": 1e-6},
        {"repetition_penalty": 0.01, "temperature": 1.0, "logprobs": True, "top_logprobs": 5},
    ],
)
def test_sampling_extremes_within_bounds_answer(server: Server, extremes: dict[str, Any]) -> None:
    r = server.post(chat(max_tokens=12, seed=7, **extremes))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert_still_serving(server)


# --- 2. huge text is refused on its length, before tokenizing --------------------------------------------------------
def _count_prepares(server: Server) -> list[int]:
    engine = server.slot.engine
    calls = [0]
    original = engine.prepare

    def counting(request: Any) -> Any:
        calls[0] += 1
        return original(request)

    engine.prepare = counting  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize(
    "shape",
    ["one-50MB-message", "reasoning", "many-messages"],
)
def test_huge_text_is_refused_before_tokenizing(server: Server, shape: str) -> None:
    big = "a" * (50 * 1000 * 1000)
    if shape == "one-50MB-message":
        messages: list[dict[str, Any]] = [{"role": "user", "content": big}]
    elif shape == "reasoning":
        messages = [{"role": "assistant", "content": "x", "reasoning_content": big}, {"role": "user", "content": "?"}]
    else:
        messages = [{"role": "user", "content": "b" * 12000} for _ in range(4000)]
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 4}).encode()
    del big, messages
    calls = _count_prepares(server)
    try:
        before = rss()
        with peak_rss() as probe:
            r = httpx.post(
                f"{server.v1}/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60
            )
        status, error = r.status_code, r.json()["error"]
        del body, r  # the response holds the request, whose content is the 50 MB body
        assert status == 400, error
        assert error["code"] == "context_length_exceeded"
        assert calls[0] == 0  # decided on the character count: nothing was tokenized
        assert probe.growth <= 512 * MiB, f"peak growth {probe.growth / MiB:.0f} MiB"
        assert rss() - before <= 100 * MiB, f"held afterwards {(rss() - before) / MiB:.0f} MiB"
    finally:
        del server.slot.engine.prepare  # type: ignore[attr-defined]
    assert_still_serving(server)


# --- 6. bad input that used to answer 500 ----------------------------------------------------------------------------
def test_tokenize_with_min_pixels_above_max_pixels_is_a_400(server: Server) -> None:
    body = {"model": MODEL, "messages": image_message(data_url()), "min_pixels": 600000, "max_pixels": 50000}
    r = httpx.post(f"{server.v1}/tokenize", json=body)
    assert r.status_code == 400, r.text
    assert "min_pixels" in r.json()["error"]["message"]


def test_deeply_nested_template_kwargs_are_a_400(server: Server) -> None:
    nested = "[" * 900 + "]" * 900
    raw = '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"a": %s}}'
    r = httpx.post(f"{server.v1}/chat/completions", content=raw % nested, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested deeper" in r.json()["error"]["message"]
    assert_still_serving(server)


def _app_with_loader(folder: Any, load_image: Any, **settings: Any) -> tuple[ServerThread, Any]:
    cfg = Settings(served_model_name=MODEL, **settings)
    slot = build_slot(cfg, folder)
    return ServerThread(create_app(cfg, slot, load_image=load_image)), slot


def test_a_bug_is_one_500_with_a_request_id_logged_once_and_the_pool_survives(
    tiny_model: TinyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(url: str, param: str) -> DecodedImage:
        raise RuntimeError("a bug in the image loader")

    thread, slot = _app_with_loader(tiny_model("qwen3_vl"), broken)
    with thread as base, httpx.Client(base_url=base, timeout=60) as client, caplog.at_level(logging.ERROR):
        slot.wait_loaded(120)
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message(data_url())})
        assert r.status_code == 500
        assert r.headers["connection"] == "close"
        error = r.json()["error"]
        assert error["type"] == "internal_error" and "request id" in error["message"]
        request_id = error["message"].split("request id ")[1].split(")")[0]
        # The pooled client's next request goes through (a fresh connection, since the server said close).
        ok = client.post("/v1/chat/completions", json=chat())
        assert ok.status_code == 200, ok.text
        metrics = client.get("/metrics").text
    logged = [r for r in caplog.records if "a bug in the image loader" in r.getMessage()]
    assert len(logged) == 1 and request_id in logged[0].getMessage()
    assert len(logged[0].getMessage()) < 6000  # bounded traceback
    assert 'vlmbridge_requests_total{endpoint="/v1/chat/completions",status="500"} 1.0' in metrics


# --- 4. admission before work --------------------------------------------------------------------------------------
def test_queue_full_is_decided_before_any_image_is_decoded(tiny_model: TinyFactory) -> None:
    started = 0
    release = asyncio.Event()

    async def slow(url: str, param: str) -> DecodedImage:
        nonlocal started
        started += 1
        await release.wait()
        return decoded()

    thread, slot = _app_with_loader(tiny_model("qwen3_vl"), slow, max_queue=2)
    with thread as base:
        slot.wait_loaded(120)

        async def run() -> httpx.Response:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                body = {"model": MODEL, "messages": image_message(data_url()), "max_tokens": 2}
                held = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
                while started < 2:
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/chat/completions", json=body)
                assert started == 2  # the refused request never reached the image loader
                server_loop.call_soon_threadsafe(release.set)
                answers = await asyncio.gather(*held)
                assert [a.status_code for a in answers] == [200, 200]
                return refused

        server_loop = thread.server.servers[0].get_loop()
        refused = asyncio.run(run())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"


# --- 8. /metrics and auth before the body --------------------------------------------------------------------------
def test_metrics_need_the_key_and_auth_comes_before_the_body(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen3_vl"), api_keys=["k1"]) as s:
        assert httpx.get(f"{s.base_url}/metrics").status_code == 401
        assert httpx.get(f"{s.base_url}/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert httpx.get(f"{s.base_url}/health").status_code == 200
        body = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * (51 << 20) + b'"}]}'
        before = rss()
        with peak_rss() as probe:
            r = httpx.post(f"{s.v1}/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        del body
        assert probe.growth < 64 * MiB, f"an unauthenticated body cost {probe.growth / MiB:.0f} MiB"
        assert rss() - before < 64 * MiB
        assert_still_serving(s, headers={"Authorization": "Bearer k1"})
    with running(tiny_model("qwen3_vl"), api_keys=["k1"], public_metrics=True) as s:
        assert httpx.get(f"{s.base_url}/metrics").status_code == 200
        assert httpx.get(f"{s.v1}/models").status_code == 401


# --- 7. metrics count what happened ----------------------------------------------------------------------------------
def test_cancellations_of_queued_requests_are_counted(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen3_vl"), max_batch_size=1) as s:
        before = s.metric("vlmbridge_cancelled_requests")

        async def storm() -> None:
            async with httpx.AsyncClient(base_url=s.base_url, timeout=60) as client:
                long = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "max_tokens": 4000, "ignore_eos": True}  # fmt: skip
                async with client.stream("POST", "/v1/chat/completions", json=long) as holder:
                    lines = holder.aiter_lines()
                    while not (await anext(lines)).startswith('data: {"id"'):  # the batch's one row is taken
                        pass
                    for _ in range(10):  # queued behind it, then abandoned by their clients
                        async with client.stream("POST", "/v1/chat/completions", json=long) as queued:
                            await anext(queued.aiter_lines())  # the role event: the request is in the queue
                # every client is gone now: 11 cancellations, 10 of them never left the queue

        asyncio.run(storm())
        deadline = time.monotonic() + 30
        while s.metric("vlmbridge_cancelled_requests") - before < 11:  # the engine sees them at its next step
            assert time.monotonic() < deadline, s.metric("vlmbridge_cancelled_requests") - before
            time.sleep(0.05)
        assert s.metric("vlmbridge_cancelled_requests") - before == 11
        assert_still_serving(s)


def test_models_and_health_say_how_the_model_was_loaded(server: Server) -> None:
    model = httpx.get(f"{server.v1}/models").json()["data"][0]
    extra = model["vlmbridge"]
    assert (extra["dtype"], extra["quantization"], extra["device"]) == ("bfloat16", "none", "cpu")  # as stored
    assert extra["quantization_reason"]
    assert model["max_model_len"] == 32768 and extra["vision"] is True
    health = httpx.get(f"{server.base_url}/health").json()
    assert {k: health[k] for k in ("dtype", "quantization", "quantization_reason", "device")} == {
        k: extra[k] for k in ("dtype", "quantization", "quantization_reason", "device")
    }
