"""Terminal output helpers shared by the commands: one console, one way to print errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console

from vlmbridge.errors import VlmbridgeError

__all__ = ["err_console", "out_console", "print_error", "stage_printer"]

out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(exc: BaseException) -> None:
    """One red line: the message and, when known, the exact fix."""
    if isinstance(exc, VlmbridgeError):
        text = exc.message + (f" — fix: {exc.fix}" if exc.fix else "")
    else:
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    err_console.print(f"error: {text}", style="bold red", markup=False)


def stage_printer(prefix: str = "") -> Callable[[str], None]:
    def say(stage: str) -> None:
        if sys.stderr.isatty():
            err_console.print(f"{prefix}→ {stage}", style="dim", markup=False)

    return say
