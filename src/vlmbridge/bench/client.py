"""A closed-loop load generator for OpenAI-compatible servers: N clients, each sending requests back to back.

Tokens are counted on the client by re-tokenizing the streamed text with the model's own tokenizer, the same
way for every system, so no server's own accounting is trusted.

The client is aiohttp on uvloop, as vLLM's serving benchmark: on a small machine the load generator shares the
cores with the server it measures, and httpx's pure-Python stream took twice the CPU per streamed token (0.34 ms
against 0.17 ms measured here), which the benchmark then charged to the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

__all__ = ["RequestRecord", "RunResult", "run_async", "run_load", "session", "stream_chat"]

T = TypeVar("T")


@dataclass(frozen=True)
class RequestRecord:
    latency: float
    ttft: float
    tokens: int


@dataclass
class RunResult:
    clients: int
    wall: float
    records: list[RequestRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0


async def stream_chat(client: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[float, float, str]:
    """POST a streaming chat request; (latency, time to first token, text). Raises RuntimeError on errors.

    The first token is the first event that carries output: content, reasoning, or — when the body asks for
    logprobs — a token's logprobs, which arrive even for a token whose text is still an incomplete character
    (frequent with the random-weight benchmark checkpoints, where it would add decode steps to the figure)."""
    start = time.perf_counter()
    first = 0.0
    text: list[str] = []
    async with client.post("/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:300]!r}")
        async for line in response.content:  # one line at a time, however the server framed its writes
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"])[:300])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if piece:
                    text.append(piece)
                if piece or delta.get("reasoning_content") or (choice.get("logprobs") or {}).get("content"):
                    first = first or time.perf_counter()
    end = time.perf_counter()
    return end - start, (first or end) - start, "".join(text)


async def _one(client: aiohttp.ClientSession, body: dict[str, Any], count: Callable[[str], int]) -> RequestRecord:
    latency, ttft, text = await stream_chat(client, body)
    return RequestRecord(latency=latency, ttft=ttft, tokens=count(text))


async def _run(
    base_url: str, body: dict[str, Any], clients: int, per_client: int, count: Callable[[str], int],
    on_done: Callable[[], None],
) -> RunResult:  # fmt: skip
    result = RunResult(clients=clients, wall=0.0)
    async with session(base_url, connections=clients + 2) as client:

        async def worker() -> None:
            for _ in range(per_client):
                try:
                    result.records.append(await _one(client, body, count))
                except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                    result.errors.append(str(exc))
                on_done()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        result.wall = time.perf_counter() - start
    return result


def run_load(
    base_url: str, body: dict[str, Any], clients: int, per_client: int, count: Callable[[str], int],
    on_done: Callable[[], None] = lambda: None,
) -> RunResult:  # fmt: skip
    return run_async(_run(base_url, body, clients, per_client, count, on_done))


def session(base_url: str, connections: int = 4) -> aiohttp.ClientSession:
    """A keep-alive session against one server, with the benchmark's generous timeout."""
    return aiohttp.ClientSession(
        base_url, timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=connections)
    )


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed (it is, wherever vlmbridge serves)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
