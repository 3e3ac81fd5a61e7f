"""Multi-turn scenario: a 5-turn chat whose first turn carries a 1024×1024 picture, resent every turn as chat
clients do; time to first token per turn, with and without vlmbridge's reuse (KV prefix, vision-encoder and
processed-pixel caches), and `transformers serve`. vlmbridge's cache hits per turn come from its /metrics.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import re
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from vlmbridge.bench.client import run_async, session, stream_chat
from vlmbridge.bench.servers import transformers_serve, vlmbridge_serve

__all__ = ["NO_REUSE", "MultiTurnPlan", "pixel_cache_hits", "run_multiturn"]

# Every cache off: the baseline decodes, processes, encodes and prefills the whole conversation every turn.
NO_REUSE = ("--prefix-cache-mb", "0", "--encoder-cache-mb", "0", "--pixel-cache-mb", "0")
_PIXEL_HITS = re.compile(r'^vlmbridge_cache\{cache="pixel",stat="hits"\} (\S+)$', re.MULTILINE)

QUESTIONS = (
    "Describe this picture.",
    "What colours stand out?",
    "Is there a person in it?",
    "Write a title for it.",
    "Summarise our conversation.",
)


@dataclass(frozen=True)
class MultiTurnPlan:
    model: Path
    systems: tuple[str, ...] = ("vlmbridge", "transformers serve")
    repeats: int = 3
    new_tokens: int = 16
    size: int = 1024
    dtype: str = "auto"
    turns: tuple[str, ...] = field(default=QUESTIONS)


def _picture(size: int, seed: int) -> str:
    from vlmbridge.tiny.images import noise_picture

    buf = io.BytesIO()
    noise_picture(size, size, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def pixel_cache_hits(client: aiohttp.ClientSession) -> float | None:
    """The server's pixel-cache hit counter (None where /metrics has none: another server, or an older one)."""
    try:
        async with client.get("/metrics") as response:
            found = _PIXEL_HITS.search(await response.text())
    except aiohttp.ClientError:
        return None
    return float(found.group(1)) if found else None


@dataclass(frozen=True)
class _Run:
    label: str
    start: Callable[[], AbstractContextManager[str]]  # starts the server, yields its base URL
    body_for: Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass
class _Turns:
    ttfts: list[float] = field(default_factory=list)
    pixel_hits: list[float | None] = field(default_factory=list)  # hits added by each turn


async def _conversation(
    base: str, plan: MultiTurnPlan, seed: int, body_for: Callable[[list[dict[str, Any]]], dict[str, Any]]
) -> _Turns:
    messages: list[dict[str, Any]] = []
    out = _Turns()
    async with session(base) as client:
        before = await pixel_cache_hits(client)
        for turn, question in enumerate(plan.turns):
            content: Any = question
            if turn == 0:
                content = [
                    {"type": "image_url", "image_url": {"url": _picture(plan.size, seed), "detail": "high"}},
                    {"type": "text", "text": question},
                ]
            messages.append({"role": "user", "content": content})
            _, ttft, answer = await stream_chat(client, body_for(messages))
            out.ttfts.append(ttft)
            after = await pixel_cache_hits(client)
            out.pixel_hits.append(None if after is None or before is None else after - before)
            before = after
            messages.append({"role": "assistant", "content": answer})
    return out


