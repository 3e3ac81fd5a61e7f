"""`vlmbridge` entry point: registers the commands and turns typed errors into one red line and an exit code."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import typer
from pydantic import ValidationError

from vlmbridge.cli.console import err_console, print_error
from vlmbridge.errors import InvalidRequestError, VlmbridgeError

__all__ = ["app", "main"]

app = typer.Typer(
    name="vlmbridge",
    help="Load, diagnose and serve vision-language models (Qwen-VL first) the right way.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from vlmbridge.cli import bench, chat, doctor, explain, plan, quantize, serve, tiny

    app.command("demo")(serve.demo)
    app.command("serve")(serve.serve)
    app.command("chat")(chat.chat)
    app.command("tiny-model")(tiny.tiny_model)
    app.command("doctor")(doctor.doctor)
    app.command("explain")(explain.explain_command)
    app.command("plan")(plan.plan)
    app.command("quantize")(quantize.quantize)
    app.command("bench")(bench.bench)
    from vlmbridge.cli.dify import app as dify_app
    from vlmbridge.cli.models import app as models_app

    app.add_typer(dify_app, name="dify")
    app.add_typer(models_app, name="models")


_register()


def main(argv: list[str] | None = None) -> Any:
    level = os.environ.get("VLMBRIDGE_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    try:
        return app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted", style="red")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted", style="red")
        sys.exit(130)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        print_error(InvalidRequestError(f"invalid setting {where}: {first.get('msg')}"))
        sys.exit(2)
    except VlmbridgeError as exc:
        print_error(exc)
        sys.exit(1)
    except Exception as exc:  # usage errors (click's, or typer's bundled copy) and anything unexpected
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        if os.environ.get("VLMBRIDGE_DEBUG"):
            raise
        print_error(exc)
        err_console.print("(unexpected error; set VLMBRIDGE_DEBUG=1 for the traceback)", style="dim")
        sys.exit(1)
