"""Settings → an EngineSlot that loads the model folder with the embedded transformers engine."""

from __future__ import annotations

import os
from pathlib import Path

from vlmbridge.engine.base import Engine
from vlmbridge.server.state import EngineSlot
from vlmbridge.settings import Settings

__all__ = ["build_slot", "served_name"]


def _cpu_threads(requested: int | None) -> tuple[int, int]:
    """(prefill, decode) torch threads on CPU. Decoding leaves one core to the event loop: a token wake-up that
    preempts one of torch's threads stalls the whole parallel kernel (measured on 2 cores: 1 thread streams ~25%
    faster than 2), while a prefill is one long compute-bound pass that wants every core."""
    cores = os.cpu_count() or 2
    return (requested or cores, requested or max(1, cores - 1))


def served_name(settings: Settings, path: Path) -> str:
    return settings.served_model_name or path.resolve().name


def build_slot(settings: Settings, path: Path) -> EngineSlot:
    def make() -> Engine:
        from vlmbridge.engine.embedded import EngineLimits, TransformersEngine
        from vlmbridge.loader import load_model

        loaded = load_model(path, settings.load_options())
        prefill_threads, decode_threads = (
            _cpu_threads(settings.torch_threads) if loaded.device.type == "cpu" else (0, 0)
        )
        limits = EngineLimits(
            context_length=settings.context_length,
            default_max_new_tokens=settings.max_new_tokens,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_prefill_tokens=settings.max_prefill_tokens,
            batch_wait_s=settings.batch_wait_ms / 1000,
            prefix_cache_bytes=settings.prefix_cache_mb << 20,
            encoder_cache_bytes=settings.encoder_cache_mb << 20,
            prefill_threads=prefill_threads,
            decode_threads=decode_threads,
            stall_after_s=settings.engine_stall_timeout,
        )
        return TransformersEngine(loaded, served_name(settings, path), limits)

    return EngineSlot(served_name(settings, path), factory=make)
