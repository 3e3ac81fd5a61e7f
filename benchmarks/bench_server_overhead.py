"""Server overhead: the same image request through `vlmbridge serve` (openai client, streaming) and through
in-process transformers `generate()`, one client at a time, on the `small` (~30 M-param) Qwen3-VL checkpoint.

Tokens are counted on the client (one logprob entry per generated token); outputs are forced to the same length
(`ignore_eos` on the server, `min_new_tokens` in-process). Prints a table; asserts nothing.

    python benchmarks/bench_server_overhead.py [--requests 12] [--tokens 32] [--dtype auto]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def picture_png(width: int = 320, height: int = 240) -> bytes:
    from vlmbridge.tiny.images import demo_picture

    buf = io.BytesIO()
    demo_picture(width, height).save(buf, format="PNG")
    return buf.getvalue()


def in_process(folder: Path, png: bytes, requests: int, tokens: int, dtype: str) -> list[float]:
    from vlmbridge.loader import LoadOptions, load_model
    from vlmbridge.media.decode import decode_image

    loaded = load_model(folder, LoadOptions(device="cpu", dtype=dtype))
    image = decode_image(png).image
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    size = {"shortest_edge": 65536, "longest_edge": 1024 * 1024}
    times = []
    for i in range(requests + 1):
        start = time.perf_counter()
        inputs = loaded.processor.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"size": size},
        )  # fmt: skip
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        if i:  # the first run warms caches up
            times.append(time.perf_counter() - start)
    return times


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(folder: Path, dtype: str, *extra: str) -> Iterator[str]:
    """`vlmbridge serve` in its own process, as users run it (no GIL shared with the client)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "vlmbridge", "serve", str(folder), "--port", str(port), "--dtype", dtype,
           "--served-model-name", "small", *extra]  # fmt: skip
    env = {
        **os.environ,
        **({"OMP_NUM_THREADS": os.environ["SERVER_THREADS"]} if "SERVER_THREADS" in os.environ else {}),
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("vlmbridge serve exited early")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def through_server(folder: Path, png: bytes, requests: int, tokens: int, dtype: str) -> tuple[list[float], list[float]]:
    """Streaming requests from a plain httpx client (its own CPU use is kept small: it shares the cores)."""
    import httpx

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {
        "model": "small",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "logprobs": True,  # one entry per generated token: the count is the client's own
    }
    times, ttfts = [], []
    with server_process(folder, dtype) as base, httpx.Client(base_url=base, timeout=120) as client:
        for i in range(requests + 1):
            start = time.perf_counter()
            first = None
            counted = 0
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    choice = chunk["choices"][0] if chunk["choices"] else {}
                    entries = (choice.get("logprobs") or {}).get("content") or []
                    if entries:
                        counted += len(entries)
                        first = first or time.perf_counter()
            assert counted == tokens, counted
            if i:
                times.append(time.perf_counter() - start)
                ttfts.append((first or start) - start)
    return times, ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from vlmbridge.tiny.builder import build_tiny_model

    png = picture_png()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "small", "qwen3_vl", size="small")
        params = sum(p.numel() for p in torch.nn.Module.parameters(_load(folder))) / 1e6
        served, ttft = through_server(folder, png, args.requests, args.tokens, args.dtype)
        local = in_process(folder, png, args.requests, args.tokens, args.dtype)

    def tps(times: list[float]) -> float:
        return args.tokens / statistics.median(times)

    print(
        f"small Qwen3-VL ({params:.1f} M params), 320x240 image, {args.tokens} new tokens, {args.requests} requests, "
        f"1 client, dtype={args.dtype}, in-process torch threads={torch.get_num_threads()}"
    )
    print(f"{'path':<28}{'median latency':>16}{'tokens/s':>12}{'p95 latency':>14}")
    for name, times in (("in-process generate()", local), ("vlmbridge serve (HTTP)", served)):
        p95 = sorted(times)[max(0, int(len(times) * 0.95) - 1)]
        print(f"{name:<28}{statistics.median(times) * 1000:>13.1f} ms{tps(times):>12.1f}{p95 * 1000:>11.1f} ms")
    print(f"server time to first token (median): {statistics.median(ttft) * 1000:.1f} ms")
    ratio = tps(served) / tps(local)
    print(f"server / in-process tokens/s: {ratio:.3f}  (overhead {100 * (1 - ratio):+.1f}%; goal: <= 5%)")


def _load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder)  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
