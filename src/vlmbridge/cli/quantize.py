"""`vlmbridge quantize MODEL_DIR OUT --method bnb-4bit|bnb-8bit`: a quantized copy that loads without re-quantizing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlmbridge.cli.console import out_console, stage_printer
from vlmbridge.cli.options import SettingFlags, setting_flags, settings_from
from vlmbridge.errors import QuantizationError

__all__ = ["quantize"]


@setting_flags("device", "trust_remote_code")
def quantize(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="The bf16/fp32 model folder.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the quantized copy to.")],
    method: Annotated[str, typer.Option("--method", help="bnb-4bit (nf4) or bnb-8bit (int8).")] = "bnb-4bit",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it is not empty.")] = False,
    *,
    flags: SettingFlags,
) -> None:
    """Quantize with bitsandbytes once and save the result, so a production box loads the small copy directly
    (`vlmbridge serve OUT` needs no --quantization). Runs on a CUDA GPU, or on the CPU where bitsandbytes has
    its CPU backend."""
    from vlmbridge.memory import format_bytes
    from vlmbridge.quant.convert import quantize_checkpoint

    if method not in ("bnb-4bit", "bnb-8bit"):
        raise QuantizationError(f"unknown method {method!r}", fix="use --method bnb-4bit or --method bnb-8bit")
    settings = settings_from(**flags)
    result = quantize_checkpoint(
        model_dir,
        out,
        "bnb-4bit" if method == "bnb-4bit" else "bnb-8bit",
        device=settings.device,
        overwrite=overwrite,
        trust_remote_code={k: dict(v) for k, v in settings.trust_remote_code.items()},
        progress=stage_printer(),
    )
    out_console.print(
        f"[green]✓[/] {result.method} ({result.scheme}) copy written to {result.out} on {result.device}: weights "
        f"{format_bytes(result.out_bytes)} (from {format_bytes(result.source_bytes)})"
    )
    out_console.print(f"  load it as stored: vlmbridge serve {result.out}", style="dim", markup=False)
