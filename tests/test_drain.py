"""SIGTERM drains: `vlmbridge serve` (a real process) finishes the streams in flight within --shutdown-grace, refuses
new requests with 503 shutting_down meanwhile, and ends streams still running after the grace with an error event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TinyFactory
from tests.server_utils import MODEL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(folder: Path, tmp: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = _free_port()
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmbridge", "serve", str(folder), "--port", str(port), "--served-model-name", MODEL,
         "--max-batch-size", "16", *args],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the server process starting, not the engine: bounded by the deadline
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


async def _stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event, count: list[int]) -> list[Any]:
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
    }  # fmt: skip
    events: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 2:  # the role event, then the first token
                count[0] += 1
                if count[0] == 16:
                    started.set()
    return events


async def _drain(base: str, proc: subprocess.Popen[bytes], max_tokens: int) -> tuple[list[list[Any]], dict[str, Any]]:
    started = asyncio.Event()
    count = [0]
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        streams = [asyncio.create_task(_stream(client, max_tokens, started, count)) for _ in range(16)]
        await asyncio.wait_for(started.wait(), 60)
        os.kill(proc.pid, signal.SIGTERM)
        seen: dict[str, Any] = {}
        async with httpx.AsyncClient(base_url=base, timeout=30) as other:
            for _ in range(100):  # the drain starts on the server's next tick (0.1 s)
                health = await other.get("/health")
                if health.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            seen["health"] = (health.status_code, health.json())
            late = await other.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            )
            seen["late"] = (late.status_code, late.json(), late.headers.get("retry-after"))
        results = await asyncio.gather(*streams)
    return results, seen


def test_sigterm_lets_16_streams_finish_and_refuses_new_requests(tiny_model: TinyFactory, tmp_path: Path) -> None:
    with serve(tiny_model("qwen3_vl"), tmp_path, "--shutdown-grace", "60") as (proc, base):
        results, seen = asyncio.run(_drain(base, proc, max_tokens=400))
        proc.wait(60)  # it exits on its own after the drain
    assert seen["health"][0] == 503 and seen["health"][1]["status"] == "draining"
    status, body, retry = seen["late"]
    assert status == 503 and retry == "1"
    assert body["error"]["type"] == "service_unavailable" and body["error"]["code"] == "shutting_down"
    for events in results:
        assert events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in events)
        finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
        assert finish[-1] == "length"
        assert sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")) >= 1


def test_streams_still_running_after_the_grace_end_with_an_error_event(tiny_model: TinyFactory, tmp_path: Path) -> None:
    with serve(tiny_model("qwen3_vl"), tmp_path, "--shutdown-grace", "1") as (proc, base):
        results, _ = asyncio.run(_drain(base, proc, max_tokens=20000))
        proc.wait(60)
    for events in results:
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "shutting_down"
