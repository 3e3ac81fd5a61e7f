"""Faults forced inside the engine (its test-only `fault_hook`), seen through the HTTP server: the failing request
gets the envelope, its neighbours and later requests are served, and /health tells the truth about the worker."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.server_utils import MODEL, Server, data_url, image_message, running
from vlmbridge.engine.transformers.engine import TransformersEngine

IMAGE_TOKENS = 80


def _engine(s: Server) -> TransformersEngine:
    return cast(TransformersEngine, s.slot.peek())


def _one_victim(stage: str) -> tuple[Any, list[str]]:
    """A hook that fails the first request it meets at `stage`, once."""
    victims: list[str] = []
    lock = threading.Lock()

    def hook(at: str, request_id: str) -> None:
        if at != stage:
            return
        with lock:
            if not victims:
                victims.append(request_id)
        if request_id == victims[0]:
            raise RuntimeError("injected fault")

    return hook, victims


@pytest.fixture
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl"), batch_wait_ms=200) as s:
        yield s


def _body(i: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL, "messages": image_message(data_url(seed=i)), "max_tokens": 12, "temperature": 0,
        "ignore_eos": True, "stream": stream,
    }  # fmt: skip


async def _ask(client: httpx.AsyncClient, i: int, stream: bool) -> Any:
    """For streams, the parsed events; otherwise (status, json)."""
    if not stream:
        r = await client.post("/v1/chat/completions", json=_body(i, stream))
        return r.status_code, r.json()
    events: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=_body(i, stream)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
@pytest.mark.parametrize("stage", ["sample", "decode"])
def test_a_fault_in_one_request_leaves_the_batch_and_the_engine_serving(
    server: Server, stage: str, stream: bool
) -> None:
    hook, victims = _one_victim(stage)
    _engine(server).fault_hook = hook

    async def batch() -> list[Any]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return await asyncio.gather(*(_ask(client, i, stream) for i in range(4)))

    try:
        outcomes = asyncio.run(batch())
    finally:
        _engine(server).fault_hook = None
    errors, finished = [], 0
    for o in outcomes:
        if stream:
            assert o[-1] == "[DONE]"
            if isinstance(o[-2], dict) and "error" in o[-2]:
                errors.append(o[-2]["error"])
            else:
                finished += o[-2]["choices"][0]["finish_reason"] == "length"
        elif o[0] == 200:
            finished += o[1]["choices"][0]["finish_reason"] == "length"
        else:
            assert o[0] == 500
            errors.append(o[1]["error"])
    assert victims and errors
    assert all(e["type"] == "internal_error" and e["code"] == f"{stage}_failed".replace("sample", "sampling")
               for e in errors)  # fmt: skip
    if stage == "sample":  # a failed sampling step fails its row only
        assert len(errors) == 1 and finished == 3
    else:  # a failed forward pass fails the rows that ran in it; the engine goes on
        assert len(errors) + finished == 4
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    r = server.post({"model": MODEL, "messages": image_message(data_url()), "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == IMAGE_TOKENS


class _Die(BaseException):
    """Not an Exception: nothing in the engine catches it, so the worker thread ends."""


def test_a_dead_worker_turns_health_red_and_requests_get_503_not_a_hang(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen3_vl")) as s:

        def die(stage: str, request_id: str) -> None:
            raise _Die()

        _engine(s).fault_hook = die
        started = time.monotonic()
        r = s.post({"model": MODEL, "messages": image_message(data_url()), "max_tokens": 4}, timeout=30)
        assert r.status_code in (500, 503) and r.json()["error"]["message"]
        health = httpx.get(f"{s.base_url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        later = s.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert later.status_code == 503 and later.json()["error"]["type"] == "service_unavailable"
        assert time.monotonic() - started < 20
        text = httpx.get(f"{s.base_url}/metrics").text
        assert 'vlmbridge_model_ready{model="tiny"} 0.0' in text


def test_a_stuck_worker_turns_health_red_and_the_front_enforces_the_timeout(tiny_model: TinyFactory) -> None:
    release = threading.Event()
    with running(tiny_model("qwen3_vl"), request_timeout=2.0, engine_stall_timeout=1.0) as s:

        def stall(stage: str, request_id: str) -> None:
            if stage == "decode":
                release.wait(30)

        _engine(s).fault_hook = stall
        try:
            started = time.monotonic()
            stuck = s.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert stuck.status_code == 504 and stuck.json()["error"]["code"] == "request_timeout"
            assert time.monotonic() - started < 10  # the front's deadline, not the stuck worker's
            health = httpx.get(f"{s.base_url}/health")
            assert health.status_code == 503 and "stuck" in health.json()["error"]["message"]
        finally:
            _engine(s).fault_hook = None
            release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{s.base_url}/health").status_code != 200:  # the worker moves again on its next step
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = s.post({"model": MODEL, "messages": image_message(data_url()), "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == IMAGE_TOKENS
