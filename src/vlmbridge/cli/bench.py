"""`vlmbridge bench`: vlmbridge, `transformers serve` and in-process generate side by side on one checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlmbridge.cli.console import err_console, out_console
from vlmbridge.cli.options import SettingFlags, setting_flags, settings_from
from vlmbridge.errors import InvalidRequestError
from vlmbridge.settings import Settings

SYSTEMS = ("vlmbridge", "transformers serve", "in-process generate")


def bench_model(settings: Settings, model_dir: Path | None) -> Path:
    """The model to benchmark: the user's folder, or the `small` (~30 M-param) Qwen3-VL built once in the cache."""
    if model_dir is not None:
        return model_dir
    folder = settings.cache_dir / "bench-small-qwen3_vl"
    if not (folder / "config.json").exists():
        from vlmbridge.tiny.builder import build_tiny_model

        with err_console.status("building the small Qwen3-VL benchmark checkpoint (once)…"):
            build_tiny_model(folder, "qwen3_vl", size="small", overwrite=True)
    return folder


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidRequestError(f"--image must look like 320x240, got {text!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise InvalidRequestError("--image sides must be between 16 and 8192 pixels")
    return w, h


def _device(name: str) -> str:
    """One concrete device for every system (auto: a GPU when there is one)."""
    from vlmbridge.loader import resolve_device

    return str(resolve_device(name))


@setting_flags("dtype", "device", "cache_dir")
def bench(
    model_dir: Annotated[
        Path | None, typer.Argument(metavar="[MODEL_DIR]", help="Model folder; default: the built-in small Qwen3-VL.")
    ] = None,
    scenario: Annotated[str, typer.Option(help="throughput, multiturn or all.")] = "throughput",
    clients: Annotated[str, typer.Option(help="Concurrent clients, comma-separated.")] = "1,8",
    requests_per_client: Annotated[
        int, typer.Option(min=1, max=1000, help="Requests each client sends per round.")
    ] = 4,
    rounds: Annotated[
        int, typer.Option(min=1, max=100, help="Rounds per system; the systems take turns, round by round.")
    ] = 3,
    tokens: Annotated[int, typer.Option(min=1, max=4096, help="New tokens per request (forced).")] = 32,
    image: Annotated[str, typer.Option(help="Picture size WxH.")] = "320x240",
    skip: Annotated[
        list[str] | None,
        typer.Option(help="Leave a system out: vlmbridge, 'transformers serve', 'in-process generate'."),
    ] = None,
    *,
    flags: SettingFlags,
) -> None:
    """Benchmark vlmbridge against `transformers serve` and in-process generate on the same requests."""
    from vlmbridge.bench.throughput import ThroughputPlan, run_throughput
    from vlmbridge.bench.workload import Workload

    if scenario not in ("throughput", "multiturn", "all"):
        raise InvalidRequestError(f"unknown scenario {scenario!r}; use throughput, multiturn or all")
    unknown = set(skip or []) - set(SYSTEMS)
    if unknown:
        raise InvalidRequestError(f"--skip takes {', '.join(SYSTEMS)}; got {', '.join(sorted(unknown))}")
    try:
        client_counts = tuple(int(c) for c in clients.split(",") if c.strip())
    except ValueError:
        raise InvalidRequestError(f"--clients must be numbers like 1,8; got {clients!r}") from None
    if not client_counts or any(c < 1 or c > 256 for c in client_counts):
        raise InvalidRequestError("--clients must be between 1 and 256")
    width, height = _size(image)
    settings = settings_from(**flags)
    dtype = settings.dtype  # for every system
    model = bench_model(settings, model_dir)
    systems = tuple(s for s in SYSTEMS if s not in (skip or []))
    work = Workload(width=width, height=height, new_tokens=tokens)
    if scenario in ("throughput", "all"):
        run_throughput(
            ThroughputPlan(model=model, clients=client_counts, requests_per_client=requests_per_client,
                           rounds=rounds, work=work, systems=systems, dtype=dtype, device=_device(settings.device)),
            out_console,
        )  # fmt: skip
    if scenario in ("multiturn", "all"):
        from vlmbridge.bench.multiturn import MultiTurnPlan, run_multiturn

        run_multiturn(MultiTurnPlan(model=model, systems=systems, dtype=dtype), out_console)
