"""Multi-turn scenario: a 5-turn chat whose first turn carries a 1024×1024 picture, resent every turn as chat
clients do; time to first token per turn, with and without vlmbridge's KV/encoder reuse, and `transformers serve`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from vlmbridge.bench.client import stream_chat
from vlmbridge.bench.servers import transformers_serve, vlmbridge_serve

__all__ = ["MultiTurnPlan", "run_multiturn"]

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


async def _conversation(base: str, plan: MultiTurnPlan, seed: int, body_for: Any) -> list[float]:
    messages: list[dict[str, Any]] = []
    ttfts = []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        for turn, question in enumerate(plan.turns):
            content: Any = question
            if turn == 0:
                content = [
                    {"type": "image_url", "image_url": {"url": _picture(plan.size, seed), "detail": "high"}},
                    {"type": "text", "text": question},
                ]
            messages.append({"role": "user", "content": content})
            _, ttft, answer = await stream_chat(client, body_for(messages))
            ttfts.append(ttft)
            messages.append({"role": "assistant", "content": answer})
    return ttfts


def run_multiturn(plan: MultiTurnPlan, console: Console) -> dict[str, list[float]]:
    """Median time to first token per turn for each system; prints the table."""
    tokens = plan.new_tokens

    def ours(messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": "bench", "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}

    def theirs(messages: list[dict[str, Any]]) -> dict[str, Any]:
        gen = {"max_new_tokens": tokens, "do_sample": False}
        return {"model": str(plan.model), "messages": messages, "stream": True, "generation_config": json.dumps(gen)}

    runs: list[tuple[str, Any, Any]] = []
    if "vlmbridge" in plan.systems:
        runs.append(("vlmbridge, reuse", lambda: vlmbridge_serve(plan.model, "bench", "--dtype", plan.dtype), ours))
        runs.append((
            "vlmbridge, no reuse",
            lambda: vlmbridge_serve(plan.model, "bench", "--dtype", plan.dtype, "--prefix-cache-mb", "0",
                                    "--encoder-cache-mb", "0"),
            ours,
        ))  # fmt: skip
    if "transformers serve" in plan.systems:
        runs.append(("transformers serve", lambda: transformers_serve(plan.model, "--device", "cpu"), theirs))

    medians: dict[str, list[float]] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("multi-turn", total=len(runs) * (plan.repeats + 1))
        for label, start_server, body_for in runs:
            progress.update(task, description=f"{label}: starting")
            try:
                with start_server() as base:
                    per_turn: list[list[float]] = [[] for _ in plan.turns]
                    for repeat in range(plan.repeats + 1):  # the first conversation only warms up
                        progress.update(task, description=f"{label}: conversation {repeat + 1}")
                        ttfts = asyncio.run(_conversation(base, plan, seed=1000 + repeat, body_for=body_for))
                        if repeat:
                            for turn, value in enumerate(ttfts):
                                per_turn[turn].append(value)
                        progress.advance(task)
            except RuntimeError as exc:
                console.print(f"{label} skipped: {exc}", style="yellow")
                continue
            medians[label] = [statistics.median(v) for v in per_turn]

    table = Table(
        title=f"multi-turn: {plan.model.name}, {plan.size}×{plan.size} picture in turn 1 (resent every turn), "
        f"{plan.new_tokens} new tokens per turn, median time to first token of {plan.repeats} conversations",
        title_justify="left",
    )
    table.add_column("turn", justify="right")
    for label in medians:
        table.add_column(label, justify="right")
    if {"vlmbridge, reuse", "vlmbridge, no reuse"} <= set(medians):
        table.add_column("reuse / no reuse", justify="right")
    for turn in range(len(plan.turns)):
        cells = [f"{medians[label][turn] * 1000:.0f} ms" for label in medians]
        if {"vlmbridge, reuse", "vlmbridge, no reuse"} <= set(medians):
            ratio = medians["vlmbridge, reuse"][turn] / medians["vlmbridge, no reuse"][turn]
            cells.append(f"{ratio:.2f}×")
        table.add_row(str(turn + 1), *cells)
    console.print(table)
    return medians