def run_multiturn(plan: MultiTurnPlan, console: Console) -> dict[str, list[float]]:
    """Median time to first token per turn for each system; prints the table."""
    tokens = plan.new_tokens

    def ours(messages: list[dict[str, Any]]) -> dict[str, Any]:
        # logprobs: every token streams an event, so the first token is seen even before it makes text.
        return {"model": "bench", "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
                "logprobs": True}  # fmt: skip

    def theirs(messages: list[dict[str, Any]]) -> dict[str, Any]:
        gen = {"max_new_tokens": tokens, "do_sample": False}
        return {"model": str(plan.model), "messages": messages, "stream": True, "generation_config": json.dumps(gen)}

    # Systems in one group run side by side, their conversations alternating, so a change in the machine's load
    # (other work on a shared host) hits both sides of the reuse / no-reuse ratio alike.
    groups: list[list[_Run]] = []
    if "vlmbridge" in plan.systems:
        serve = functools.partial(vlmbridge_serve, plan.model, "bench", "--dtype", plan.dtype)
        groups.append(
            [_Run("vlmbridge, reuse", serve, ours), _Run("vlmbridge, no reuse", lambda: serve(*NO_REUSE), ours)]
        )
    if "transformers serve" in plan.systems:
        groups.append([_Run("transformers serve", lambda: transformers_serve(plan.model, "--device", "cpu"), theirs)])

    medians: dict[str, list[float]] = {}
    hits: dict[str, list[float | None]] = {}  # median pixel-cache hits each turn added
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("multi-turn", total=sum(len(g) for g in groups) * (plan.repeats + 1))
        for group in groups:
            with contextlib.ExitStack() as stack:
                bases: dict[str, str] = {}
                for run in group:
                    progress.update(task, description=f"{run.label}: starting")
                    try:
                        bases[run.label] = stack.enter_context(run.start())
                    except RuntimeError as exc:
                        console.print(f"{run.label} skipped: {exc}", style="yellow")
                        progress.advance(task, plan.repeats + 1)
                ttfts: dict[str, list[list[float]]] = {label: [[] for _ in plan.turns] for label in bases}
                turn_hits: dict[str, list[list[float]]] = {label: [[] for _ in plan.turns] for label in bases}
                for repeat in range(plan.repeats + 1):  # the first conversation only warms up
                    for run in (r for r in group if r.label in bases):
                        progress.update(task, description=f"{run.label}: conversation {repeat + 1}")
                        try:
                            turns = run_async(_conversation(bases[run.label], plan, 1000 + repeat, run.body_for))
                        except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                            console.print(f"{run.label} dropped: {exc}", style="yellow")
                            del bases[run.label]
                            continue
                        if repeat:
                            for turn, (value, added) in enumerate(zip(turns.ttfts, turns.pixel_hits, strict=True)):
                                ttfts[run.label][turn].append(value)
                                if added is not None:
                                    turn_hits[run.label][turn].append(added)
                        progress.advance(task)
            for label in bases:
                medians[label] = [statistics.median(v) for v in ttfts[label]]
                hits[label] = [statistics.median(v) if v else None for v in turn_hits[label]]

    console.print(_table(plan, medians, hits))
    return medians


def _table(plan: MultiTurnPlan, medians: dict[str, list[float]], hits: dict[str, list[float | None]]) -> Table:
    table = Table(
        title=f"multi-turn: {plan.model.name}, {plan.size}×{plan.size} picture in turn 1 (resent every turn), "
        f"{plan.new_tokens} new tokens per turn, median time to first token of {plan.repeats} conversations",
        title_justify="left",
    )
    both = {"vlmbridge, reuse", "vlmbridge, no reuse"} <= set(medians)
    with_hits = [label for label in medians if any(h is not None for h in hits.get(label, []))]
    table.add_column("turn", justify="right")
    for label in medians:
        table.add_column(label, justify="right")
    if both:
        table.add_column("reuse / no reuse", justify="right")
    if with_hits:
        table.add_column("pixel-cache hits: " + " / ".join(label.removeprefix("vlmbridge, ") for label in with_hits),
                         justify="right")  # fmt: skip
    for turn in range(len(plan.turns)):
        cells = [f"{medians[label][turn] * 1000:.0f} ms" for label in medians]
        if both:
            ratio = medians["vlmbridge, reuse"][turn] / medians["vlmbridge, no reuse"][turn]
            cells.append(f"{ratio:.2f}×")
        if with_hits:
            cells.append(" / ".join(_added(hits[label][turn]) for label in with_hits))
        table.add_row(str(turn + 1), *cells)
    return table


def _added(value: float | None) -> str:
    return "—" if value is None else f"+{value:.0f}"
