"""Hot swap under load: how long a reload takes, and what the clients streaming meanwhile see.

Starts `vlmbridge serve --models FILE --admin-key K` in its own process on a tiny checkpoint (worker process
engine), runs N closed-loop streaming clients (greedy, fixed length), and after a baseline period reloads the model
from a second checkpoint of the same family (other weights). Prints the swap time (the admin call), failed requests,
p50/p99 latency of the requests before the swap and of those overlapping it, and when the old worker exited (for
"drain first" it is gone before the switch: 0). Two modes:

  - two copies: the budget holds both; the new copy loads and warms up while the old one serves;
  - drain first: --memory-budget holds one copy only; the old copy finishes its requests and exits before the new
    one loads, so requests wait for the load (the documented fallback; measured here).

Asserts nothing.

    python benchmarks/bench_swap.py [--clients 8] [--tokens 16] [--baseline 5] [--after 5] [--family qwen2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from vlmbridge.bench.servers import vlmbridge_process

ADMIN = "bench-admin"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def serve(models_file: Path, *extra: str) -> Iterator[tuple[str, int]]:
    with vlmbridge_process("--models", str(models_file), "--admin-key", ADMIN, *extra) as (base, proc):
        yield base, proc.pid


async def client(base: str, tokens: int, stop: asyncio.Event, log: list[tuple[float, float, bool]]) -> None:
    body = {
        "model": "m", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": tokens,
        "temperature": 0, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        while not stop.is_set():
            started = time.monotonic()
            ok = False
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    ok = response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and '"error"' in line:
                            ok = False
            except httpx.HTTPError:
                ok = False
            log.append((started, time.monotonic(), ok))


def workers(server_pid: int) -> int:
    """Worker processes the server has now (after the swap: 1 once the old copy has drained and exited)."""
    found = 0
    for children in Path(f"/proc/{server_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                found += b"vlmbridge.engine.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
    return found


async def run_swap(
    base: str, pid: int, new: Path, clients: int, tokens: int, baseline: float, after: float
) -> dict[str, float]:
    stop = asyncio.Event()
    log: list[tuple[float, float, bool]] = []
    tasks = [asyncio.create_task(client(base, tokens, stop, log)) for _ in range(clients)]
    await asyncio.sleep(baseline)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=base, timeout=600, headers=headers) as admin:
        one_copy = (await admin.get("/admin/models")).json()["data"][0]["memory_bytes"]
        swap_start = time.monotonic()
        answer = await admin.post("/admin/models/m/reload", json={"path": str(new)})
        swap_end = time.monotonic()
        if answer.status_code != 200:
            raise SystemExit(f"reload failed: {answer.text}")
        while workers(pid) > 1 and time.monotonic() - swap_end < 120:  # the old copy finishing and exiting
            await asyncio.sleep(0.1)
        old_gone = time.monotonic() - swap_end
        await asyncio.sleep(after)
        stop.set()
        await asyncio.gather(*tasks)
    before = [end - start for start, end, ok in log if ok and end < swap_start]
    during = [end - start for start, end, ok in log if ok and start < swap_end and end > swap_start]
    return {
        "swap_s": swap_end - swap_start,
        "requests": len(log),
        "failed": sum(1 for *_, ok in log if not ok),
        "before_p50": percentile(before, 0.5),
        "before_p99": percentile(before, 0.99),
        "during_n": len(during),
        "during_p50": percentile(during, 0.5),
        "during_p99": percentile(during, 0.99),
        "one_copy_mib": one_copy / 2**20,
        "old_gone_s": old_gone,
    }


def report(mode: str, r: dict[str, float]) -> None:
    print(
        f"{mode:12s} swap {r['swap_s']:6.2f} s | {int(r['requests'])} requests, {int(r['failed'])} failed | "
        f"latency before p50 {r['before_p50']:.3f} s p99 {r['before_p99']:.3f} s | "
        f"during the swap ({int(r['during_n'])}) p50 {r['during_p50']:.3f} s p99 {r['during_p99']:.3f} s | "
        f"old worker gone {r['old_gone_s']:.1f} s after the switch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--baseline", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=5.0)
    parser.add_argument("--family", default="qwen2")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmbridge.tiny.builder import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        root = Path(tmp)
        old = build_tiny_model(root / "old", args.family, seed=0)
        new = build_tiny_model(root / "new", args.family, seed=1)
        file = root / "models.yaml"
        file.write_text(f"models:\n  - name: m\n    path: {old}\n    load: startup\n    max_batch_size: 16\n")
        with serve(file) as (base, pid):
            two = asyncio.run(run_swap(base, pid, new, args.clients, args.tokens, args.baseline, args.after))
        report("two copies", two)
        # A budget for one copy and a half: the new copy's reservation does not fit beside the old one.
        budget = int(two["one_copy_mib"] * 1.5 * 2**20)
        with serve(file, "--memory-budget", str(budget)) as (base, pid):
            drained = asyncio.run(run_swap(base, pid, new, args.clients, args.tokens, args.baseline, args.after))
        report("drain first", drained)
        print(
            f"(drain first: --memory-budget {budget / 2**20:.0f} MiB; one copy measured {two['one_copy_mib']:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
