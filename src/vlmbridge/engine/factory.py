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
    """An engine serving the folder at `path` as `name`, configured by `model`. Not started: call `start()`.

    With `engine_worker: process` (the default) the engine lives in a worker process and loads there when
    started; with `thread` the folder loads here and now (`progress` hears each loading stage)."""
    if model.engine_worker == "process":
        from vlmbridge.engine.process import ProcessEngine

        return ProcessEngine(model, path, name)
    from vlmbridge.engine.transformers.engine import EngineLimits, TransformersEngine
    from vlmbridge.loader import LoadOptions, load_model

    loaded = load_model(path, LoadOptions.from_settings(model), progress=progress)
    limits = EngineLimits.from_settings(model, on_cpu=loaded.device.type == "cpu")
    return TransformersEngine(loaded, name, limits)
