"""Structured output: generation speed with a schema vs without, and grammar build time.

1. Throughput through `vlmbridge serve` (its own process, engine in-process) on the `small` (~30 M-param)
   Qwen3-VL checkpoint, with a picture: free requests vs requests with the four Dify templates' schemas, both with
   ignore_eos (same token counts), at 1 and 8 concurrent clients. Tokens are the server's own count
   (usage.completion_tokens). A model this small makes the grammar's per-token cost look as large as it can: a real
   model's step is hundreds of times longer.
2. Grammar build time (llguidance, as the engine builds a request's matcher) for the four templates' schemas, on
   the tiny tokenizer and on a byte-level vocabulary of Qwen's size (151,643 synthetic words + its added tokens),
   plus the per-token mask cost there (fill the bitmask and apply it to a logits row).

With `--engine vllm` (and `--vllm-python`, or VLMBRIDGE_VLLM_PYTHON), part 1 runs on the vLLM engine (its
`guidance` backend compiles the same grammar text, in vLLM's worker) and part 2, which measures llguidance itself, is
left out.

Prints tables; asserts nothing.

    python benchmarks/bench_structured.py [--requests 8] [--tokens 64] [--rounds 2] [--engine vllm]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server_overhead import picture_png, server_process

TEMPLATES = Path(__file__).resolve().parents[1] / "integrations" / "dify" / "templates"
NAMES = ("product-tagging", "ugc-moderation", "visual-customer-service", "homework-intake")


def template_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for name in NAMES:
        dsl = yaml.safe_load((TEMPLATES / f"{name}.yml").read_text())
        (llm,) = [n for n in dsl["workflow"]["graph"]["nodes"] if n["data"]["type"] == "llm"]
        out[name] = llm["data"]["structured_output"]["schema"]
    return out


# --- 1. throughput ---------------------------------------------------------------------------------------------------
def run_clients(base: str, bodies: list[dict[str, Any]], clients: int) -> tuple[int, float]:
    """Send `bodies` from `clients` threads (each takes the next body); (completion tokens, wall seconds)."""
    import httpx

    todo = list(bodies)
    lock = threading.Lock()
    tokens = [0]

    def client() -> None:
        with httpx.Client(base_url=base, timeout=300) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    body = todo.pop()
                r = http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                with lock:
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0], time.perf_counter() - start


def throughput(
    folder: Path, requests: int, tokens: int, rounds: int, dtype: str, engine_flags: tuple[str, ...]
) -> list[tuple[int, str, float]]:
    url = "data:image/png;base64," + base64.b64encode(picture_png(160, 120)).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it as JSON."},
    ]}]  # fmt: skip
    base_body = {"model": "small", "messages": messages, "max_tokens": tokens, "temperature": 1.0}
    schemas = list(template_schemas().values())
    rows = []
    with server_process(folder, dtype, "--max-batch-size", "8", *engine_flags) as base:
        warm = [{**base_body, "seed": 0, "ignore_eos": True}]
        warm += [{**base_body, "response_format": _fmt(s)} for s in schemas]  # compiles the grammars once
        run_clients(base, warm, 1)
        for clients in (1, 8):
            n = requests * clients
            # ignore_eos on both: every request runs max_tokens steps (a finished grammar then allows only the
            # end-of-sequence token), so both sides amortize the same prefills over the same number of tokens.
            free = [{**base_body, "seed": i, "ignore_eos": True} for i in range(n)]
            constrained = [
                {**base_body, "seed": i, "ignore_eos": True, "response_format": _fmt(schemas[i % 4])} for i in range(n)
            ]
            # Alternated, best of `rounds`: other work on a shared machine comes and goes between runs.
            best: dict[str, float] = {}
            for _ in range(rounds):
                for label, bodies in (("free (ignore_eos)", free), ("json_schema (templates)", constrained)):
                    count, wall = run_clients(base, bodies, clients)
                    best[label] = max(best.get(label, 0.0), count / wall)
            rows += [(clients, label, tps) for label, tps in best.items()]
    return rows


def _fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


# --- 2. grammar build time and mask cost -----------------------------------------------------------------------------
def qwen_sized_tokenizer() -> Any:
    """A byte-level BPE tokenizer of Qwen's size: 151,643 distinct synthetic words (ASCII and CJK), then Qwen's added
    tokens (the first 14 special)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from vlmbridge.tiny.fullsize import QWEN_ADDED_TOKENS

    rng = random.Random(0)
    to_unicode = bytes_to_unicode()  # type: ignore[no-untyped-call]
    pieces = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    words = {bytes([b]) for b in range(256)}
    while len(words) < 151_643:
        word = ("" if rng.random() < 0.5 else " ") + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        words.add(word.encode())
    vocab = ["".join(to_unicode[b] for b in w) for w in sorted(words, key=lambda w: (len(w), w))]
    backend = Tokenizer(models.BPE({v: i for i, v in enumerate(vocab)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_ADDED_TOKENS[:14])})
    tokenizer.add_tokens(list(QWEN_ADDED_TOKENS[14:]))
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def build_and_mask(tokenizer: Any, vocab_size: int) -> list[tuple[str, float, float, float]]:
    """Per template schema, as the engine does it: (grammar build + first matcher, median and max mask cost)."""
    from vlmbridge.engine.transformers.grammar import GrammarBook
    from vlmbridge.engine.types import StructuredSpec

    eos = frozenset({int(tokenizer.convert_tokens_to_ids("<|im_end|>"))})
    book = GrammarBook(tokenizer, vocab_size, eos, compile_timeout_s=600)
    rows = []
    try:
        for name, schema in template_schemas().items():
            spec = StructuredSpec("json_schema", json.dumps(schema))
            start = time.perf_counter()
            constraint = book.constraint(spec)
            build_s = time.perf_counter() - start
            gen = torch.Generator().manual_seed(0)
            costs = []
            for _ in range(64):
                logits = torch.randn(vocab_size, generator=gen)
                start = time.perf_counter()
                constraint.apply(logits)
                costs.append(time.perf_counter() - start)
                token = int(torch.argmax(logits))
                if token in eos:
                    break
                constraint.accept(token)
            rows.append((name, build_s, statistics.median(costs), max(costs)))
    finally:
        book.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per setting; the best counts")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--vllm-python", default=os.environ.get("VLMBRIDGE_VLLM_PYTHON"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    args = parser.parse_args()
    if args.engine == "vllm":
        if not args.vllm_python:
            sys.exit("--engine vllm: give --vllm-python or set VLMBRIDGE_VLLM_PYTHON (./vb vllm-venv creates one)")
        engine_flags: tuple[str, ...] = (
            "--engine", "vllm", "--vllm-python", args.vllm_python, "--engine-worker", "process",
            "--context", "4096", "--vllm-cpu-kv-cache-gib", "1",
        )  # fmt: skip
    else:
        # The engine in the server's process: on a shared 2-core machine 8 picture prefills at once can outlast the
        # worker process's 10 s heartbeat, and a restart mid-run measures nothing.
        engine_flags = ("--engine-worker", "thread")

    from vlmbridge.tiny.builder import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "small", "qwen3_vl", size="small")
        rows = throughput(folder, args.requests, args.tokens, args.rounds, args.dtype, engine_flags)
        from transformers import AutoTokenizer

        tiny = AutoTokenizer.from_pretrained(folder)

    print(
        f"engine {args.engine}, small Qwen3-VL ({args.dtype}), 160x120 picture, max_tokens={args.tokens}, "
        f"{args.requests} requests per client, best of {args.rounds} alternating rounds"
    )
    print(f"{'clients':>8}  {'requests':<26}{'tokens/s':>10}{'vs free':>9}")
    free = {c: tps for c, label, tps in rows if label.startswith("free")}
    for clients, label, tps in rows:
        print(f"{clients:>8}  {label:<26}{tps:>10.1f}{tps / free[clients]:>9.2f}")
    if args.engine == "vllm":
        return  # part 2 measures llguidance itself, the same library vLLM's guidance backend runs
    for label, tokenizer, size in (
        ("tiny tokenizer", tiny, len(tiny)),
        ("Qwen-sized vocabulary", qwen_sized_tokenizer(), 151_936),
    ):
        print(f"\ngrammar build and mask cost per token (llguidance, as the engine), {label} ({size} entries)")
        print(f"{'template schema':<26}{'build':>10}{'mask median':>13}{'mask max':>11}")
        for name, build_s, median_s, max_s in build_and_mask(tokenizer, size):
            print(f"{name:<26}{build_s * 1000:>7.1f} ms{median_s * 1000:>10.3f} ms{max_s * 1000:>8.1f} ms")


if __name__ == "__main__":
    main()
