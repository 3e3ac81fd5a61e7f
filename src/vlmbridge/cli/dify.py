"""`vlmbridge dify package | config | template`: connect a vlmbridge server to Dify (logic: vlmbridge.integrations)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlmbridge.cli.console import err_console, out_console

if TYPE_CHECKING:
    from vlmbridge.integrations.dify_recipe import ModelFacts

__all__ = ["app"]

app = typer.Typer(
    name="dify",
    help="Connect vlmbridge to Dify: build the provider plugin, print the built-in provider's settings, write apps.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("package")
def package(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File (or folder) to write. [default: ./vlmbridge-<version>.difypkg]"),
    ] = None,
) -> None:
    """Build the vlmbridge model-provider plugin as an installable .difypkg (a zip of integrations/dify)."""
    from vlmbridge.integrations.dify import build_package, plugin_dir

    folder = plugin_dir()
    target = build_package(out, folder)
    out_console.print(str(target), markup=False)
    err_console.print(
        f"built from {folder}. Install: Dify → Plugins → Install plugin → Local package file. Self-hosted Dify "
        "accepts unsigned packages only with FORCE_VERIFYING_SIGNATURE=false in docker/.env.",
        style="dim",
        markup=False,
    )


@app.command("config")
def config(
    base_url: Annotated[
        str | None,
        typer.Option(
            help="The server's URL as Dify's plugin_daemon container sees it. [default: http://vlmbridge:8000/v1]"
        ),
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Model folder, for the model name and context size. [env: VLMBRIDGE_MODEL]")
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(help="Ask a running server (reachable from here) instead, e.g. http://127.0.0.1:8000/v1."),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="The API key to fill in. [default: a placeholder]")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="The name the server uses for the model.")] = None,
    context: Annotated[int | None, typer.Option(min=16, help="The server's --context, if you set one.")] = None,
    models_file: Annotated[
        Path | None,
        typer.Option("--models", help="A models file: one provider entry per model. [env: VLMBRIDGE_MODELS_FILE]"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the values as JSON.")] = False,
) -> None:
    """Print the field values for Dify's built-in "OpenAI-API-compatible" provider — one entry per model the server
    serves — and how Dify reaches vlmbridge."""
    from vlmbridge.integrations.dify_recipe import DEFAULT_BASE_URL, recipe

    every = _facts(model_dir, server, api_key, served_model_name, context, models_file)
    results = [recipe(base_url or DEFAULT_BASE_URL, facts, api_key) for facts in every]
    if json_output:
        dicts = [r.as_dict() for r in results]
        payload = dicts[0] if len(dicts) == 1 else {"models": dicts}  # one model: the shape it always had
        out_console.print(json.dumps(payload, indent=2), markup=False, highlight=False)
        return
    for warning in dict.fromkeys(w for r in results for w in r.warnings):
        err_console.print(f"warning: {warning}", style="bold yellow", markup=False)
    for index, result in enumerate(results, 1):
        which = f" (model {index} of {len(results)})" if len(results) > 1 else ""
        out_console.print(
            f"Dify → Settings → Model Provider → OpenAI-API-compatible → Add Model{which}, with these values:",
            style="bold",
        )
        width = max(len(f.label) for f in result.fields)
        for f in result.fields:
            note = f"   ({f.note})" if f.note else ""
            out_console.print(f"  {f.label.ljust(width)}  {f.value}{note}", markup=False)
        out_console.print()
    out_console.print("Network:", style="bold")
    for line in results[0].advice:
        out_console.print(f"  - {line}", markup=False)


def _facts(
    model_dir: Path | None,
    server: str | None,
    api_key: str | None,
    served_name: str | None,
    context: int | None,
    models_file: Path | None = None,
) -> list[ModelFacts]:
    """From a models file or the model folder if there is one, else from a running server (every model it lists),
    else from the flags alone."""
    import httpx

    from vlmbridge.integrations.dify_recipe import (
        ModelFacts,
        facts_from_folder,
        facts_from_models_file,
        models_from_server,
    )

    if models_file is None and model_dir is None and server is None and os.environ.get("VLMBRIDGE_MODELS_FILE"):
        models_file = Path(os.environ["VLMBRIDGE_MODELS_FILE"])
    if models_file is not None:
        return facts_from_models_file(models_file)
    if model_dir is None and server is None and os.environ.get("VLMBRIDGE_MODEL"):
        model_dir = Path(os.environ["VLMBRIDGE_MODEL"])
    if model_dir is not None:
        return [facts_from_folder(model_dir, served_name=served_name, context=context)]
    # No folder: a server on this machine's default port often is the one Dify will use.
    url = server or f"http://127.0.0.1:{os.environ.get('VLMBRIDGE_PORT', '8000')}/v1"
    try:
        listed = models_from_server(url, api_key)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        if server is not None:
            err_console.print(f"warning: could not ask {url}: {exc}", style="bold yellow", markup=False)
        return [ModelFacts(name=served_name, context=context, vision=None, source="command line")]
    if len(listed) == 1:
        facts = listed[0]
        return [ModelFacts(served_name or facts.name, context or facts.context, facts.vision, facts.source)]
    return listed


@app.command("template")
def template(
    name: Annotated[str, typer.Argument(help="Template name; `vlmbridge dify template list` shows them.")],
    model: Annotated[str | None, typer.Option(help="The model name Dify knows the model by.")] = None,
    provider: Annotated[
        str, typer.Option(help="vlmbridge (the plugin), openai_api_compatible (built-in), or <author>/<plugin>/<name>.")
    ] = "vlmbridge",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write. [default: stdout]")] = None,
) -> None:
    """Write an importable Dify app (DSL YAML) with your provider and model filled in."""
    from vlmbridge.errors import InvalidRequestError
    from vlmbridge.integrations.dify import render_template, templates

    if name == "list":
        for t in templates():
            out_console.print(f"{t.name.ljust(26)} {t.title}", markup=False)
        return
    if not model:
        raise InvalidRequestError("--model is required: the model name as Dify knows it", param="model")
    text = render_template(name, model, provider)
    if out is None:
        out_console.print(text, markup=False, highlight=False, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    err_console.print(f"wrote {out}: import it in Dify → Studio → Import DSL file", style="dim", markup=False)
