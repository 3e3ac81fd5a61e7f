"""Assets for `vlmbridge demo`: the built-in tiny model and a generated picture, created once in the cache."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_FAMILY", "demo_assets"]

DEMO_FAMILY = "qwen3_vl"


def demo_assets(cache_dir: Path, model_dir: Path | None = None) -> tuple[Path, Path]:
    """(model folder, picture path). Builds the tiny Qwen3-VL model unless `model_dir` is given."""
    from vlmbridge.tiny.images import demo_picture

    cache_dir.mkdir(parents=True, exist_ok=True)
    picture = cache_dir / "demo-picture.png"
    if not picture.exists():
        demo_picture().save(picture)
    if model_dir is not None:
        return model_dir, picture
    folder = cache_dir / f"demo-{DEMO_FAMILY}"
    if not (folder / "config.json").exists():
        from vlmbridge.tiny.builder import build_tiny_model

        build_tiny_model(folder, DEMO_FAMILY, layout="official", overwrite=True)
    return folder, picture
