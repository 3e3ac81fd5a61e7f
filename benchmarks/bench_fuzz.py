"""Fuzz the server from its own /openapi.json with schemathesis: 10,000+ generated requests, valid and invalid, against
the real app on a tiny Qwen3-VL, with the API key on. Prints the counts (cases, by status, 5xx, conformance failures)
and the first findings in full (request body and response). The harness is tests/test_fuzz_api.py's, at scale.

Exit code 1 when it found a 5xx or a conformance failure, so a release check can run it; otherwise it asserts nothing.

    python benchmarks/bench_fuzz.py [--cases 10000] [--seed N] [--show 20] [--json findings.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# The harness lives with the bounded test; run from anywhere, import it from the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_fuzz_api import SERVER_SETTINGS, FuzzReport, fuzz

from vlmbridge.server import create_app
from vlmbridge.server.factory import build_slot
from vlmbridge.server.openapi import install_openapi
from vlmbridge.server.runner import ServerThread
from vlmbridge.settings import Settings
from vlmbridge.tiny.builder import build_tiny_model


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated requests, about (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: a fresh one, printed)")
    parser.add_argument("--family", default="qwen3_vl", help="tiny checkpoint family (default qwen3_vl)")
    parser.add_argument("--show", type=int, default=20, help="findings printed in full per kind (default 20)")
    parser.add_argument("--json", type=Path, default=None, help="write every finding to this file")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    started = time.monotonic()
    next_progress = 1000

    def progress(report: FuzzReport) -> None:
        nonlocal next_progress
        if report.cases >= next_progress:
            next_progress += 1000
            by_status = ", ".join(f"{status}: {n}" for status, n in sorted(report.by_status.items()))
            print(f"  {report.cases} cases, {time.monotonic() - started:.0f} s — {by_status}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "tiny", args.family)
        cfg = Settings(**SERVER_SETTINGS)
        slot = build_slot(cfg, folder)
        app = create_app(cfg, slot)
        install_openapi(app, cfg)  # idempotent once create_app installs it
        with ServerThread(app) as base_url:
            slot.wait_loaded(300)
            print(f"fuzzing {base_url} ({args.family} tiny checkpoint), ~{args.cases} cases, seed {seed}")
            report = FuzzReport()
            # Operations without inputs run out of distinct cases early: more rounds, new seeds, until the count.
            for round_ in range(5):
                fuzz(base_url, args.cases - report.cases, seed=seed + round_, on_case=progress, report=report)
                if report.cases >= args.cases:
                    break
            health = _get(f"{base_url}/health")

    elapsed = time.monotonic() - started
    print(f"\n{elapsed:.0f} s, {report.cases / elapsed:.1f} cases/s; /health afterwards: {health}")
    print(report.summary(show=args.show))
    if args.json is not None:
        findings = {"server_errors": report.server_errors, "conformance": report.conformance}
        data = {kind: [asdict(f) for f in found] for kind, found in findings.items()}
        args.json.write_text(json.dumps({"seed": seed, **data}, indent=1))
        print(f"findings written to {args.json}")
    return 1 if report.server_errors or report.conformance else 0


def _get(url: str) -> int | str:
    import httpx

    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError as exc:  # the server went down: that is the finding
        return f"no answer ({type(exc).__name__})"


if __name__ == "__main__":
    sys.exit(main())
