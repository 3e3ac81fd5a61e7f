"""`vlmbridge serve` (the OpenAI-compatible server) and `vlmbridge demo` (server + one image request)."""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from vlmbridge.budget import format_bytes
from vlmbridge.cli.console import err_console, out_console
from vlmbridge.cli.options import RUN_SETTINGS, SettingFlags, env_var, setting_flags, settings_from
from vlmbridge.errors import ModelFolderError, ModelsFileError
from vlmbridge.settings import ModelSettings, ServerSettings, Settings

if TYPE_CHECKING:
    from vlmbridge.pool import EngineSlot, ModelPool

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def preflight(settings: Settings, path: Path) -> None:
    """Run the doctor before loading; refuse to start on errors unless --skip-doctor."""
    try:
        from vlmbridge.doctor import diagnose
        from vlmbridge.doctor.render import render_rich
    except ImportError:  # doctor not installed in this build
        return
    report = diagnose(path, settings=settings)
    if report.has_errors:
        render_rich(report, err_console)
        if not settings.skip_doctor:
            raise ModelFolderError(
                f"vlmbridge doctor found errors in {path}; not starting",
                fix="fix them (see above), or pass --skip-doctor to start anyway",
            )
        err_console.print("--skip-doctor: starting despite the errors above", style="yellow")


def run_server(settings: Settings, pairs: list[str] | None = None) -> None:
    """Serve one folder (`settings.model`), NAME=PATH `pairs`, or the models file (`settings.models_file`)."""
    from vlmbridge.server import create_app
    from vlmbridge.server.runner import DrainingServer, uvicorn_config

    if not _is_loopback(settings.host) and not settings.api_keys:
        err_console.print(
            f"WARNING: listening on {settings.host} without an API key — anyone who can reach this port can use "
            "the model. Set --api-key (or VLMBRIDGE_API_KEYS).",
            style="bold yellow on red",
        )
        log.warning("listening on %s without an API key", settings.host)
    models = _models(settings, pairs or [])
    app = create_app(settings, models)
    config = uvicorn_config(app, settings.host, settings.port, log_level="info")
    DrainingServer(config, app.state.lifecycle, settings.shutdown_grace).run()


def _models(settings: Settings, pairs: list[str]) -> EngineSlot | ModelPool:
    from vlmbridge.pool import read_models_file, specs_from_pairs
    from vlmbridge.server.factory import build_pool, build_slot

    where = f"http://{settings.host}:{settings.port}/v1" if settings.port else f"{settings.host}, on a free port"
    if settings.models_file is not None or pairs:
        if settings.models_file is not None and pairs:
            raise ModelsFileError("give either --models FILE or NAME=PATH arguments, not both")
        if settings.model is not None:
            raise ModelsFileError("a model folder and a models file (or NAME=PATH arguments) cannot be combined")
        specs = read_models_file(settings, settings.models_file) if settings.models_file else []
        pool = build_pool(settings, specs or specs_from_pairs(settings, pairs))
        names = ", ".join(f"{s.name} ({s.state})" for s in pool.slots.values())
        budget = format_bytes(pool.budget, binary=True) if pool.budget else "unbounded"
        err_console.print(
            f"serving {names} on {where}, memory budget {budget} (GET /health says when start-up models are ready)",
            style="dim",
            markup=False,
        )
        return pool
    if settings.model is None:
        raise ModelFolderError(
            "no model folder given",
            fix="vlmbridge serve /path/to/model, vlmbridge serve a=/models/x b=/models/y, or --models models.yaml",
        )
    path = settings.model
    preflight(settings, path)
    err_console.print(
        f"serving {path} as {settings.served_name(path)!r} on {where} "
        "(model loading in the background; GET /health says when it is ready)",
        style="dim",
        markup=False,
    )
    return build_slot(settings, path)


SERVE_SETTINGS = tuple(name for name in (*ServerSettings.model_fields, *ModelSettings.model_fields) if name != "model")


@setting_flags(*SERVE_SETTINGS)
def serve(
    model_dir: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODEL_DIR | NAME=PATH",
            help=escape(f"A model folder, or NAME=PATH pairs (loaded on first request). [env: {env_var('model')}]"),
            show_default=False,
        ),
    ] = None,
    *,
    flags: SettingFlags,
) -> None:
    """Serve models with an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health, /metrics): one folder,
    NAME=PATH pairs, or a models file (--models)."""
    given = model_dir or []
    if len(given) == 1 and "=" not in given[0]:
        run_server(settings_from(model=Path(given[0]), **flags))
    elif given:
        run_server(settings_from(**flags), given)
    else:
        run_server(settings_from(**flags))


@setting_flags(*RUN_SETTINGS, "skip_doctor", "cache_dir")
def demo(
    model_dir: Annotated[
        Path | None,
        typer.Argument(metavar="[MODEL_DIR]", help="A model folder to use instead of the built-in tiny demo model."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 24,
    *,
    flags: SettingFlags,
) -> None:
    """Start the server on the tiny demo model (built on first run), ask it about a picture with the openai client,
    print the answer and the usage, stop."""
    import base64

    from openai import OpenAI

    from vlmbridge.demo import demo_assets
    from vlmbridge.server import create_app
    from vlmbridge.server.factory import build_slot
    from vlmbridge.server.runner import ServerThread

    settings = settings_from(**flags)
    folder, picture = demo_assets(settings.cache_dir, model_dir)
    preflight(settings, folder)
    slot = build_slot(settings, folder)
    name = settings.served_name(folder)
    started = time.perf_counter()
    with ServerThread(create_app(settings, slot)) as base_url:
        with err_console.status(f"loading {folder.name} behind {base_url}/v1 …"):
            slot.wait_loaded()
        if slot.state != "ready":
            raise ModelFolderError(f"the model did not load: {slot.reason}")
        err_console.print(f"server ready at {base_url}/v1 in {time.perf_counter() - started:.1f}s", style="dim")
        client = OpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0)
        data_url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        out_console.print(f"[bold]user:[/] {escape(f'[image {picture.name}]')} What is in this picture?")
        out_console.print("[bold]assistant:[/] ", end="")
        usage = None
        stream = client.chat.completions.create(
            model=name,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url, "detail": "high"}},
                        {"type": "text", "text": "What is in this picture?"},
                    ],
                }
            ],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for event in stream:
            if event.choices and event.choices[0].delta.content:
                out_console.print(event.choices[0].delta.content, end="", markup=False, highlight=False)
            if event.usage is not None:
                usage = event.usage
        out_console.print()
    if usage is not None:
        details = usage.prompt_tokens_details
        image_tokens = getattr(details, "image_tokens", None) if details else None
        out_console.print(
            f"usage: {usage.prompt_tokens} prompt tokens ({image_tokens} of them the picture), "
            f"{usage.completion_tokens} completion tokens",
            style="dim",
        )
    if model_dir is None:
        out_console.print(
            "(the built-in demo model has random weights: its words are noise, but the image tokens above reached "
            "it — run `./vb demo /path/to/Qwen3-VL-8B-Instruct` for a real answer)",
            style="dim",
        )
