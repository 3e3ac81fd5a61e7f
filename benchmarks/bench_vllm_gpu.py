"""GPU decode throughput of an 8B-shaped Qwen3-VL: vlmbridge + vLLM, plain vLLM, and vlmbridge's transformers engine,
at 1/8/64 clients, against the HBM-bandwidth limit. One command, one table; asserts nothing.

    python benchmarks/bench_vllm_gpu.py [--vllm-python PY] [--clients 1,8,64] [--tokens 128]

The model is Qwen3-VL-8B-Instruct's exact shapes (`vlmbridge.tiny.fullsize`, zero weights: no download; every
matmul costs what it costs with real weights), built in a temporary folder. Systems: plain vLLM
(`python -m vllm.entrypoints.openai.api_server`) and vlmbridge `engine: vllm` when `--vllm-python` (or
VLMBRIDGE_VLLM_PYTHON, or this interpreter) has vLLM; vlmbridge's transformers engine always (`--no-transformers`
skips it). Each answer is forced to `--tokens` tokens (`ignore_eos`).

The limit: a decode step reads every language-model weight once and each sequence's KV cache, so at batch B
tokens/s <= B × bandwidth / (weight bytes + B × KV bytes per sequence). The bandwidth is measured here (a large
device-to-device copy), not taken from a datasheet.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlmbridge.bench.client import RunResult, run_load
from vlmbridge.bench.servers import vllm_api_server, vlmbridge_serve
from vlmbridge.bench.workload import Workload

NAME = "bench"


def measured_bandwidth() -> float:
    """Bytes/s of a 4 GiB device-to-device copy (read + write), the best of 5."""
    import torch

    n = 4 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = max(best, 2 * n / (time.perf_counter() - start))
    del src, dst
    torch.cuda.empty_cache()
    return best


def lm_bytes_and_kv(folder: Path) -> tuple[int, int]:
    """(language-model weight bytes read per decode step, KV bytes per token), from the checkpoint's headers."""
    from vlmbridge.folder import ModelFolder, read_safetensors_header

    folder_info = ModelFolder.open(folder)
    weights = 0
    for shard in folder_info.safetensors_files:
        header = read_safetensors_header(shard)
        for name, (_dtype, _shape, (start, end)) in header.tensors.items():
            # The vision tower runs once per image, and a step reads one embedding row, not the table.
            if "visual." not in name and "embed_tokens" not in name:
                weights += end - start
    t = folder_info.text_config
    head_dim = int(t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"])
    kv_per_token = 2 * int(t["num_hidden_layers"]) * int(t["num_key_value_heads"]) * head_dim * 2  # bf16 K and V
    return weights, kv_per_token


def has_vllm(python: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec("vllm") is not None
    return subprocess.run([python, "-c", "import vllm"], capture_output=True, check=False).returncode == 0


def decode_rate(result: RunResult, tokens: int) -> float:
    """Tokens/s after the first token, per request, times the clients (what the batch decodes together)."""
    rates = [(tokens - 1) / (r.latency - r.ttft) for r in result.records if r.latency > r.ttft]
    return statistics.median(rates) * result.clients if rates else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.environ.get("VLMBRIDGE_VLLM_PYTHON") or sys.executable)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--no-transformers", action="store_true", help="skip vlmbridge's transformers engine")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    console = Console()
    clients = tuple(int(c) for c in args.clients.split(","))
    batch = max(clients)
    bandwidth = measured_bandwidth()
    work = Workload(new_tokens=args.tokens)
    body = work.vlmbridge_body(NAME)
    rows: list[tuple[str, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        from vlmbridge.tiny.fullsize import build_fullsize_qwen3_vl_8b

        model = build_fullsize_qwen3_vl_8b(Path(tmp) / "Qwen3-VL-8B-shaped")
        weights, kv_per_token = lm_bytes_and_kv(model)
        common = ("--dtype", "bf16", "--device", "cuda", "--context", str(args.context),
                  "--max-batch-size", str(batch), "--skip-doctor")  # fmt: skip
        systems: list[tuple[str, object]] = []
        if has_vllm(args.vllm_python):
            vllm_flags = ["--model", str(model), "--served-model-name", NAME, "--dtype", "bfloat16",
                          "--max-model-len", str(args.context), "--max-num-seqs", str(batch),
                          "--enable-prefix-caching", "--limit-mm-per-prompt", '{"image": 8, "video": 0}',
                          "--disable-log-stats"]  # fmt: skip
            systems.append(("plain vLLM", lambda: vllm_api_server(args.vllm_python, *vllm_flags)))
            ours = (*common, "--engine", "vllm", "--vllm-python", args.vllm_python)
            systems.append(("vlmbridge + vLLM", lambda: vlmbridge_serve(model, NAME, *ours)))
        else:
            console.print(f"no vLLM for {args.vllm_python}: vlmbridge's transformers engine only", style="yellow")
        if not args.no_transformers:
            systems.append(("vlmbridge (transformers)", lambda: vlmbridge_serve(model, NAME, *common)))
        for label, start in systems:
            console.print(f"starting {label}…", style="dim")
            with start() as base:  # type: ignore[operator]
                run_load(base, body, 1, 1, lambda _t: args.tokens)  # warm-up
                for n in clients:
                    result = run_load(base, body, n, args.requests, lambda _t: args.tokens)
                    if result.errors:
                        console.print(f"{label} at {n}: {len(result.errors)} errors, e.g. {result.errors[0]}")
                    rows.append((label, n, result.tokens_per_s, decode_rate(result, args.tokens)))
    table = Table(
        title=f"8B-shaped Qwen3-VL (bf16, {weights / 1e9:.1f} GB LM weights), {work.width}×{work.height} image, "
        f"{args.tokens} tokens per answer; {torch.cuda.get_device_name()} measured {bandwidth / 1e12:.2f} TB/s",
        title_justify="left",
    )
    for col in ("system", "clients", "tokens/s", "decode tok/s", "HBM limit tok/s", "of limit"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for label, n, tps, decode in rows:
        per_seq_kv = kv_per_token * (300 + args.tokens)  # ~300 prompt tokens (text + one image) + the answer
        limit = n * bandwidth / (weights + n * per_seq_kv)
        table.add_row(label, str(n), f"{tps:.0f}", f"{decode:.0f}", f"{limit:.0f}", f"{decode / limit:.0%}")
    console.print(table)


if __name__ == "__main__":
    main()
