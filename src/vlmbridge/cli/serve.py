"""`vlmbridge serve` (the OpenAI-compatible server) and `vlmbridge demo` (server + one image request)."""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vlmbridge.cli.console import err_console, out_console
from vlmbridge.cli.options import (
    AllowDequantizeOpt,
    AllowPickleOpt,
    DeviceOpt,
    DTypeOpt,
    MaxPixelsOpt,
    QuantizationOpt,
    TrustRemoteCodeOpt,
    settings_from,
)
from vlmbridge.errors import ModelFolderError
from vlmbridge.settings import Settings

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


def run_server(settings: Settings) -> None:
    from vlmbridge.server import create_app
    from vlmbridge.server.factory import build_slot, served_name
    from vlmbridge.server.runner import DrainingServer, uvicorn_config

    if settings.model is None:
        raise ModelFolderError("no model folder given", fix="vlmbridge serve /path/to/model (or set VLMBRIDGE_MODEL)")
    path = settings.model
    preflight(settings, path)
    if not _is_loopback(settings.host) and not settings.api_keys:
        err_console.print(
            f"WARNING: listening on {settings.host} without an API key — anyone who can reach this port can use "
            "the model. Set --api-key (or VLMBRIDGE_API_KEYS).",
            style="bold yellow on red",
        )
        log.warning("listening on %s without an API key", settings.host)
    slot = build_slot(settings, path)
    app = create_app(settings, slot)
    where = f"http://{settings.host}:{settings.port}/v1" if settings.port else f"{settings.host}, on a free port"
    err_console.print(
        f"serving {path} as {served_name(settings, path)!r} on {where} "
        "(model loading in the background; GET /health says when it is ready)",
        style="dim",
        markup=False,
    )
    config = uvicorn_config(app, settings.host, settings.port, log_level="info")
    DrainingServer(config, app.state.lifecycle, settings.shutdown_grace).run()


def serve(
    model_dir: Annotated[
        Path | None, typer.Argument(metavar="MODEL_DIR", help="Model folder. [env: VLMBRIDGE_MODEL]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind. [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port. [default: 8000]")] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients use. [default: folder name]")
    ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="Accepted API key. Repeatable. [env: VLMBRIDGE_API_KEYS]")
    ] = None,
    dtype: DTypeOpt = None,
    device: DeviceOpt = None,
    context: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    max_pixels: MaxPixelsOpt = None,
    max_images: Annotated[int | None, typer.Option(help="Most images per request. [default: 8]")] = None,
    allow_image_host: Annotated[
        list[str] | None, typer.Option(help="Host/IP/CIDR image URLs may use even if private. Repeatable.")
    ] = None,
    allow_local_dir: Annotated[
        list[Path] | None, typer.Option(help="Directory image_url may read files from. Repeatable. [default: none]")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Requests decoded together.")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Waiting requests before 429.")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds per request.")] = None,
    prefix_cache_mb: Annotated[
        int | None, typer.Option(help="MiB of KV cache kept for follow-up turns (0 = off). [default: 1024]")
    ] = None,
    encoder_cache_mb: Annotated[
        int | None, typer.Option(help="MiB of vision-encoder outputs kept (0 = off). [default: 256]")
    ] = None,
    skip_doctor: Annotated[bool | None, typer.Option("--skip-doctor", help="Start despite doctor errors.")] = None,
    stream_usage: Annotated[
        str | None,
        typer.Option(
            help="always: streams carry usage on their finish chunk even when the client did not ask (Dify's SDK "
            "needs it); requested: only with stream_options.include_usage. [default: always]"
        ),
    ] = None,
    shutdown_grace: Annotated[
        float | None, typer.Option(help="Seconds in-flight requests get to finish after SIGTERM. [default: 30]")
    ] = None,
    public_metrics: Annotated[
        bool | None, typer.Option("--public-metrics", help="Serve /metrics without the API key.")
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    allow_pickle_weights: AllowPickleOpt = None,
    quantization: QuantizationOpt = None,
    allow_dequantize: AllowDequantizeOpt = None,
) -> None:
    """Serve a model folder with an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health, /metrics)."""
    settings = settings_from(
        model=model_dir, host=host, port=port, served_model_name=served_model_name, api_keys=api_key, dtype=dtype,
        device=device, context_length=context, max_pixels=max_pixels, max_images=max_images,
        allow_image_hosts=allow_image_host, allow_local_dirs=allow_local_dir, max_batch_size=max_batch_size,
        max_queue=max_queue, request_timeout=request_timeout, skip_doctor=skip_doctor,
        prefix_cache_mb=prefix_cache_mb, encoder_cache_mb=encoder_cache_mb,
        trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights, quantization=quantization,
        allow_dequantize=allow_dequantize, stream_usage=stream_usage, shutdown_grace=shutdown_grace,
        public_metrics=public_metrics,
    )  # fmt: skip
    run_server(settings)


def demo(
    model_dir: Annotated[
        Path | None,
        typer.Argument(metavar="[MODEL_DIR]", help="A model folder to use instead of the built-in tiny demo model."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 24,
) -> None:
    """Start the server on the tiny demo model (built on first run), ask it about a picture with the openai client,
    print the answer and the usage, stop."""
    import base64

    from openai import OpenAI

    from vlmbridge.demo import demo_assets
    from vlmbridge.server import create_app
    from vlmbridge.server.factory import build_slot, served_name
    from vlmbridge.server.runner import ServerThread

    settings = Settings()
    folder, picture = demo_assets(settings.cache_dir, model_dir)
    preflight(settings, folder)
    slot = build_slot(settings, folder)
    name = served_name(settings, folder)
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
