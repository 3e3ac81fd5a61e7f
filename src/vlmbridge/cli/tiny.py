"""`vlmbridge tiny-model`: build a tiny real checkpoint for tests, demos and benchmarks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, cast

import typer

from vlmbridge.cli.console import out_console
from vlmbridge.errors import ModelFolderError


def tiny_model(
    out: Annotated[Path, typer.Argument(help="Folder to write (must not exist, or be empty).")],
    family: Annotated[
        str, typer.Option(help="qwen3_vl, qwen3_vl_moe, qwen2_5_vl, qwen2_vl or qwen2 (text-only).")
    ] = "qwen3_vl",
    size: Annotated[
        str,
        typer.Option(
            help="tiny (~0.3M params), tiny-vllm (tiny with 32-dim heads, which vLLM's CPU attention accepts) "
            "or small (~30M params, for benchmarks)."
        ),
    ] = "tiny",
    shards: Annotated[int, typer.Option(min=1, max=64, help="Number of safetensors shards.")] = 1,
    layout: Annotated[
        str,
        typer.Option(help="official (the public repo's file set) or transformers (what save_pretrained writes)."),
    ] = "official",
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty folder.")] = False,
    thinking: Annotated[
        bool, typer.Option(help="Qwen3-VL Thinking chat template (answers open with <think>).")
    ] = False,
) -> None:
    """Build a tiny checkpoint with a real architecture, tokenizer, processor and chat template (no download)."""
    from vlmbridge.tiny.builder import FAMILY_NAMES, SIZES, Layout, Size, build_tiny_model

    size_name = cast(Size, size)
    layout_name = cast(Layout, layout)
    if family not in FAMILY_NAMES:
        raise ModelFolderError(f"unknown family {family!r}", fix=f"use one of: {', '.join(FAMILY_NAMES)}")
    if size not in SIZES:
        raise ModelFolderError(f"unknown size {size!r}", fix=f"use --size {' or '.join(SIZES)}")
    if layout not in ("official", "transformers"):
        raise ModelFolderError(f"unknown layout {layout!r}", fix="use --layout official or --layout transformers")
    if out.exists() and not out.is_dir():
        raise ModelFolderError(f"{out} is a file", fix="choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelFolderError(f"{out} is not empty", fix="choose another folder or pass --overwrite")
    started = time.perf_counter()
    with out_console.status(f"building {size} {family} ({layout} layout)…"):
        path = build_tiny_model(
            out,
            family,
            size=size_name,
            shards=shards,
            layout=layout_name,
            seed=seed,
            overwrite=overwrite,
            variant="thinking" if thinking else "instruct",
        )
    files = sorted(p.name for p in path.iterdir())
    out_console.print(
        f"[green]✓[/] {family} ({size}, {layout}) written to {path} in {time.perf_counter() - started:.1f}s"
    )
    out_console.print(f"  files: {', '.join(files)}", style="dim")
