"""Running the real app with uvicorn on a free port for tests."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI, OpenAI

from tests.helpers import png_bytes
from vlmbridge.pool import ModelPool, read_models_file
from vlmbridge.server import create_app
from vlmbridge.server.factory import build_pool, build_slot
from vlmbridge.server.runner import ServerThread
from vlmbridge.server.state import EngineSlot
from vlmbridge.settings import Settings

MODEL = "tiny"


@dataclass
class _Served:
    base_url: str

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def openai(self, api_key: str = "none") -> OpenAI:
        return OpenAI(base_url=self.v1, api_key=api_key, max_retries=0, timeout=120)

    def post(self, body: Any, timeout: float = 120, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.v1}/chat/completions", json=body, timeout=timeout, **kwargs)


@dataclass
class Server(_Served):
    slot: EngineSlot
    settings: Settings

    def async_openai(self, api_key: str = "none") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.v1, api_key=api_key, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        keys = self.settings.api_keys  # /metrics needs the key when keys are set
        headers = {"Authorization": f"Bearer {keys[0].get_secret_value()}"} if keys else {}
        text = httpx.get(f"{self.base_url}/metrics", headers=headers).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextmanager
def running(folder: Path, slot: EngineSlot | None = None, **settings: Any) -> Iterator[Server]:
    """A real server on `folder`; its engine runs in-process unless `engine_worker="process"` is given (a worker
    process per server would cost every test an interpreter start; tests/test_worker*.py use it)."""
    cfg = Settings(served_model_name=MODEL, **{"engine_worker": "thread", **settings})
    slot = slot or build_slot(cfg, folder)
    with ServerThread(create_app(cfg, slot)) as base_url:
        slot.wait_loaded(120)
        yield Server(base_url=base_url, slot=slot, settings=cfg)


@dataclass
class PoolServer(_Served):
    pool: ModelPool
    settings: Settings

    def admin(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        secret = self.settings.admin_key
        key = key if key is not None else (secret.get_secret_value() if secret is not None else "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, f"{self.base_url}/admin{path}", headers=headers, timeout=300, **kwargs)

    def states(self) -> dict[str, str]:
        return {name: slot.state for name, slot in self.pool.slots.items()}


@contextmanager
def running_models(models_file: Path, **settings: Any) -> Iterator[PoolServer]:
    """A real server on a models file (its entries' engines in-process unless they say engine_worker: process)."""
    cfg = Settings(models_file=models_file, **{"engine_worker": "thread", **settings})
    pool = build_pool(cfg, read_models_file(cfg, models_file))
    with ServerThread(create_app(cfg, pool)) as base_url:
        for slot in pool.slots.values():
            slot.wait_loaded(120)
        yield PoolServer(base_url=base_url, pool=pool, settings=cfg)


def data_url(width: int = 320, height: int = 240, seed: int | None = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, seed)).decode()


def image_message(url: str, text: str = "What is in this picture?", detail: str = "high") -> list[dict[str, Any]]:
    """Dify's shape: image parts (always with detail) before the text."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url, "detail": detail}},
                {"type": "text", "text": text},
            ],
        }
    ]
