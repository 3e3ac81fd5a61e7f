"""Hot swap under load: 8 clients stream continuously while the model is reloaded from a folder with other weights
(another tiny checkpoint of the same family). No request fails; every response comes wholly from the old or wholly
from the new weights (its tokens and logprobs match one of the two references); requests sent after the reload
returned see the new weights; a reload that fails keeps the old copy serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import TinyFactory
from tests.server_utils import PoolServer, running_models
from vlmbridge.tiny.builder import build_tiny_model

PROMPT = [{"role": "user", "content": "Name three colours."}]
TOKENS = 12
Answer = list[tuple[str, float]]


@pytest.fixture(scope="module")
def folders(tiny_model: TinyFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    new = build_tiny_model(tmp_path_factory.mktemp("swap") / "qwen2-seed1", "qwen2", seed=1)
    return tiny_model("qwen2"), new


@pytest.fixture(scope="module")
def server(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolServer]:
    file = tmp_path_factory.mktemp("swap-config") / "models.yaml"
    file.write_text(f"models:\n  - name: m\n    path: {folders[0]}\n    load: startup\n    engine_worker: process\n")
    with running_models(file, admin_key="k", max_batch_size=16) as s:
        yield s


def ask(client: OpenAI) -> Answer:
    """One streamed, greedy answer as (token, logprob) pairs."""
    stream = client.chat.completions.create(
        model="m", messages=PROMPT, max_tokens=TOKENS, temperature=0, logprobs=True, stream=True,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    answer: Answer = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            answer.extend((t.token, t.logprob) for t in chunk.choices[0].logprobs.content)
    return answer


def same(a: Answer, b: Answer) -> bool:
    # Batched and alone differ in float rounding only: the tokens match exactly, the logprobs closely.
    if [t for t, _ in a] != [t for t, _ in b]:
        return False
    return all(abs(x - y) < 2e-2 for (_, x), (_, y) in zip(a, b, strict=True))


def test_a_reload_under_8_streaming_clients_drops_nothing_and_mixes_nothing(
    server: PoolServer, folders: tuple[Path, Path]
) -> None:
    client = server.openai()
    old = ask(client)
    results: list[tuple[float, Answer | Exception]] = []  # (sent at, answer or failure)
    stop = threading.Event()
    per_client = [0] * 8

    def run(i: int) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                results.append((sent, ask(client)))
            except Exception as exc:  # counted, and the test fails on it
                results.append((sent, exc))
            per_client[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while min(per_client) < 1:
        time.sleep(0.05)
    reload = server.admin("POST", "/models/m/reload", json={"path": str(folders[1])})
    swapped = time.monotonic()
    assert reload.status_code == 200, reload.text
    seen = len(results)
    while len(results) < seen + 16:  # every client goes on for a while on the new copy
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(120)
    new = ask(client)
    assert not same(old, new)  # the two checkpoints answer differently: the check below can tell them apart

    failures = [r for _, r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    answers = [(sent, r) for sent, r in results if not isinstance(r, Exception)]
    assert all(same(a, old) or same(a, new) for _, a in answers)
    assert all(same(a, new) for sent, a in answers if sent > swapped)  # after the swap returned: the new weights
    assert any(same(a, old) for _, a in answers) and any(same(a, new) for _, a in answers)
    row = server.admin("GET", "/models").json()["data"][0]
    assert row["state"] == "ready" and row["path"] == str(folders[1])
    deadline = time.monotonic() + 60
    while server.pool.slots["m"].draining:  # the old copy finished its requests and exited
        assert time.monotonic() < deadline, "the old copy did not drain"
        time.sleep(0.05)


def test_a_failed_reload_keeps_the_old_copy_serving(server: PoolServer, tmp_path: Path) -> None:
    client = server.openai()
    before = ask(client)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    reload = server.admin("POST", "/models/m/reload", json={"path": str(broken)})
    assert reload.status_code == 503 and reload.json()["error"]["code"].startswith("VB")
    assert server.pool.slots["m"].state == "ready"
    assert same(ask(client), before)  # still the same weights
    row = server.admin("GET", "/models").json()["data"][0]
    assert row["state"] == "ready" and row["code"] == reload.json()["error"]["code"]  # the failure is reported
