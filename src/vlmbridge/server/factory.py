"""Settings → an EngineSlot that loads the model folder in the background with the engine factory."""

from __future__ import annotations

from pathlib import Path

from vlmbridge.engine.base import Engine
from vlmbridge.output.pipeline import TextTools
from vlmbridge.server.state import EngineSlot
from vlmbridge.settings import Settings

__all__ = ["build_slot"]


def build_slot(settings: Settings, path: Path) -> EngineSlot:
    model = settings.model_settings()
    name = model.served_name(path)

    def make() -> Engine:
        from vlmbridge.engine.factory import build_engine

        return build_engine(model, path, name)

    def tools() -> TextTools:
        from vlmbridge.output.client import load_text_tools

        return load_text_tools(path, model.trust_remote_code)

    return EngineSlot(name, factory=make, tools=tools)
