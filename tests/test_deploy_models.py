"""deploy/ for several models: the compose file mounts a models folder and a models file read-only and needs both
keys; the example models file is valid; the container's entry point serves a models file."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import TinyFactory
from tests.test_dify_deploy import DEPLOY, ENTRYPOINT, entrypoint_env, free_port, run_entrypoint
from vlmbridge.pool import read_models_file
from vlmbridge.settings import Settings


def test_models_compose_mounts_the_models_folder_and_file_read_only() -> None:
    service = yaml.safe_load((DEPLOY / "models.compose.yml").read_text())["services"]["vlmbridge"]
    folder, file = service["volumes"]
    assert folder.startswith("${MODELS_DIR:?") and folder.endswith(":/models:ro")
    assert file.startswith("${MODELS_FILE:?") and file.endswith(":/etc/vlmbridge/models.yaml:ro")
    env = service["environment"]
    assert env["VLMBRIDGE_MODELS_FILE"] == "/etc/vlmbridge/models.yaml"
    assert env["VLMBRIDGE_API_KEYS"].startswith("${VLMBRIDGE_API_KEYS:?")
    assert env["VLMBRIDGE_ADMIN_KEY"].startswith("${VLMBRIDGE_ADMIN_KEY:?")
    assert service["healthcheck"]["test"] == ["CMD", "vlmbridge-entrypoint", "healthcheck"]
    assert service["stop_grace_period"] == "45s" and service["ports"][0].startswith("127.0.0.1:")
    example = (DEPLOY / ".env.example").read_text()
    defined = set(re.findall(r"^#?\s*([A-Z_]+)=", example, re.M))
    used = set(re.findall(r"\$\{([A-Z_]+)", (DEPLOY / "models.compose.yml").read_text()))
    assert used <= defined, used - defined


def test_the_example_models_file_is_valid() -> None:
    specs = read_models_file(Settings(), DEPLOY / "models.example.yaml")
    assert [s.name for s in specs] == ["moderation", "tagging", "documents", "followup"]
    assert all(str(s.path).startswith("/models/") for s in specs)
    assert Settings(memory_budget="").memory_budget is None  # MEMORY_BUDGET left empty in deploy/.env


def test_the_entrypoint_serves_a_models_file(tiny_model: TinyFactory, tmp_path: Path) -> None:
    file = tmp_path / "models.yaml"
    file.write_text(
        f"models:\n  - name: vl\n    path: {tiny_model('qwen3_vl')}\n  - name: text\n    path: {tiny_model('qwen2')}\n"
    )
    port = free_port()
    env = entrypoint_env(
        VLMBRIDGE_MODELS_FILE=str(file), VLMBRIDGE_MODEL="/models", VLMBRIDGE_HOST="127.0.0.1",
        VLMBRIDGE_PORT=str(port), VLMBRIDGE_API_KEYS="k", VLMBRIDGE_ADMIN_KEY="a", VLMBRIDGE_MEMORY_BUDGET="",
    )  # fmt: skip
    log = tmp_path / "entrypoint.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while run_entrypoint("healthcheck", env=env, timeout=30).returncode != 0:  # no start-up model: at once
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in listed["data"]] == ["vl", "text"]
        admin = httpx.get(f"http://127.0.0.1:{port}/admin/models", headers={"Authorization": "Bearer a"})
        assert admin.status_code == 200 and {m["state"] for m in admin.json()["data"]} == {"unloaded"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
