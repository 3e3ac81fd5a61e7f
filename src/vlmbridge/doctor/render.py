"""The two renderers of a doctor Report: rich for terminals (grouped, coloured, a verdict line) and JSON.

The JSON shape is documented in docs/doctor.md; bump SCHEMA when it changes incompatibly.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmbridge.doctor.codes import CODES
from vlmbridge.doctor.findings import Area, Finding, Report, Severity
from vlmbridge.memory import format_bytes

__all__ = ["SCHEMA", "render_json", "render_rich", "report_to_dict"]

SCHEMA = "vlmbridge.doctor/1"
_AREA_TITLES = {
    Area.ENVIRONMENT: "Environment",
    Area.FILES: "Files & integrity",
    Area.TOKENIZER: "Tokenizer & chat template",
    Area.PROCESSOR: "Image & video processor",
    Area.ARCHITECTURE: "Architecture & versions",
    Area.REMOTE_CODE: "Remote code",
    Area.DEPENDENCIES: "Dependencies",
    Area.MEMORY: "Memory",
    Area.DOCTOR: "Doctor",
}
_STYLE = {Severity.ERROR: ("✗", "bold red"), Severity.WARNING: ("!", "yellow"), Severity.INFO: ("·", "cyan")}


def report_to_dict(report: Report) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "path": str(report.path),
        "verdict": report.verdict,
        "loadable": report.loadable,
        "exit_code": report.exit_code,
        "counts": {str(s): len(report.by_severity(s)) for s in Severity},
        "facts": dict(report.facts),
        "findings": [f.to_dict() for f in report.findings],
        "elapsed_s": round(report.elapsed_s, 4),
    }


def render_json(report: Report) -> str:
    return json.dumps(report_to_dict(report), indent=2, ensure_ascii=False, default=str)


def _finding_lines(f: Finding) -> list[Text]:
    icon, style = _STYLE[f.severity]
    head = Text.assemble(("  " + icon + " ", style), (f.code, "bold " + style), " ", f.message)
    lines = [head]
    if f.fix:
        lines.append(Text.assemble(("      fix: ", "green"), (f.fix, "")))
    if f.evidence and (f.evidence.file or f.evidence.value) and f.severity != Severity.INFO:
        where = " = ".join(p for p in (f.evidence.file, f.evidence.value) if p)
        lines.append(Text("      seen: " + where, style="dim"))
    return lines


def _options_table(memory: dict[str, Any]) -> Table | None:
    options = memory.get("options") or []
    if not options:
        return None
    table = Table(
        title="loading options (best quality first)",
        title_justify="left",
        title_style="dim",
        box=None,
        padding=(0, 1),
        show_edge=False,
        header_style="dim",
        pad_edge=False,
    )
    for col in ("option", "weights", "KV cache", "activations", "overhead", "total", "fits"):
        table.add_column(col, justify="left" if col == "option" else "right", no_wrap=True)
    for e in options:
        fits = {True: "[green]yes[/]", False: "[red]no[/]", None: "?"}[e.get("fits")]
        table.add_row(
            str(e["option"]),
            format_bytes(e["weights"]),
            format_bytes(e["kv_cache"]),
            format_bytes(e["lm_activations"] + e["vision_activations"]),
            format_bytes(e["overhead"]),
            format_bytes(e["total"]),
            fits,
        )
    return table


def render_rich(report: Report, console: Console, *, verbose: bool = True) -> None:
    """Findings grouped by area (errors first within each), the memory options table, then the verdict."""
    facts = report.facts
    console.print(Text.assemble(("vlmbridge doctor ", "bold"), (str(report.path), "bold")))
    summary = [
        p for p in (facts.get("family") or facts.get("model_type"), facts.get("kind"), facts.get("auto_class")) if p
    ]
    if facts.get("transformers"):
        summary.append(f"transformers {facts['transformers']}")
    if summary:
        console.print("  " + " · ".join(str(s) for s in summary), style="dim", markup=False)
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    for area, area_title in _AREA_TITLES.items():
        items = [f for f in report.findings if f.area == area and (verbose or f.severity != Severity.INFO)]
        if not items:
            continue
        console.print()
        console.print(Text(area_title, style="bold underline"))
        for f in sorted(items, key=lambda f: order[f.severity]):
            for line in _finding_lines(f):
                console.print(line)
        if area == Area.MEMORY and verbose and isinstance(facts.get("memory"), dict):
            table = _options_table(facts["memory"])
            if table is not None:
                console.print()
                console.print(table)
                for option in facts["memory"].get("options") or []:
                    if option.get("note"):
                        console.print(f"  {option['option']}: {option['note']}", style="dim", markup=False)
    console.print()
    errors, warnings = len(report.errors), len(report.warnings)
    counts = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    if report.loadable:
        style = "bold green" if not warnings else "bold yellow"
        console.print(Text(f"✓ loadable — {counts} ({report.elapsed_s:.2f}s)", style=style))
    else:
        first = report.errors[0]
        title = CODES[first.code].title if first.code in CODES else first.message
        console.print(Text(f"✗ not loadable — {counts}; first: {first.code} {title}", style="bold red"))
