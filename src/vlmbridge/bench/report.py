"""The side-by-side table: tokens/s, latency percentiles, time to first token, and ratios."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from vlmbridge.bench.client import RunResult

__all__ = ["Row", "percentile", "render_table"]


def percentile(values: list[float], q: float) -> float:
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return float("nan")
    k = (len(clean) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return clean[lo] + (clean[hi] - clean[lo]) * (k - lo)


@dataclass(frozen=True)
class Row:
    system: str
    clients: int
    result: RunResult

    @property
    def tps(self) -> float:
        return self.result.tokens_per_s


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value * 1000:.0f} ms"


def render_table(title: str, rows: list[Row], console: Console) -> None:
    table = Table(title=title, title_justify="left")
    for name in ("system", "clients", "requests", "tokens/s", "p50 latency", "p95 latency", "p50 TTFT",
                 "vs in-process", "vs transformers serve", "errors"):  # fmt: skip
        table.add_column(name, justify="left" if name == "system" else "right")
    by_key = {(r.system, r.clients): r for r in rows}
    for row in rows:
        latencies = [r.latency for r in row.result.records]
        ttfts = [r.ttft for r in row.result.records]
        limit = by_key.get(("in-process generate", row.clients))
        other = by_key.get(("transformers serve", row.clients))
        table.add_row(
            row.system,
            str(row.clients),
            str(len(row.result.records)),
            f"{row.tps:.1f}",
            _ms(percentile(latencies, 0.5)),
            _ms(percentile(latencies, 0.95)),
            _ms(percentile(ttfts, 0.5)),
            f"{row.tps / limit.tps:.2f}×" if limit and limit.tps else "—",
            f"{row.tps / other.tps:.2f}×" if other and other.tps else "—",
            str(len(row.result.errors)),
        )
    console.print(table)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
