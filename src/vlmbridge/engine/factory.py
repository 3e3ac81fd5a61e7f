"""ModelSettings → an Engine: the one place an engine is built (`serve`, `demo` and `chat` all come here).

The backend is imported inside the function, so choosing one (transformers now, vLLM later) costs nothing until a
model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlmbridge.engine.base import Engine
from vlmbridge.settings import ModelSettings

__all__ = ["build_engine"]


def build_engine(
    model: ModelSettings, path: Path, name: str, *, progress: Callable[[str], None] | None = None
) -> Engine:
    """Load the folder at `path` as `model` says and wrap it in an engine that serves it as `name`. Not started:
    call `start()`. `progress` hears each loading stage."""
    from vlmbridge.engine.transformers.engine import EngineLimits, TransformersEngine
    from vlmbridge.loader import LoadOptions, load_model

    loaded = load_model(path, LoadOptions.from_settings(model), progress=progress)
    limits = EngineLimits.from_settings(model, on_cpu=loaded.device.type == "cpu")
    return TransformersEngine(loaded, name, limits)
