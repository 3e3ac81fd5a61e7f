"""Several models behind one server (in-process engines; the memory tests with worker processes are in
test_pool.py): routing by name and alias, load on first request (one load however many wait; a stream gets
keep-alive comments meanwhile), keep_alive, a broken folder `failed` with the doctor's code while the others
serve, /health and /v1/models for every model, the admin API on its own key, and `vlmbridge models`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.server_utils import PoolServer, running_models

ADMIN, CLIENT = "admin-secret", "client-secret"
AUTH = {"Authorization": f"Bearer {CLIENT}"}


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolServer]:
    import shutil

    tmp = tmp_path_factory.mktemp("pool-admin")
    broken = tmp / "broken"
    shutil.copytree(tiny_model("qwen2"), broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)  # a truncated download: doctor VB104
    file = tmp / "models.yaml"
    file.write_text(
        f"""
models:
  - name: vl
    path: {tiny_model("qwen3_vl")}
    aliases: [vision]
    load: startup
  - name: text
    path: {tiny_model("qwen2")}
    keep_alive: 1s
    context_length: 2048
  - name: broken
    path: {broken}
  - name: slow                # a worker process: a load long enough to see keep-alive comments
    path: {tiny_model("qwen2")}
    engine_worker: process
"""
    )
    with running_models(file, admin_key=ADMIN, api_keys=[CLIENT], keepalive_interval=0.05) as s:
        yield s


def chat(s: PoolServer, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    return httpx.post(f"{s.v1}/chat/completions", json=body, headers=AUTH, timeout=120)


def wait_state(s: PoolServer, name: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while s.pool.slots[name].state != state:
        assert time.monotonic() < deadline, f"{name} stayed {s.pool.slots[name].state}, not {state}"
        time.sleep(0.05)


def test_health_is_200_once_the_startup_models_are_ready_with_every_state(server: PoolServer) -> None:
    health = httpx.get(f"{server.base_url}/health")
    assert health.status_code == 200
    assert health.json()["models"]["vl"] == "ready"
    assert set(health.json()["models"]) == {"vl", "text", "broken", "slow"}


def test_v1_models_lists_every_configured_model_loaded_or_not(server: PoolServer) -> None:
    server.admin("POST", "/models/text/unload")
    data = {m["id"]: m for m in httpx.get(f"{server.v1}/models", headers=AUTH).json()["data"]}
    assert set(data) == {"vl", "text", "broken", "slow"}
    assert data["vl"]["vlmbridge"]["state"] == "ready" and data["vl"]["vlmbridge"]["modalities"] == ["text", "image"]
    assert data["vl"]["vlmbridge"]["aliases"] == ["vision"]
    text = data["text"]
    assert text["vlmbridge"]["state"] == "unloaded"
    assert text["max_model_len"] == 2048  # from the config, without loading it (Dify reads it)
    assert text["vlmbridge"]["modalities"] == ["text"] and text["vlmbridge"]["quantization"] == "auto"


def test_unknown_models_are_404_naming_the_served_ones(server: PoolServer) -> None:
    r = chat(server, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'vl', 'text', 'broken', 'slow'" in r.json()["error"]["message"]


def test_an_alias_reaches_its_model(server: PoolServer) -> None:
    r = chat(server, "vision")
    assert r.status_code == 200 and r.json()["model"] == "vl"


def test_concurrent_first_requests_trigger_one_load(server: PoolServer) -> None:
    server.admin("POST", "/models/text/unload")
    slot = server.pool.slots["text"]
    before = slot.loads
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: chat(server, "text"), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert slot.loads == before + 1


def test_a_stream_waiting_for_its_model_gets_keepalive_comments(server: PoolServer) -> None:
    lines: list[str] = []
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    server.admin("POST", "/models/slow/unload")  # its worker process exits
    load = server.pool.slots["slow"].load_seconds
    assert load is not None and load > 0.1, "the load was too quick for keep-alive comments to show"
    assert lines[0].startswith(":")  # comments first (every 0.05 s), while the model loaded
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert data and not any("error" in d for d in data) and lines[-1] == "data: [DONE]"


def test_keep_alive_unloads_an_idle_model_and_the_next_request_loads_it(server: PoolServer) -> None:
    assert chat(server, "text").status_code == 200
    wait_state(server, "text", "unloaded", timeout=15)  # keep_alive: 1s
    assert server.pool.slots["vl"].state == "ready"  # keep_alive -1: never
    assert chat(server, "text").status_code == 200


def test_a_broken_folder_fails_with_the_doctors_code_while_the_others_serve(server: PoolServer) -> None:
    r = chat(server, "broken")
    assert r.status_code == 503 and r.json()["error"]["code"] == "VB104"
    row = next(m for m in server.admin("GET", "/models").json()["data"] if m["name"] == "broken")
    assert row["state"] == "failed" and row["code"] == "VB104" and "safetensors" in row["reason"]
    assert chat(server, "vl").status_code == 200
    later = chat(server, "broken")  # not loaded again per request: the same failure, at once
    assert later.status_code == 503 and later.json()["error"]["code"] == "VB104"
    again = server.admin("POST", "/models/broken/load")  # an operator's retry answers with the failure
    assert again.status_code == 503 and again.json()["error"]["code"] == "VB104"


def test_admin_routes_refuse_no_key_and_the_client_key(server: PoolServer) -> None:
    for key in ("", CLIENT, "wrong"):
        r = httpx.get(f"{server.base_url}/admin/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(
            f"{server.base_url}/admin/models/text/unload", headers={"Authorization": f"Bearer {key}"} if key else {}
        )
        assert r.status_code == 401
    assert chat(server, "vl").status_code == 200  # the client key still serves
    bad = httpx.post(f"{server.v1}/chat/completions", json={}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 401  # and the admin key is not a client key


def test_admin_lists_models(server: PoolServer) -> None:
    body = server.admin("GET", "/models").json()
    rows = {row["name"]: row for row in body["data"]}
    assert set(rows) == {"vl", "text", "broken", "slow"}
    vl = rows["vl"]
    assert vl["state"] == "ready" and vl["memory_bytes"] > 0 and vl["progress"] is None and vl["in_flight"] == 0
    assert set(vl) >= {"name", "path", "state", "reason", "code", "memory_bytes", "last_used", "in_flight", "progress"}


def test_admin_routes_are_off_without_an_admin_key(tiny_model: TinyFactory, tmp_path: Path) -> None:
    file = tmp_path / "models.yaml"
    file.write_text(f"models:\n  - name: t\n    path: {tiny_model('qwen2')}\n")
    with running_models(file) as s:
        assert httpx.get(f"{s.base_url}/admin/models").status_code == 404


def test_per_model_metrics_carry_the_model_label(server: PoolServer) -> None:
    assert chat(server, "vl").status_code == 200
    text = httpx.get(f"{server.base_url}/metrics", headers=AUTH).text
    assert 'vlmbridge_model_ready{model="vl"} 1.0' in text
    assert 'vlmbridge_model_ready{model="broken"} 0.0' in text
    assert 'vlmbridge_completion_tokens_total{model="vl"}' in text
    assert 'vlmbridge_queue_depth{model="vl"}' in text


def test_the_models_command_against_a_real_server(server: PoolServer) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vlmbridge", "models", *args, "--url", server.v1, "--admin-key", ADMIN],
            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip

    unloaded = run("unload", "text")
    assert unloaded.returncode == 0 and "text: unloaded" in unloaded.stdout, unloaded.stderr
    listed = run("list", "--json")
    assert listed.returncode == 0
    assert {r["name"]: r["state"] for r in json.loads(listed.stdout)}["text"] == "unloaded"
    loaded = run("load", "text")
    assert loaded.returncode == 0 and "text: ready" in loaded.stdout, loaded.stderr
    table = run("list")
    assert table.returncode == 0 and "VB104" in table.stdout and "ready" in table.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "vlmbridge", "models", "list", "--url", server.base_url, "--admin-key", CLIENT],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 1 and "401" in refused.stderr and "Traceback" not in refused.stderr


def test_a_request_times_out_while_its_model_loads_and_the_load_goes_on(
    tiny_model: TinyFactory, tmp_path: Path
) -> None:
    file = tmp_path / "models.yaml"
    file.write_text(f"models:\n  - name: t\n    path: {tiny_model('qwen2')}\n")
    with running_models(file, request_timeout=0.05) as s:
        body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        r = httpx.post(f"{s.v1}/chat/completions", json=body, timeout=60)
        assert r.status_code == 504 and "while model 't' loaded" in r.json()["error"]["message"]
        wait_state(s, "t", "ready")  # the load was not cancelled with the request
        assert s.pool.slots["t"].loads == 1
