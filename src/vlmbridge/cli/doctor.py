"""`vlmbridge doctor MODEL_DIR`: diagnose a model folder before loading it. Exit 0 loadable, 1 errors, 2 usage."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from vlmbridge.cli.console import err_console, out_console
from vlmbridge.cli.options import SettingFlags, setting_flags, settings_from

__all__ = [
    "BatchOpt",
    "ContextOpt",
    "GpuMemoryOpt",
    "ImagesOpt",
    "MaxPixelsOpt",
    "VideoSecondsOpt",
    "VideosOpt",
    "doctor",
    "parse_memory_size",
]

GpuMemoryOpt = Annotated[
    str | None,
    typer.Option("--gpu-memory", help="Memory budget instead of the device's free memory, e.g. 16GiB, 24GB, 80000MiB."),
]
ContextOpt = Annotated[
    int | None,
    typer.Option(
        "--context", min=16, max=1 << 21, help=escape("Tokens per sequence. [default: min(model maximum, 32768)]")
    ),
]
ImagesOpt = Annotated[int, typer.Option("--images", min=0, max=256, help="Images per sequence (1920×1080 each).")]
BatchOpt = Annotated[int, typer.Option("--batch", min=1, max=4096, help="Sequences held at once.")]
VideosOpt = Annotated[
    int,
    typer.Option("--videos", min=0, max=32, help="Video clips per sequence (1280×720, sampled at 2 fps, ≤ 32 frames)."),
]
VideoSecondsOpt = Annotated[
    float, typer.Option("--video-seconds", min=0.1, max=86400, help="Length of each video clip in seconds.")
]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-pixels", help=escape("Pixel budget per image (H×W after resize). [default: the processor's own]")
    ),
]


def parse_memory_size(value: str | None) -> int | None:
    from vlmbridge.memory import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        # Our own usage error: exit 2 directly (typer.Exit passes through the entry point unchanged).
        err_console.print(f"usage error: --gpu-memory: {exc}", style="bold red", markup=False)
        raise typer.Exit(2) from None


@setting_flags("device", "dtype")
def doctor(
    model_dir: Annotated[
        str, typer.Argument(help="The model folder (the one holding config.json).", show_default=False)
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (schema: docs/doctor.md).")
    ] = False,
    gpu_memory: GpuMemoryOpt = None,
    context: ContextOpt = None,
    images: ImagesOpt = 1,
    max_pixels: MaxPixelsOpt = None,
    batch: BatchOpt = 1,
    videos: VideosOpt = 0,
    video_seconds: VideoSecondsOpt = 10.0,
    *,
    flags: SettingFlags,
) -> None:
    """Check a model folder from its small files and safetensors headers — no weights loaded, no network.

    Reports missing/truncated files, version and class problems, remote code, missing packages and whether it
    fits in memory, each with the exact fix. Exit code 0: loadable (warnings allowed); 1: errors; 2: usage.
    """
    from vlmbridge.doctor import DoctorOptions, diagnose
    from vlmbridge.doctor.render import render_json, render_rich

    budget = parse_memory_size(gpu_memory)
    settings = settings_from(**flags)
    options = DoctorOptions(
        device=settings.device,
        gpu_memory=budget,
        dtype=settings.dtype,
        context=context or settings.context_length,
        images=images,
        max_pixels=max_pixels,
        batch=batch,
        videos=videos,
        video_seconds=video_seconds,
        attn_implementation=settings.attn_implementation,
        allow_pickle_weights=settings.allow_pickle_weights,
        trust_remote_code=settings.trust_remote_code,
    )
    report = diagnose(model_dir, options)
    if json_output:
        out_console.print(render_json(report), markup=False, highlight=False)
    else:
        render_rich(report, out_console)
    raise typer.Exit(report.exit_code)
