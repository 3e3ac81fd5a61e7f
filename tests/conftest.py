"""Shared fixtures: tiny real checkpoints built once per test session (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vlmbridge.tiny.builder import build_tiny_model

# Keep the tests offline and quiet, whatever the developer's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VLM_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl")
ALL_FAMILIES = (*VLM_FAMILIES, "qwen2")

TinyFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """tiny_model(family, layout="official", shards=1, size="tiny") -> folder, built once per session.

    Treat the folder as read-only; tests that break a checkpoint use `tiny_copy`.
    """
    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, str, int, str], Path] = {}

    def get(family: str, layout: str = "official", shards: int = 1, size: str = "tiny") -> Path:
        key = (family, layout, shards, size)
        if key not in built:
            built[key] = build_tiny_model(
                root / f"{family}-{layout}-{shards}-{size}",
                family,
                layout=layout,
                shards=shards,
                size=size,  # type: ignore[arg-type]
            )
        return built[key]

    return get


@pytest.fixture
def tiny_copy(tiny_model: TinyFactory, tmp_path: Path) -> TinyFactory:
    """A private, mutable copy of a tiny checkpoint."""
    import shutil

    def get(family: str, layout: str = "official", shards: int = 1) -> Path:
        dst = tmp_path / f"{family}-{layout}-{shards}"
        shutil.copytree(tiny_model(family, layout, shards), dst)
        return dst

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `@pytest.mark.gpu` tests where torch sees no CUDA device (torch is imported only if there are any)."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in gpu:
        item.add_marker(skip)
