"""How long `vlmbridge doctor` takes on the full-size Qwen3-VL-8B-Instruct fake (4 sparse shards, 17.5 GB of
headers-declared weights, a 151k-entry tokenizer). Goal: under 2 s. Prints a table and the doctor's figures;
asserts nothing.

    python benchmarks/bench_doctor.py [--runs 7] [--keep DIR]

Timed: `diagnose()` in-process (what `serve` runs before loading), and the `vlmbridge doctor --json` command as
a fresh process (Python start-up and imports included: what a user waits for).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _in_process(folder: Path, runs: int) -> tuple[list[float], dict[str, object]]:
    from vlmbridge.doctor import DoctorOptions, diagnose

    times, facts = [], {}
    for _ in range(runs):
        started = time.perf_counter()
        report = diagnose(folder, DoctorOptions(context=8192))
        times.append(time.perf_counter() - started)
        facts = dict(report.facts)
        facts["codes"] = report.codes()
    return times, facts


def _cli(folder: Path, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "vlmbridge", "doctor", str(folder), "--json", "--context", "8192"],
            capture_output=True,
            check=False,
        )
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="build the fake here and keep it (default: a temp dir)")
    args = parser.parse_args()

    from vlmbridge.tiny.fullsize import build_fullsize_qwen3_vl_8b

    with tempfile.TemporaryDirectory(prefix="vb-bench-doctor-") as tmp:
        folder = args.keep or Path(tmp) / "Qwen3-VL-8B-Instruct"
        started = time.perf_counter()
        build_fullsize_qwen3_vl_8b(folder, overwrite=True)
        built = time.perf_counter() - started
        apparent = sum(p.stat().st_size for p in folder.iterdir())
        on_disk = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
        print(f"fake built in {built:.1f}s: {apparent / 1e9:.2f} GB apparent, {on_disk / 1e6:.1f} MB on disk\n")

        warm, facts = _in_process(folder, args.runs)
        cold = _cli(folder, args.runs)

    print(f"{'doctor on Qwen3-VL-8B fake':<34}{'runs':>6}{'median':>10}{'min':>10}{'max':>10}")
    for name, times in (("diagnose() in-process", warm), ("`vlmbridge doctor --json` process", cold)):
        print(f"{name:<34}{len(times):>6}{statistics.median(times):>9.3f}s{min(times):>9.3f}s{max(times):>9.3f}s")
    memory = facts.get("memory")
    if isinstance(memory, dict):
        weights, kv = memory["weights_stored_bytes"] / 1e9, memory["kv_bytes_per_token"] / 1024
        print(f"\nweights {weights:.2f} GB bf16 · KV {kv:.0f} KiB/token · ", end="")
        print(f"{memory['image_tokens_per_image']} image tokens for 1920×1080")
    print("codes:", json.dumps(facts.get("codes")))


if __name__ == "__main__":
    main()
