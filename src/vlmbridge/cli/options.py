"""Options shared by several commands, and the one way commands turn flags into Settings."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vlmbridge.settings import Settings

__all__ = [
    "AllowDequantizeOpt",
    "AllowPickleOpt",
    "DTypeOpt",
    "DeviceOpt",
    "MaxPixelsOpt",
    "QuantizationOpt",
    "TrustRemoteCodeOpt",
    "settings_from",
]

DTypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="auto (stored dtype where supported), bf16, fp16 or fp32. [env: VLMBRIDGE_DTYPE]"),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N. [env: VLMBRIDGE_DEVICE]")]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option("--max-pixels", help="Pixel budget per image (H×W after resize). [env: VLMBRIDGE_MAX_PIXELS]"),
]
TrustRemoteCodeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--trust-remote-code",
        help="Allow a folder's remote code, pinned: DIR=FILE:SHA256[,FILE:SHA256]. Repeatable. "
        "[env: VLMBRIDGE_TRUST_REMOTE_CODE as JSON]",
    ),
]
AllowPickleOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-pickle-weights/--refuse-pickle-weights",
        help="Load pickle .bin weights (unsafe). [env: VLMBRIDGE_ALLOW_PICKLE_WEIGHTS]",
        show_default=False,
    ),
]

QuantizationOpt = Annotated[
    str | None,
    typer.Option(
        "--quantization",
        help="auto (bitsandbytes only if the model does not fit unquantized; logs why), none, bnb-8bit or "
        "bnb-4bit. [env: VLMBRIDGE_QUANTIZATION] [default: auto]",
        show_default=False,
    ),
]
AllowDequantizeOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-dequantize/--refuse-dequantize",
        help="Load a pre-quantized checkpoint this device has no kernels for (FP8 below compute capability 8.9) "
        "dequantized, at 2-4x its memory, instead of refusing. [env: VLMBRIDGE_ALLOW_DEQUANTIZE]",
        show_default=False,
    ),
]


def settings_from(**flags: Any) -> Settings:
    """Settings from the environment, overridden by the flags the user actually gave."""
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    return Settings(**given)
