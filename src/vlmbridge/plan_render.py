"""The two renderers of a Plan: a rich table for terminals and JSON (schema in docs/plan.md)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmbridge.memory import format_bytes
from vlmbridge.plan import Plan

__all__ = ["render_json", "render_rich"]


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, ensure_ascii=False)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f}"


def _exact_gib(n: int) -> str:
    # 1.125 GiB, not 1.12: the facts file quotes the KV cache to the byte.
    if n < 1024**3:
        return format_bytes(n, binary=True)
    return f"{n / 1024**3:.3f}".rstrip("0").rstrip(".") + " GiB"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _header(plan: Plan) -> list[str]:
    ck, w = plan.checkpoint, plan.workload
    stats, first = ck.stats, plan.rows[0].estimate
    lines = [
        f"{ck.folder.path.name} ({ck.folder.model_type or '?'}): {_count(stats.params)} parameters, "
        f"{format_bytes(stats.stored_bytes)} as stored ({stats.stored_float or 'quantized'})"
    ]
    if ck.pre is not None:
        needs = ", ".join(pip for _, pip in ck.pre.needs) or "nothing extra"
        missing = f"; missing: {', '.join(ck.pre.missing)}" if ck.pre.missing else ""
        lines.append(f"pre-quantized: {ck.pre.method}, {ck.pre.scheme} (needs {needs}{missing})")
        if plan.runtime is not None:
            lines.append(f"here: {plan.runtime.reason}")
    images = ""
    if w.images and ck.geometry.vision is not None:
        cap = f", ≤ {w.max_pixels} pixels" if w.max_pixels else ""
        images = (
            f", {w.images} image(s) of {w.image_size[0]}×{w.image_size[1]}{cap} → {first.image_tokens} image "
            "tokens each"
        )
    if w.videos and ck.geometry.vision is not None:
        images += (
            f", {w.videos} clip(s) of {w.video_seconds:g} s → {w.video_frames} frames → {first.video_tokens} video "
            "tokens each"
        )
    lines.append(f"workload: {w.context} tokens × batch {w.batch}{images}")
    lines.append(
        f"KV cache: {format_bytes(first.kv_per_token, binary=True)} per token ({first.compute_dtype}) → "
        f"{_exact_gib(first.kv_cache)} for {w.context} tokens × batch {w.batch}"
    )
    b = plan.budget
    if b.free is None:
        lines.append(f"budget: unknown ({b.name}: {b.detail})")
    elif b.kind == "given":
        lines.append(f"budget: {format_bytes(b.free, binary=True)} (--gpu-memory, {plan.device_kind})")
    else:
        cc = f", compute capability {b.compute_capability[0]}.{b.compute_capability[1]}" if b.compute_capability else ""
        lines.append(f"budget: {format_bytes(b.free, binary=True)} free on {b.name} ({b.detail}{cc})")
    return lines


def _table(plan: Plan) -> Table:
    table = Table(title="loading options (sizes in GiB)", title_justify="left", show_edge=False, pad_edge=False)
    names = (
        "option",
        "compute",
        "weights",
        "KV cache",
        "img tokens",
        "vision act.",
        "LM act.",
        "overhead",
        "total",
        "fits",
    )
    for name in names:
        table.add_column(name, justify="left" if name in ("option", "compute", "fits") else "right")
    best = plan.recommendation.row
    for row in plan.rows:
        e = row.estimate
        fits = "?" if e.fits is None else "yes" if e.fits else "no"
        fits_text = Text(fits, style="green" if e.fits else "red" if e.fits is False else "")
        if not row.available:
            fits_text.append(" (n/a)", style="dim")
        label = Text(("→ " if row is best else "  ") + row.label, style="bold" if row is best else "")
        table.add_row(
            label,
            e.compute_dtype,
            _gib(e.weights),
            _gib(e.kv_cache),
            str(e.image_tokens * plan.workload.images * plan.workload.batch),
            _gib(e.vision_activations),
            _gib(e.lm_activations),
            _gib(e.overhead),
            _gib(e.total),
            fits_text,
        )
    return table


def render_rich(plan: Plan, console: Console) -> None:
    for line in _header(plan):
        console.print(line, markup=False, highlight=False)
    console.print()
    console.print(_table(plan))
    for row in plan.rows:
        if row.blocker:
            console.print(Text.assemble(("  n/a ", "dim"), (row.label, "dim bold"), (f": {row.blocker}", "dim")))
    for note in dict.fromkeys(r.estimate.note for r in plan.rows if r.estimate.note and r.available):
        console.print(Text.assemble(("  note ", "dim"), (note, "dim")))
    console.print()
    rec = plan.recommendation
    if rec.row is None:
        console.print(Text.assemble(("no recommendation: ", "bold red"), rec.reason))
        return
    flags = " ".join(rec.row.flags)
    command = f"vlmbridge serve {plan.checkpoint.folder.path}" + (f" {flags}" if flags else "")
    console.print(Text.assemble(("recommended: ", "bold green"), (rec.row.label, "bold"), "  ", (command, "cyan")))
    console.print(Text.assemble(("why: ", "dim"), rec.reason))
