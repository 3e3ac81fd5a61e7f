"""`vlmbridge plan MODEL_DIR`: what each way of loading needs, whether it fits, and which one to use."""

from __future__ import annotations

from typing import Annotated

import typer

from vlmbridge.cli.console import out_console
from vlmbridge.cli.doctor import (
    BatchOpt,
    ContextOpt,
    GpuMemoryOpt,
    ImagesOpt,
    MaxPixelsOpt,
    VideoSecondsOpt,
    VideosOpt,
    parse_memory_size,
)
from vlmbridge.cli.options import SettingFlags, setting_flags, settings_from

__all__ = ["plan"]


@setting_flags("device", "tensor_parallel_size", "pipeline_parallel_size")
def plan(
    model_dir: Annotated[
        str, typer.Argument(help="The model folder (the one holding config.json).", show_default=False)
    ],
    gpu_memory: GpuMemoryOpt = None,
    context: ContextOpt = None,
    images: ImagesOpt = 1,
    max_pixels: MaxPixelsOpt = None,
    batch: BatchOpt = 1,
    videos: VideosOpt = 0,
    video_seconds: VideoSecondsOpt = 10.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (schema: docs/plan.md).")] = False,
    *,
    flags: SettingFlags,
) -> None:
    """Plan the memory of a model before loading it: weights, KV cache, image tokens and activations for each
    loading option (as stored, bf16, fp16, bnb-8bit, bnb-4bit, or the checkpoint's own quantization), whether
    each fits the device (or --gpu-memory), and the best quality that fits, with the reason.

    Reads only config files and safetensors headers. Exit code 0: something fits; 1: nothing fits (or the
    memory is unknown); 2: usage. With --tensor-parallel-size/--pipeline-parallel-size (engine: vllm) each row is
    one GPU's share and fits against one GPU.
    """
    from vlmbridge.plan import PlanInputs, make_plan
    from vlmbridge.plan_render import render_json, render_rich

    budget = parse_memory_size(gpu_memory)
    settings = settings_from(**flags)
    inputs = PlanInputs(
        device=settings.device, gpu_memory=budget, context=context, images=images, max_pixels=max_pixels, batch=batch,
        videos=videos, video_seconds=video_seconds, tensor_parallel=settings.tensor_parallel_size,
        pipeline_parallel=settings.pipeline_parallel_size,
    )  # fmt: skip
    result = make_plan(model_dir, inputs)
    if json_output:
        out_console.print(render_json(result), markup=False, highlight=False, soft_wrap=True)
    else:
        render_rich(result, out_console)
    raise typer.Exit(0 if result.recommendation.row is not None else 1)
