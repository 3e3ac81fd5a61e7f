"""Throughput scenario: 1 and 8 concurrent clients against vlmbridge, `transformers serve`, and the limit."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

from vlmbridge.bench.client import RunResult, run_load
from vlmbridge.bench.inprocess import InProcessGenerate
from vlmbridge.bench.report import Row, render_table
from vlmbridge.bench.servers import transformers_serve, vlmbridge_serve
from vlmbridge.bench.workload import Workload

__all__ = ["ThroughputPlan", "run_throughput"]


@dataclass(frozen=True)
class ThroughputPlan:
    model: Path
    clients: tuple[int, ...] = (1, 8)
    requests_per_client: int = 4
    rounds: int = 3  # each system runs requests_per_client per client this many times, systems taking turns
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


IN_PROCESS = "in-process generate"


def run_throughput(plan: ThroughputPlan, console: Console) -> list[Row]:
    generate = InProcessGenerate(plan.model, plan.work, plan.dtype, plan.device)
    reference = generate.run(1, 1, lambda _t: 0, keep_text=True).texts[0]
    count = TokenCounter(plan.model, reference, plan.work.new_tokens)
    threads = _thread_counts(plan.device)
    # Every system up at once, measured in alternating rounds, so that a noisy stretch of the machine's time hits
    # them all alike; one at a time when the checkpoint would not fit that often in memory.
    together = _fit_together(plan)
    groups = [plan.systems] if together else [(s,) for s in plan.systems]
    if not together:
        console.print("not enough free memory for every system at once: they run one after another", style="yellow")
        generate.close()
    per_round = sum(plan.requests_per_client * c for c in plan.clients)
    runs_per_round = sum(len(threads) if s == IN_PROCESS else 1 for s in plan.systems)
    merged: dict[tuple[str, int], RunResult] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmark", total=per_round * runs_per_round * plan.rounds)
        for group in groups:
            with ExitStack() as stack:
                runners = _start(
                    plan, group, stack, count, threads, generate if together else None, progress, task, console
                )
                for clients in plan.clients:
                    for r in range(plan.rounds):
                        for label, run in runners.items():
                            progress.update(task, description=f"{label}: {clients} client(s), round {r + 1}")
                            _merge(merged, (label, clients), run(clients, lambda n: progress.advance(task, n)))
    rows, fastest = _rows(plan, merged, threads)
    w = plan.work
    render_table(
        f"throughput: {plan.model.name}, {w.width}×{w.height} image, {w.new_tokens} new tokens, "
        f"{plan.rounds} rounds × {plan.requests_per_client} requests per client"
        + (", alternating" if together and len(plan.systems) > 1 else ""),
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


Runner = Callable[[int, Callable[[int], None]], RunResult]


def _start(
    plan: ThroughputPlan, group: tuple[str, ...], stack: ExitStack, count: TokenCounter, threads: list[int],
    generate: InProcessGenerate | None, progress: Progress, task: TaskID, console: Console,
) -> dict[str, Runner]:  # fmt: skip
    """Bring up the group's systems; a runner per system (the in-process limit: one per torch thread count)."""
    runners: dict[str, Runner] = {}
    for system in group:
        if system == IN_PROCESS:
            progress.update(task, description="loading the model in this process")
            gen = generate or stack.enter_context(_loaded(plan))
            for t in threads:
                runners[f"{IN_PROCESS}@{t}"] = partial(_generate, gen, plan.requests_per_client, count, t)
            continue
        progress.update(task, description=f"starting {system}")
        try:
            if system == "vlmbridge":
                base = stack.enter_context(
                    vlmbridge_serve(plan.model, "bench", "--dtype", plan.dtype, "--device", plan.device)
                )
                body = plan.work.vlmbridge_body("bench")
            else:
                base = stack.enter_context(
                    transformers_serve(plan.model, "--device", plan.device, "--dtype", plan.dtype)
                )
                body = plan.work.transformers_serve_body(str(plan.model))
        except RuntimeError as exc:
            console.print(f"{system} skipped: {exc}", style="yellow")
            continue
        run_load(base, body, 1, 1, count)  # warm-up
        runners[system] = partial(_serve, base, body, plan.requests_per_client, count)
    return runners


def _generate(
    gen: InProcessGenerate, calls: int, count: TokenCounter, threads: int, clients: int, advance: Callable[[int], None]
) -> RunResult:  # fmt: skip
    return gen.run(clients, calls, count, threads=threads, on_done=lambda: advance(clients))


def _serve(
    base: str, body: dict[str, Any], per_client: int, count: TokenCounter, clients: int, advance: Callable[[int], None]
) -> RunResult:  # fmt: skip
    return run_load(base, body, clients, per_client, count, lambda: advance(1))


@contextmanager
def _loaded(plan: ThroughputPlan) -> Iterator[InProcessGenerate]:
    gen = InProcessGenerate(plan.model, plan.work, plan.dtype, plan.device)
    try:
        yield gen
    finally:
        gen.close()


def _merge(merged: dict[tuple[str, int], RunResult], key: tuple[str, int], result: RunResult) -> None:
    """Rounds add up: their records, errors and wall time (tokens/s = all tokens over all rounds' time)."""
    into = merged.setdefault(key, RunResult(clients=result.clients, wall=0.0))
    into.records.extend(result.records)
    into.errors.extend(result.errors)
    into.wall += result.wall


def _rows(
    plan: ThroughputPlan, merged: dict[tuple[str, int], RunResult], threads: list[int]
) -> tuple[list[Row], list[str]]:
    """Table rows, the in-process limit at its fastest thread count per batch, and what each count gave."""
    rows = [Row(label, clients, r) for (label, clients), r in merged.items() if not label.startswith(IN_PROCESS)]
    fastest: list[str] = []
    for clients in plan.clients:
        tries = {t: merged[key] for t in threads if (key := (f"{IN_PROCESS}@{t}", clients)) in merged}
        if not tries:
            continue
        best = max(tries, key=lambda t: tries[t].tokens_per_s)
        rows.append(Row(IN_PROCESS, clients, tries[best]))
        fastest.append(
            f"batch {clients}: "
            + ", ".join(f"{t} thread(s) {r.tokens_per_s:.1f} tok/s" for t, r in sorted(tries.items()))
        )
    order = {s: i for i, s in enumerate(("vlmbridge", "transformers serve", IN_PROCESS))}
    rows.sort(key=lambda r: (r.clients, order.get(r.system, 9)))
    return rows, fastest


def _fit_together(plan: ThroughputPlan) -> bool:
    """Whether every system's copy of the model (each server's, and this process's) fits in free memory at once,
    with half as much again for activations and caches."""
    from vlmbridge.budget import device_budget

    weights = sum(f.stat().st_size for f in plan.model.glob("*.safetensors"))
    free = device_budget(plan.device).free
    return free is None or weights * len(plan.systems) * 3 // 2 <= free


def _thread_counts(device: str) -> list[int]:
    """torch CPU thread counts the in-process limit is tried at: 1 and every core (a GPU run needs one try)."""
    if device != "cpu":
        return [1]
    return sorted({1, os.cpu_count() or 1})
