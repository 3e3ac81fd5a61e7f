"""Throughput scenario: 1 and 8 concurrent clients against vlmbridge, `transformers serve`, and the limit."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from vlmbridge.bench.client import RunResult, run_load
from vlmbridge.bench.inprocess import in_process
from vlmbridge.bench.report import Row, render_table
from vlmbridge.bench.servers import transformers_serve, vlmbridge_serve
from vlmbridge.bench.workload import Workload

__all__ = ["ThroughputPlan", "run_throughput"]


@dataclass(frozen=True)
class ThroughputPlan:
    model: Path
    clients: tuple[int, ...] = (1, 8)
    requests_per_client: int = 4
    work: Workload = field(default_factory=Workload)
    systems: tuple[str, ...] = ("vlmbridge", "transformers serve", "in-process generate")
    dtype: str = "auto"
    device: str = "cpu"  # every system runs here: a comparison across devices would measure the devices


class TokenCounter:
    """Counts generated tokens from the streamed text, on the client.

    Every system runs the same greedy request, so its text must equal the reference (in-process generate of
    exactly `new_tokens` tokens): then the count is exact. Text that differs is re-tokenized and noted.
    """

    def __init__(self, model: Path, reference: str, new_tokens: int) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(model)
        self.reference = reference
        self.new_tokens = new_tokens
        self.mismatches = 0

    def __call__(self, text: str) -> int:
        if text == self.reference:
            return self.new_tokens
        self.mismatches += 1
        return len(self._tok(text, add_special_tokens=False).input_ids)


def run_throughput(plan: ThroughputPlan, console: Console) -> list[Row]:
    reference = in_process(
        plan.model, plan.work, 1, 1, lambda _t: 0, plan.dtype, keep_text=True, device=plan.device
    ).texts[0]
    count = TokenCounter(plan.model, reference, plan.work.new_tokens)
    rows: list[Row] = []
    fastest: list[str] = []
    total = sum(plan.requests_per_client * c for c in plan.clients) * len(plan.systems)
    if "in-process generate" in plan.systems:
        total += sum(plan.requests_per_client * c for c in plan.clients) * (len(_thread_counts(plan.device)) - 1)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmark", total=total)

        def step() -> None:
            progress.advance(task)

        def load(base: str, body: dict[str, object], label: str) -> None:
            progress.update(task, description=f"{label}: warm-up")
            run_load(base, body, 1, 1, count)
            for clients in plan.clients:
                progress.update(task, description=f"{label}: {clients} client(s)")
                result = run_load(base, body, clients, plan.requests_per_client, count, step)
                rows.append(Row(label, clients, result))

        if "vlmbridge" in plan.systems:
            progress.update(task, description="starting vlmbridge serve")
            with vlmbridge_serve(plan.model, "bench", "--dtype", plan.dtype, "--device", plan.device) as base:
                load(base, plan.work.vlmbridge_body("bench"), "vlmbridge")
        if "transformers serve" in plan.systems:
            progress.update(task, description="starting transformers serve")
            try:
                with transformers_serve(plan.model, "--device", plan.device, "--dtype", plan.dtype) as base:
                    load(base, plan.work.transformers_serve_body(str(plan.model)), "transformers serve")
            except RuntimeError as exc:
                console.print(f"transformers serve skipped: {exc}", style="yellow")
        if "in-process generate" in plan.systems:
            for clients in plan.clients:
                progress.update(task, description=f"in-process generate: batch {clients}")

                def advance(n: int = clients) -> None:
                    progress.advance(task, n)

                # The limit at its best: every torch thread count worth trying, the fastest kept (on a busy CPU,
                # two threads can be ten times slower than one: a preempted thread stalls every parallel kernel).
                tries: dict[int, RunResult] = {}
                for threads in _thread_counts(plan.device):
                    tries[threads] = in_process(
                        plan.model, plan.work, clients, plan.requests_per_client, count, plan.dtype,
                        on_done=advance, device=plan.device, threads=threads,
                    )  # fmt: skip
                best = max(tries, key=lambda t: tries[t].tokens_per_s)
                fastest.append(
                    f"batch {clients}: "
                    + ", ".join(f"{t} thread(s) {r.tokens_per_s:.1f} tok/s" for t, r in sorted(tries.items()))
                )
                rows.append(Row("in-process generate", clients, tries[best]))
    order = {s: i for i, s in enumerate(("vlmbridge", "transformers serve", "in-process generate"))}
    rows.sort(key=lambda r: (r.clients, order.get(r.system, 9)))
    w = plan.work
    render_table(
        f"throughput: {plan.model.name}, {w.width}×{w.height} image, {w.new_tokens} new tokens, "
        f"{plan.requests_per_client} requests per client",
        rows,
        console,
    )
    console.print(
        f"tokens are counted on the client: responses equal to the in-process reference text count "
        f"{plan.work.new_tokens} tokens each; {count.mismatches} differing response(s) were re-tokenized",
        style="dim",
    )
    if fastest:
        console.print("in-process generate, each batch at its fastest: " + "; ".join(fastest), style="dim")
    return rows


def _thread_counts(device: str) -> list[int]:
    """torch CPU thread counts the in-process limit is tried at: 1 and every core (a GPU run needs one try)."""
    if device != "cpu":
        return [1]
    return sorted({1, os.cpu_count() or 1})
