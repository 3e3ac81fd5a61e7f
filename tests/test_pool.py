"""The pool under a memory budget, with real worker processes: three tiny checkpoints (two VLM families and a text
model) and a budget that holds two. Requests to all three in turns succeed; the least recently used idle model is
the one unloaded; a model with a stream in flight never is; with every loaded model busy a new one is refused with
503; and the workers' PSS, sampled all along, never passes the budget."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.server_utils import PoolServer, running_models
from vlmbridge.pool.measure import idle_worker_bytes, tree_pss_bytes
from vlmbridge.pool.prepare import planned_bytes
from vlmbridge.settings import ModelSettings

FAMILIES = {"a": "qwen2_vl", "b": "qwen2_5_vl", "c": "qwen2"}


def worker_pids() -> list[int]:
    """This process's engine worker children."""
    found = []
    for child in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in child.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"vlmbridge.engine.worker" in cmdline:
                found.append(int(pid))
    return found


class PssSampler:
    """Sums the PSS of this process's worker children every 0.2 s (independently of the pool's own figures)."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []  # (workers, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            workers = worker_pids()
            total = sum(tree_pss_bytes(pid) or 0 for pid in workers)
            self.samples.append((len(workers), total))

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def budget(tiny_model: TinyFactory, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Room for two of these models serving streams, not for three, calibrated here: what a worker measures moves
    with the machine (PSS splits shared libraries among every process that maps them), so a fixed multiple of the
    estimate held three models on a quiet machine and not two on a busy one. Two models are loaded and stream,
    their workers measured; the budget holds those two with room to grow and is short of a third's reservation."""
    one = idle_worker_bytes() + max(planned_bytes(ModelSettings(), tiny_model(f)) for f in FAMILIES.values())
    file = tmp_path_factory.mktemp("calibrate") / "models.yaml"
    file.write_text("models:\n" + "".join(f"  - name: {n}\n    path: {tiny_model(FAMILIES[n])}\n" for n in "ab"))
    with running_models(file, memory_budget=1 << 40, engine_worker="process") as s:
        for name in "ab":
            stream(s, name, threading.Event(), max_tokens=2000)
        sizes = [tree_pss_bytes(pid) or 0 for pid in worker_pids()]
    assert len(sizes) == 2, sizes
    budget = int(1.02 * max(2.5 * max(sizes), max(sizes) + one))
    print(
        f"\nworkers after a stream {[b >> 20 for b in sizes]} MiB, a new load reserves {one >> 20} MiB, "
        f"budget {budget >> 20} MiB"
    )
    assert budget < 2 * min(sizes) + one, "no budget holds two of these and refuses a third here"
    return budget


@pytest.fixture(scope="module")
def sampler() -> Iterator[PssSampler]:
    with PssSampler() as s:
        yield s


@pytest.fixture(scope="module")
def server(
    tiny_model: TinyFactory, tmp_path_factory: pytest.TempPathFactory, budget: int, sampler: PssSampler
) -> Iterator[PoolServer]:
    file = tmp_path_factory.mktemp("pool") / "models.yaml"
    entries = "".join(f"  - name: {n}\n    path: {tiny_model(f)}\n" for n, f in FAMILIES.items())
    file.write_text(f"models:\n{entries}")
    with running_models(file, memory_budget=budget, engine_worker="process", admin_key="k") as s:
        yield s


def chat(s: PoolServer, model: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return httpx.post(f"{s.v1}/chat/completions", json=body, timeout=300)


def loaded(s: PoolServer) -> set[str]:
    return {name for name, state in s.states().items() if state == "ready"}


def stream(
    s: PoolServer,
    model: str,
    first_token: threading.Event,
    hang_up: threading.Event | None = None,
    max_tokens: int = 20000,
) -> list[dict[str, object]]:
    """A stream longer than any load (the client hangs up once `hang_up` is set); `first_token` is set once it
    is generating. Returns its events."""
    body = {
        "model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
        "max_tokens": max_tokens, "ignore_eos": True,
    }  # fmt: skip
    events: list[dict[str, object]] = []
    with httpx.stream("POST", f"{s.v1}/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    first_token.set()
            if hang_up is not None and hang_up.is_set():
                break
    return events


def test_requests_to_three_models_in_turns_evict_the_least_recently_used(server: PoolServer) -> None:
    for name in ("a", "b"):
        assert chat(server, name).status_code == 200
    assert loaded(server) == {"a", "b"}
    # Each new model makes room by unloading the least recently used of the two loaded.
    for name, victim in (("c", "a"), ("a", "b"), ("b", "c")):
        r = chat(server, name)
        assert r.status_code == 200, r.text
        assert server.states()[victim] == "unloaded"
        assert len(loaded(server)) == 2 and name in loaded(server)
    rows = {row["name"]: row for row in server.admin("GET", "/models").json()["data"]}
    print({n: (r["state"], r["memory_bytes"] >> 20) for n, r in rows.items()}, "MiB; budget", server.pool.budget >> 20)


def test_a_model_with_a_stream_in_flight_is_never_evicted(server: PoolServer) -> None:
    assert loaded(server) == {"a", "b"}
    assert chat(server, "b").status_code == 200  # a is now the least recently used ...
    first, done = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        running: Future[list[dict[str, object]]] = pool.submit(stream, server, "a", first, done)
        assert first.wait(120)
        r = chat(server, "c")  # ... but it streams: b goes
        still_streaming = not running.done()
        done.set()
        events = running.result()
    assert r.status_code == 200, r.text
    assert still_streaming, "the stream ended before the load; make it longer"
    assert server.states()["a"] == "ready" and server.states()["b"] == "unloaded"
    assert not any("error" in e for e in events)


def test_with_every_loaded_model_busy_a_new_one_is_refused_with_503(server: PoolServer) -> None:
    assert loaded(server) == {"a", "c"}
    firsts, done = [threading.Event(), threading.Event()], threading.Event()
    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(stream, server, name, ev, done) for name, ev in zip(("a", "c"), firsts, strict=True)]
        assert all(ev.wait(120) for ev in firsts)
        r = chat(server, "b")
        busy = not any(s.done() for s in streams)
        done.set()
        for s in streams:
            s.result()
    assert busy, "a stream ended before the refusal; make them longer"
    assert r.status_code == 503 and r.json()["error"]["code"] == "memory_budget"
    assert "budget" in r.json()["error"]["message"]
    assert chat(server, "b").status_code == 200  # once idle, one of them makes room


def test_the_workers_never_held_more_than_the_budget(server: PoolServer, sampler: PssSampler, budget: int) -> None:
    time.sleep(0.2)
    assert max(n for n, _ in sampler.samples) == 2  # it saw the two workers (never three)
    peak = max(total for _, total in sampler.samples)
    print(f"peak PSS of the workers {peak >> 20} MiB, budget {budget >> 20} MiB, {len(sampler.samples)} samples")
    assert peak <= budget
