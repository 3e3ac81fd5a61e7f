"""Each model's engine in its own worker process: a worker that dies fails only its own requests, /health tells, it
restarts with backoff, three quick crashes leave the model failed with the cause, and no worker outlives the front.
The hardening bounds and fault injection hold through the process boundary too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import TinyFactory
from tests.helpers import png_bytes
from tests.server_utils import MODEL, Server, data_url, image_message, running
from vlmbridge.engine.sharing import LARGE
from vlmbridge.engine.worker import FAULTS_ENV

IMAGE_TOKENS = 80


def health(s: Server) -> dict[str, Any]:
    return httpx.get(f"{s.base_url}/health", timeout=10).json()  # type: ignore[no-any-return]


def until(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # a worker restarting: bounded by the deadline
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def ask_image(s: Server) -> httpx.Response:
    return s.post({"model": MODEL, "messages": image_message(data_url()), "max_tokens": 4})


def first_token(s: Server, url: str, image_tokens: int = IMAGE_TOKENS) -> dict[str, float]:
    """The first token's top choices for a picture: two pictures that reach the model give two distributions."""
    body = {"model": MODEL, "messages": image_message(url), "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": 5}  # fmt: skip
    r = s.post(body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == image_tokens
    top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return {t["token"]: t["logprob"] for t in top}


@pytest.fixture
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl"), engine_worker="process") as s:
        assert health(s)["status"] == "ok"
        yield s


def test_the_engine_runs_in_its_own_process_and_sees_the_image(server: Server) -> None:
    pid = health(server)["worker_pid"]
    assert pid and pid != os.getpid() and psutil.Process(pid).ppid() == os.getpid()
    # Its own process group (killed as one) in the front's session: another session is another scheduling group
    # (autogroup), which starved the front under load.
    assert os.getpgid(pid) == pid != os.getpgid(0) and os.getsid(pid) == os.getsid(0)
    assert first_token(server, data_url(seed=1)) != first_token(server, data_url(seed=2))  # the pictures reached it


def test_the_workers_only_torch_thread_pool_is_its_engines(server: Server) -> None:
    """A second OpenMP pool in the process makes every pool's workers sleep between kernels (engine/threads.py).
    A pool's workers inherit the OS name of the thread that started it, so the names tell whose pools exist."""
    pid = health(server)["worker_pid"]
    # The pixels go through torch kernels on a prepare thread, and reach the model.
    assert first_token(server, data_url(seed=1)) != first_token(server, data_url(seed=2))
    tasks = Path(f"/proc/{pid}/task")
    names = Counter((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks))
    main = Path(f"/proc/{pid}/comm").read_text().strip()
    prepare = {name: n for name, n in names.items() if name.startswith("vb-prepare")}
    assert prepare and set(prepare.values()) == {1}, names  # each prepare thread alone: no pool of its own
    assert names[main] == 1, names  # nor the main thread (loading ran on a thread that ended)
    cores = os.cpu_count() or 1
    assert min(2, cores) <= names["vb-engine"] <= cores, names  # the engine thread and its pool's workers


def test_large_pictures_cross_in_shared_memory_and_reach_the_model(server: Server) -> None:
    shared = server.metric("vlmbridge_worker_shared_input_bytes")

    one, two = data_url(seed=1), data_url(seed=2)  # ~230 KB each: over sharing.LARGE
    assert first_token(server, one) != first_token(server, two)  # two distributions: the pixels reached the model
    assert first_token(server, one) == first_token(server, one)
    grown = server.metric("vlmbridge_worker_shared_input_bytes") - shared
    sizes = [len(png_bytes(seed=s)) for s in (1, 2, 1, 1)]  # four requests above
    assert grown == sum(sizes) and min(sizes) > LARGE
    small = data_url(32, 32, seed=3)  # under the threshold: inline, nothing shared
    assert first_token(server, small, image_tokens=64)
    assert server.metric("vlmbridge_worker_shared_input_bytes") - shared == grown


def test_kill_9_mid_stream_ends_the_stream_with_worker_died_and_the_worker_comes_back(server: Server) -> None:
    pid = health(server)["worker_pid"]

    async def stream_then_kill() -> list[Any]:
        body = {"model": MODEL, "messages": image_message(data_url()), "stream": True, "max_tokens": 5000,
                "ignore_eos": True}  # fmt: skip
        events: list[Any] = []
        async with (
            httpx.AsyncClient(base_url=server.base_url, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
                if len(events) == 5:  # tokens are flowing: the worker is mid-generation
                    os.kill(pid, signal.SIGKILL)
        return events

    events = asyncio.run(stream_then_kill())
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "worker_died")
    assert "SIGKILL" in error["message"]
    # Not yet restarted: requests are refused with the same 503, the server itself is up and says so.
    refused = ask_image(server)
    if refused.status_code != 200:
        assert refused.status_code == 503 and refused.json()["error"]["code"] in ("worker_died", "model_not_ready")
    until(lambda: health(server)["status"] == "ok")
    assert health(server)["worker_pid"] != pid
    assert first_token(server, data_url(seed=1)) != first_token(server, data_url(seed=2))  # the pictures reached it


def test_three_quick_crashes_leave_the_model_failed_with_the_cause(server: Server) -> None:
    killed: set[int] = set()
    for _ in range(3):
        until(lambda: (pid := health(server).get("worker_pid")) is not None and pid not in killed)
        pid = health(server)["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        until(lambda: health(server)["status"] != "ok" or health(server)["worker_pid"] not in killed)
    until(lambda: health(server)["status"] == "failed", timeout=30)
    body = health(server)
    assert "3 crashes" in body["error"]["message"] and "SIGKILL" in body["error"]["message"]
    r = ask_image(server)
    assert r.status_code == 503 and "crashes" in r.json()["error"]["message"]
    time.sleep(5)  # the longest backoff: a failed model does not restart by itself
    assert health(server)["status"] == "failed"


def test_a_fault_in_one_request_fails_it_alone_through_the_worker(
    tiny_model: TinyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "sample")  # the worker inherits it: its engine fails one request, once
    with running(tiny_model("qwen3_vl"), engine_worker="process") as s:
        first = s.post({"model": MODEL, "messages": image_message(data_url()), "max_tokens": 4})
        assert first.status_code == 500 and first.json()["error"]["code"] == "sampling_failed"
        assert health(s)["status"] == "ok"
        assert first_token(s, data_url(seed=1)) != first_token(s, data_url(seed=2))  # the pictures reached it


def test_sampling_extremes_and_huge_text_through_the_worker(server: Server) -> None:
    extreme = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
               "repetition_penalty": 0.01, "temperature": 2.0, "presence_penalty": -2.0}  # fmt: skip
    r = server.post(extreme)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "a" * 20_000_000}]}
    r = server.post(huge)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert first_token(server, data_url(seed=1)) != first_token(server, data_url(seed=2))  # the pictures reached it
    assert health(server)["status"] == "ok"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_worker_outlives_a_kill_9_of_the_front(tiny_model: TinyFactory, tmp_path: Path) -> None:
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    front = subprocess.Popen(
        [sys.executable, "-m", "vlmbridge", "serve", str(tiny_model("qwen3_vl")), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        until(ready, timeout=120)
        worker = httpx.get(f"{base}/health").json()["worker_pid"]
        assert psutil.Process(worker).ppid() == front.pid
        front.send_signal(signal.SIGKILL)
        front.wait(10)
        until(lambda: not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE, 10)
    finally:
        if front.poll() is None:
            front.kill()
        log.close()
