"""Settings → an EngineSlot that loads the model folder with the embedded transformers engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vlmbridge.engine.base import Engine
from vlmbridge.server.state import EngineSlot
from vlmbridge.settings import Settings

__all__ = ["build_slot", "served_name"]

log = logging.getLogger(__name__)


def _set_cpu_threads(requested: int | None) -> None:
    import torch

    # One core stays with the event loop: a token wake-up that preempts one of torch's threads stalls the
    # whole parallel kernel (measured on 2 cores: 1 torch thread streams ~25% faster than 2).
    threads = requested or max(1, (os.cpu_count() or 2) - 1)
    if threads != torch.get_num_threads():
        log.info("torch CPU threads: %d -> %d", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)


def served_name(settings: Settings, path: Path) -> str:
    return settings.served_model_name or path.resolve().name


def build_slot(settings: Settings, path: Path) -> EngineSlot:
    def make() -> Engine:
        from vlmbridge.engine.embedded import EngineLimits, TransformersEngine
        from vlmbridge.loader import load_model

        loaded = load_model(path, settings.load_options())
        if loaded.device.type == "cpu":
            _set_cpu_threads(settings.torch_threads)
        limits = EngineLimits(
            context_length=settings.context_length,
            default_max_new_tokens=settings.max_new_tokens,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_prefill_tokens=settings.max_prefill_tokens,
            batch_wait_s=settings.batch_wait_ms / 1000,
        )
        return TransformersEngine(loaded, served_name(settings, path), limits)

    return EngineSlot(served_name(settings, path), factory=make)
