"""Overload: does a bounded queue keep goodput up when 10× more clients arrive than the server can serve?

Starts `vlmbridge serve` in its own process (the clients must not share its GIL) on a tiny Qwen3-VL with a bounded
queue, then, from async httpx clients on loopback:
  1. capacity: completed requests per second with 8 closed-loop clients (short requests: a 64×64 PNG as a data URI,
     16 generated tokens with ignore_eos, so every request does the same work);
  2. overload: 10× the clients for --seconds; counts by status (only 200 and 429 expected), goodput (200s per
     second) as a ratio of capacity (goal >= 0.8), p50/p99 latency of the admitted requests;
  3. the cost of a refusal: sequential 429s while the queue is held full, against 404s (unknown model, same body)
     under the same load, interleaved, and 404s on the idle server;
  4. the server's RSS before the load and after it.
Clients retry a 429 at once (the worst case for the server) unless --honor-retry-after. Asserts nothing.

    python benchmarks/bench_load.py [--seconds 60] [--capacity-seconds 20] [--clients 8] [--factor 10]
                                    [--max-queue 16] [--max-batch-size 8] [--size tiny|small] [--probes 50]
                                    [--honor-retry-after] [--server-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vlmbridge.bench.servers import vlmbridge_process

MODEL = "tiny"
CONTEXT = 2048  # the server's --context: bounds the long requests that hold the queue full


@dataclass
class Phase:
    seconds: float
    statuses: Counter[int | str] = field(default_factory=Counter)
    latency: dict[int | str, list[float]] = field(default_factory=dict)

    def record(self, status: int | str, seconds: float) -> None:
        self.statuses[status] += 1
        self.latency.setdefault(status, []).append(seconds)

    def rate(self, status: int | str = 200) -> float:
        return self.statuses[status] / self.seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float], q: float | None = None) -> str:
    if not values:
        return "n/a"
    return f"{1000 * (statistics.fmean(values) if q is None else percentile(values, q)):.1f} ms"


def picture_uri(size: int = 64) -> str:
    from vlmbridge.tiny.images import demo_picture

    buf = io.BytesIO()
    demo_picture(size, size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(image: str, max_tokens: int, model: str = MODEL) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe."}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # the same work for every request, whatever the random weights emit
    }


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None  # not Linux


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def closed_loop(
    client: httpx.AsyncClient, body: dict[str, Any], clients: int, seconds: float, honor_retry_after: bool
) -> Phase:
    """`clients` clients, each sending its next request as soon as the last one is answered, for `seconds`.
    Only answers that arrive inside the window count; the requests still open at its end are abandoned."""
    phase = Phase(seconds)
    stop_at = time.monotonic() + seconds

    async def one_client() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            retry_after = 0.0
            try:
                response = await client.post("/v1/chat/completions", json=body)
                status: int | str = response.status_code
                if status == 429 and honor_retry_after:
                    retry_after = float(response.headers.get("retry-after", "1"))
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if time.monotonic() < stop_at:
                phase.record(status, time.perf_counter() - started)
            if retry_after:
                await asyncio.sleep(retry_after)

    tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()  # closes their connections: the server cancels what they were waiting for
    await asyncio.gather(*tasks, return_exceptions=True)
    return phase


async def timed(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, float]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    return response.status_code, time.perf_counter() - started


async def refusal_cost(
    client: httpx.AsyncClient, body: dict[str, Any], unknown: dict[str, Any], holders: int, probes: int
) -> tuple[list[float], list[float], list[float], int]:
    """(404s idle, 429s while full, 404s under that same load, admitted probes). A 429 needs a full queue, so
    `holders` long requests keep it full; the 429 and 404 probes alternate, so both see the same load."""
    idle = [(await timed(client, unknown))[1] for _ in range(probes)]
    # Generate to the end of the context (more is a 400): seconds per request.
    first = await client.post("/v1/chat/completions", json={**body, "max_tokens": 1})
    long_body = {**body, "max_tokens": CONTEXT - first.json()["usage"]["prompt_tokens"]}

    async def hold() -> None:
        while True:
            try:
                response = await client.post("/v1/chat/completions", json=long_body)
                if response.status_code != 200:  # 429: the queue is full already; retry soon to keep it so
                    await asyncio.sleep(0.05)
            except httpx.HTTPError:
                await asyncio.sleep(0.05)

    holding = [asyncio.create_task(hold()) for _ in range(holders)]
    refused: list[float] = []
    loaded: list[float] = []
    admitted = 0
    try:
        deadline = time.monotonic() + 60
        while len(refused) < probes and time.monotonic() < deadline:
            status, seconds = await timed(client, body)
            if status == 429:
                refused.append(seconds)
                loaded.append((await timed(client, unknown))[1])
            else:
                admitted += 1  # the queue had room this time (a holder was between requests)
                await asyncio.sleep(0.05)
    finally:
        for task in holding:
            task.cancel()
        await asyncio.gather(*holding, return_exceptions=True)
    return idle, refused, loaded, admitted


async def run(base: str, pid: int, args: argparse.Namespace) -> None:
    image = picture_uri()
    body = chat_body(image, args.max_tokens)
    unknown = chat_body(image, args.max_tokens, model="no-such-model")
    overload_clients = args.clients * args.factor
    limits = httpx.Limits(max_connections=overload_clients + 8, max_keepalive_connections=overload_clients + 8)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        await closed_loop(client, body, args.clients, 3, honor_retry_after=False)  # warm-up
        rss_before = rss_mib(pid)
        capacity = await closed_loop(client, body, args.clients, args.capacity_seconds, honor_retry_after=False)
        server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
        overload = await closed_loop(client, body, overload_clients, args.seconds, args.honor_retry_after)
        server_cpu = (cpu_seconds(pid) or 0.0) - server_cpu if server_cpu is not None else None
        client_cpu = time.process_time() - client_cpu
        await asyncio.sleep(1)  # let the abandoned requests' cancellations settle
        holders = args.max_batch_size + args.max_queue
        idle, refused, loaded, admitted = await refusal_cost(client, body, unknown, holders, args.probes)
        rss_after = rss_mib(pid)

    cap = capacity.rate()
    goodput = overload.rate()
    print(f"\nserver: vlmbridge serve, {args.size} Qwen3-VL, --max-batch-size {args.max_batch_size} "
          f"--max-queue {args.max_queue}, {args.server_threads} torch thread(s); {os.cpu_count()} CPU cores shared "
          f"with the clients; request: 64x64 PNG + text, {args.max_tokens} tokens (ignore_eos)")  # fmt: skip
    print(f"capacity  ({args.clients} clients, {args.capacity_seconds:.0f} s): {cap:.2f} completed req/s; "
          f"latency p50 {ms(capacity.latency.get(200, []), 0.5)}, p99 {ms(capacity.latency.get(200, []), 0.99)}; "
          f"statuses {dict(capacity.statuses)}")  # fmt: skip
    retry = "clients honour Retry-After" if args.honor_retry_after else "clients retry 429s at once"
    print(f"overload  ({overload_clients} clients, {args.seconds:.0f} s, {retry}):")
    print(f"  statuses: {dict(sorted(overload.statuses.items(), key=str))}")
    unexpected = {s: n for s, n in overload.statuses.items() if s not in (200, 429)}
    print(f"  unexpected (not 200/429): {unexpected or 'none'}")
    ratio = goodput / cap if cap else float("nan")
    verdict = "ok" if ratio >= 0.8 else "BELOW GOAL"
    print(f"  goodput: {goodput:.2f} req/s = {ratio:.2f} x capacity (goal >= 0.8: {verdict})")
    admitted_latency = overload.latency.get(200, [])
    print(f"  admitted (200) latency: p50 {ms(admitted_latency, 0.5)}, p99 {ms(admitted_latency, 0.99)}")
    print(f"  refused (429): {overload.rate(429):.1f}/s, latency p50 {ms(overload.latency.get(429, []), 0.5)}")
    # On a small machine the clients' own CPU use eats into the server's: say how much.
    if server_cpu is not None:
        print(f"  CPU used: server {server_cpu:.1f} s, clients {client_cpu:.1f} s, of "
              f"{args.seconds * (os.cpu_count() or 1):.0f} core-seconds")  # fmt: skip
    print(f"refusal cost, sequential, same body ({args.probes} each):")
    print(f"  404 unknown model, idle server:        mean {ms(idle)}, p50 {ms(idle, 0.5)}")
    print(f"  429 queue full ({holders} holders):        mean {ms(refused)}, p50 {ms(refused, 0.5)} (n={len(refused)}, "
          f"{admitted} probes admitted instead)")  # fmt: skip
    print(f"  404 unknown model, same load:           mean {ms(loaded)}, p50 {ms(loaded, 0.5)}")
    if refused and loaded:
        print(f"  429 / 404 under the same load: {statistics.fmean(refused) / statistics.fmean(loaded):.2f}")
    if rss_before is not None and rss_after is not None:
        print(f"server RSS: {rss_before:.0f} MiB before the load, {rss_after:.0f} MiB after "
              f"({rss_after - rss_before:+.0f} MiB)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="overload phase length (default 60)")
    parser.add_argument("--capacity-seconds", type=float, default=None, help="capacity phase (default: min(20, s))")
    parser.add_argument("--clients", type=int, default=8, help="clients for the capacity phase (default 8)")
    parser.add_argument("--factor", type=int, default=10, help="overload = factor x clients (default 10)")
    parser.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue (default 16)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's --max-batch-size (default 8)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny", help="checkpoint size (default tiny)")
    parser.add_argument("--probes", type=int, default=50, help="requests per refusal-cost measurement (default 50)")
    parser.add_argument("--honor-retry-after", action="store_true", help="clients wait Retry-After after a 429")
    parser.add_argument(
        "--server-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
        help="the server's torch threads (default: half the cores; the rest are the clients' and the event loop's)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.capacity_seconds is None:
        args.capacity_seconds = min(20.0, args.seconds)

    from vlmbridge.tiny.builder import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "model", "qwen3_vl", size=args.size)
        options = ["--max-queue", str(args.max_queue), "--max-batch-size", str(args.max_batch_size), "--context",
                   str(CONTEXT)]  # fmt: skip
        env = {**os.environ, "VLMBRIDGE_TORCH_THREADS": str(args.server_threads)}
        serving = vlmbridge_process(str(folder), "--served-model-name", MODEL, *options, env=env, timeout=300)
        with serving as (base, proc):
            asyncio.run(run(base, proc.pid, args))


if __name__ == "__main__":
    main()
