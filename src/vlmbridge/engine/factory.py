"""ModelSettings → an Engine: the one place an engine is built (`serve`, `demo` and `chat` all come here).

The backend is imported inside the function, so choosing one costs nothing until a model is loaded. `engine: vllm`
runs in a worker process on the vLLM interpreter (`vllm_python`, else VLMBRIDGE_VLLM_PYTHON): the front never
imports vLLM. Inside that worker (engine_worker "thread") the factory builds the `VllmEngine`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from vlmbridge.engine.base import Engine
from vlmbridge.errors import ModelLoadError
from vlmbridge.settings import ModelSettings

__all__ = ["VLLM_PYTHON_ENV", "build_engine", "vllm_python"]

VLLM_PYTHON_ENV = "VLMBRIDGE_VLLM_PYTHON"


def build_engine(
    model: ModelSettings, path: Path, name: str, *, progress: Callable[[str], None] | None = None
) -> Engine:
    """An engine serving the folder at `path` as `name`, configured by `model`. Not started: call `start()`.

    With `engine_worker: process` (the default) the engine lives in a worker process and loads there when
    started; with `thread` the folder loads here and now (`progress` hears each loading stage)."""
    if model.engine == "vllm":
        return _vllm_engine(model, path, name)
    if model.engine_worker == "process":
        from vlmbridge.engine.process import ProcessEngine

        return ProcessEngine(model, path, name)
    from vlmbridge.engine.transformers.engine import EngineLimits, TransformersEngine
    from vlmbridge.loader import LoadOptions, load_model

    loaded = load_model(path, LoadOptions.from_settings(model), progress=progress)
    limits = EngineLimits.from_settings(model, on_cpu=loaded.device.type == "cpu")
    return TransformersEngine(loaded, name, limits)


def vllm_python(model: ModelSettings) -> str:
    """The interpreter an `engine: vllm` worker runs on."""
    if model.vllm_python is not None:
        return str(model.vllm_python)
    return os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def _vllm_engine(model: ModelSettings, path: Path, name: str) -> Engine:
    if model.engine_worker == "thread":  # in this interpreter (a worker's): it says so if vLLM is missing
        from vlmbridge.engine.vllm.engine import VllmEngine

        return VllmEngine(model, path, name)
    from vlmbridge.engine.process import ProcessEngine

    python = vllm_python(model)
    if not os.access(python, os.X_OK):
        raise ModelLoadError(
            f"engine: vllm, but the vLLM interpreter {python} does not exist or is not executable",
            fix="set vllm_python (or VLMBRIDGE_VLLM_PYTHON) to the python of a venv with vLLM (CPU: ./vb vllm-venv)",
            cause="vllm_missing",
        )
    return ProcessEngine(model, path, name, python=python)
