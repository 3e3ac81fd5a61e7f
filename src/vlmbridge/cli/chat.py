"""`vlmbridge chat`: one answer from a model folder, streamed to the terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from vlmbridge.cli.console import err_console, out_console, stage_printer
from vlmbridge.cli.options import RUN_SETTINGS, SettingFlags, setting_flags, settings_from
from vlmbridge.errors import ImageInputError, VideoInputError
from vlmbridge.media.decode import DecodedImage, decode_image
from vlmbridge.media.video import DecodedVideo
from vlmbridge.settings import Settings

VIDEO_SETTINGS = ("video_fps", "video_max_frames", "video_max_pixels", "max_video_bytes", "max_video_seconds")

MAX_IMAGE_FILE_BYTES = 50 * 1024 * 1024


def _read_image(path: Path, index: int) -> DecodedImage:
    param = f"--image #{index + 1}"
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_FILE_BYTES:
            raise ImageInputError(f"{path} is {size} bytes, more than {MAX_IMAGE_FILE_BYTES}", param=param)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageInputError(f"image {path} does not exist", param=param) from None
    except IsADirectoryError:
        raise ImageInputError(f"image {path} is a folder, not a file", param=param) from None
    except PermissionError:
        raise ImageInputError(f"no permission to read image {path}", param=param) from None
    try:
        return decode_image(data, param=param)
    except ImageInputError as exc:
        raise ImageInputError(f"{path}: {exc.message}", param=param) from None


def _read_video(path: Path, index: int, settings: Settings) -> DecodedVideo:
    from vlmbridge.media.video import probe_video
    from vlmbridge.media.video_sources import video_limits

    param = f"--video #{index + 1}"
    limit = settings.max_video_bytes
    try:
        size = path.stat().st_size
        if size > limit:
            raise VideoInputError(f"{path} is {size} bytes, more than {limit} (--max-video-bytes)", param=param)
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise VideoInputError(f"cannot read video {path}: {exc.strerror}", param=param) from None
    try:
        return probe_video(data, param=param, limits=video_limits(settings))
    except VideoInputError as exc:
        raise VideoInputError(f"{path}: {exc.message}", param=param) from None


def run_chat(
    settings: Settings,
    model_dir: Path,
    prompt: str,
    images: list[Path],
    *,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    videos: list[Path] | None = None,
) -> None:
    from vlmbridge.engine.factory import build_engine
    from vlmbridge.engine.types import (
        ChatMessage,
        GenerationRequest,
        ImagePart,
        PixelBudget,
        SamplingParams,
        TextPart,
        VideoPart,
    )
    from vlmbridge.media.video import VideoSampling
    from vlmbridge.output.client import ModelClient, load_text_tools

    decoded = [_read_image(p, i) for i, p in enumerate(images)]  # fail on a bad image before loading
    clips = [_read_video(p, i, settings) for i, p in enumerate(videos or [])]
    model = settings.model_settings().model_copy(update={"engine_worker": "thread"})  # one answer: no worker
    tools = load_text_tools(model_dir, model.trust_remote_code)
    engine = build_engine(model, model_dir, model.served_name(model_dir), progress=stage_printer())
    engine.start(warm_up=False)
    client = ModelClient(engine, tools)
    budget = PixelBudget(max_pixels=settings.max_pixels, min_pixels=settings.min_pixels)
    sampling = VideoSampling(settings.video_fps, settings.video_max_frames, settings.video_max_pixels)
    frame_budget = PixelBudget(max_pixels=settings.video_max_pixels, min_pixels=settings.min_pixels)
    parts: tuple[ImagePart | VideoPart | TextPart, ...] = (
        *(ImagePart(d, budget) for d in decoded),
        *(VideoPart(c, sampling, frame_budget) for c in clips),
        TextPart(prompt),
    )
    messages = (*((ChatMessage("system", system),) if system else ()), ChatMessage("user", parts))
    request = GenerationRequest(
        request_id="chat",
        messages=messages,
        sampling=SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed),
        max_tokens_explicit=max_tokens is not None,
    )
    started = time.perf_counter()
    first: float | None = None
    try:
        for chunk in client.generate(request):
            if chunk.error is not None:
                raise chunk.error
            if first is None:
                first = time.perf_counter()
            if chunk.reasoning:
                out_console.print(chunk.reasoning, end="", style="dim italic", markup=False)
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            if chunk.finish_reason is not None and chunk.usage is not None:
                elapsed = time.perf_counter() - started
                u = chunk.usage
                sys.stdout.write("\n")
                err_console.print(
                    f"[{engine.info.model_class} · {u.prompt_tokens} prompt tokens ({u.image_tokens} image"
                    f"{f', {u.video_tokens} video' if clips else ''}) · "
                    f"{u.completion_tokens} tokens in {elapsed:.2f}s "
                    f"({u.completion_tokens / max(elapsed, 1e-9):.1f} tok/s) "
                    f"· first token {((first or started) - started) * 1000:.0f} ms · finish: {chunk.finish_reason}]",
                    style="dim",
                    markup=False,
                )
    finally:
        engine.shutdown()


@setting_flags(*RUN_SETTINGS, *VIDEO_SETTINGS)
def chat(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL", help="Model folder (the one holding config.json).")],
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    image: Annotated[
        list[Path] | None, typer.Option("--image", "-i", help="Image file to show the model. Repeatable.")
    ] = None,
    video: Annotated[
        list[Path] | None,
        typer.Option("--video", help="Video file (MP4/MOV, WebM/MKV) to show the model. Repeatable."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Most tokens to generate.")] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0.0, max=2.0, help="0 = greedy; default from generation_config.json.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    *,
    flags: SettingFlags,
) -> None:
    """One answer from a model folder, streamed to the terminal — the quickest proof the model sees the image."""
    settings = settings_from(model=model_dir, **flags)
    run_chat(
        settings, model_dir, prompt, list(image or []), system=system, max_tokens=max_tokens, temperature=temperature,
        seed=seed, videos=list(video or []),
    )  # fmt: skip
