"""`vlmbridge explain [TEXT | -]`: match an error message or a whole traceback against the failure catalogue.

Exit codes: 0 = explained, 1 = unknown (not in the catalogue), 2 = usage (no text given).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.text import Text

from vlmbridge.catalogue import Match, explain
from vlmbridge.cli.console import err_console, out_console

__all__ = ["EXIT_UNKNOWN", "explain_command", "explanation_to_dict"]

EXIT_UNKNOWN = 1
SCHEMA = "vlmbridge.explain/1"
_MAX_INPUT = 4 * 1024 * 1024  # a traceback, not a log archive
_HINT = "run `vlmbridge doctor MODEL_DIR` to check the model folder itself"


def explanation_to_dict(matches: list[Match]) -> dict[str, Any]:
    from vlmbridge.doctor.codes import CODES

    return {
        "schema": SCHEMA,
        "known": bool(matches),
        "matches": [
            {
                "code": m.entry.code,
                "cause": m.entry.cause,
                "fix": m.entry.fix,
                "doctor_check": m.entry.doctor_check,
                "related_checks": list(m.entry.related),
                "doctor_title": CODES[m.entry.doctor_check].title if m.entry.doctor_check in CODES else None,
                "source": m.entry.source,
                "matched": m.matched,
            }
            for m in matches
        ],
        "hint": None if matches else f"unknown error: not in the catalogue; {_HINT}",
    }


def _usage(message: str) -> typer.Exit:
    err_console.print(f"usage error: {message}", style="bold red", markup=False)
    return typer.Exit(2)


def _read_input(text: str | None) -> str:
    if text is not None and text != "-":
        return text
    if text is None and sys.stdin.isatty():
        raise _usage("give the error text, or - to read it from stdin (vlmbridge explain - < traceback.txt)")
    return sys.stdin.read(_MAX_INPUT)


def explain_command(
    text: Annotated[
        str | None,
        typer.Argument(
            help="The error message or whole traceback; - (or nothing, with a pipe) reads stdin.", show_default=False
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the explanation as JSON.")] = False,
) -> None:
    """Explain an error: its cause, the fix, and the doctor check that finds it before loading.

    Exit code 0: explained; 1: unknown to the catalogue; 2: no text given.
    """
    body = _read_input(text)
    if not body.strip():
        raise _usage("the error text is empty")
    matches = explain(body)
    if json_output:
        out_console.print(json.dumps(explanation_to_dict(matches), indent=2, ensure_ascii=False), markup=False)
        raise typer.Exit(0 if matches else EXIT_UNKNOWN)
    if not matches:
        out_console.print(Text("unknown error: no catalogue entry matches this text", style="bold yellow"))
        out_console.print(f"  {_HINT}", markup=False)
        raise typer.Exit(EXIT_UNKNOWN)
    from vlmbridge.doctor.codes import CODES

    for i, m in enumerate(matches):
        style = "bold" if i == 0 else "dim bold"
        out_console.print(Text.assemble(("● ", "cyan"), (m.entry.code, style), ("  " + m.matched, "dim")))
        out_console.print(Text.assemble(("  cause: ", "bold"), m.entry.cause))
        out_console.print(Text.assemble(("  fix:   ", "bold green"), m.entry.fix))
        if m.entry.doctor_check:
            title = CODES[m.entry.doctor_check].title if m.entry.doctor_check in CODES else ""
            also = f" (also {', '.join(m.entry.related)})" if m.entry.related else ""
            out_console.print(
                Text.assemble(
                    ("  check: ", "bold"), f"{m.entry.doctor_check} {title}{also} — vlmbridge doctor MODEL_DIR"
                )
            )
        if m.entry.source:
            out_console.print(Text(f"  seen:  {m.entry.source}", style="dim"))
        if i == 0 and len(matches) > 1:
            out_console.print(Text("  also matches:", style="dim"))
    raise typer.Exit(0)
