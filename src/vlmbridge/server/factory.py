"""Settings → the slots the app serves: one folder (`serve DIR`), NAME=PATH pairs or a models file."""

from __future__ import annotations

from pathlib import Path

from vlmbridge.pool import EngineSlot, ModelPool, ModelSpec, single_folder
from vlmbridge.settings import Settings

__all__ = ["build_pool", "build_slot"]


def build_slot(settings: Settings, path: Path) -> EngineSlot:
    """One model folder, loaded at start-up and pinned (`vlmbridge serve DIR`)."""
    spec = single_folder(settings, path)
    return EngineSlot(spec.name, spec=spec)


def build_pool(settings: Settings, specs: list[ModelSpec]) -> ModelPool:
    """A pool of the configured models under the memory budget (default: what the device has)."""
    from vlmbridge.budget import device_budget

    device = device_budget(settings.device)
    on_gpu = device.kind == "cuda"
    # What the device has: all of the GPU's memory, or the RAM available within the container's limit.
    budget = settings.memory_budget or (device.total if on_gpu else device.free)
    return ModelPool([EngineSlot(spec.name, spec=spec) for spec in specs], budget=budget, on_gpu=on_gpu)
