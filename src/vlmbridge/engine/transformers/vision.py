"""Vision-encoder outputs for a prefill, computed once per image (content + budget) and reused from the cache.

The model then gets `mm_encoder_outputs` instead of `pixel_values`: the same features its own forward would
compute, scattered into the image placeholders in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.transformers.caches import EncoderCache
from vlmbridge.engine.transformers.family import FamilyAdapter
from vlmbridge.engine.transformers.prompt import ModelInputs

__all__ = ["ImageSlice", "VisionFeatures", "image_slices", "video_slices"]


@dataclass(frozen=True)
class ImageSlice:
    key: str  # pixel digest @ budget
    pixels: Any  # this image's rows of pixel_values
    grid: Any  # its image_grid_thw row, shape (1, 3)
    span: tuple[int, int]  # its placeholder positions in the prompt


def image_slices(inputs: ModelInputs) -> list[ImageSlice]:
    """Split a prompt's pixel_values per image (one row per patch: t·h·w rows each)."""
    return _slices(inputs, "image", inputs.image_keys, inputs.image_spans)


def video_slices(inputs: ModelInputs) -> list[ImageSlice]:
    """Split a prompt's pixel_values_videos per clip (t·h·w rows each), as `image_slices` does for images."""
    return _slices(inputs, "video", inputs.video_keys, inputs.video_spans)


def _slices(
    inputs: ModelInputs, kind: str, keys: tuple[str, ...], spans: tuple[tuple[int, int], ...]
) -> list[ImageSlice]:
    grids = inputs.tensors.get(f"{kind}_grid_thw")
    if grids is None:
        return []
    pixels = inputs.tensors["pixel_values" if kind == "image" else "pixel_values_videos"]
    out, row = [], 0
    for i, key in enumerate(keys):
        n = int(grids[i].prod())
        out.append(ImageSlice(key, pixels[row : row + n], grids[i : i + 1], spans[i]))
        row += n
    return out


class VisionFeatures:
    def __init__(self, model: Any, cache: EncoderCache | None, family: FamilyAdapter) -> None:
        self._encoder = family.vision_encoder(model)
        self._family = family
        self._cache = cache
        self._output_cls: Any = None

    def encode(self, images: list[ImageSlice], device: Any, *, video: bool = False) -> Any | None:
        """The `mm_encoder_outputs["image"]` (or `["video"]`) object for these images or clips, in order; None when
        there are none. Clips go through the tower's video entry (`get_video_features`)."""
        import torch

        if not images:
            return None
        parts: list[dict[str, Any] | None] = [self._cache.get(i.key) if self._cache else None for i in images]
        missing = [n for n, p in enumerate(parts) if p is None]
        if missing:
            pixels = torch.cat([images[n].pixels for n in missing]).to(device)
            grids = torch.cat([images[n].grid for n in missing]).to(device)
            encode = self._encoder.get_video_features if video else self._encoder.get_image_features
            out = encode(pixels, grids, return_dict=True)
            self._output_cls = type(out)
            for n, item in zip(missing, self._family.split_features(out, len(missing)), strict=True):
                parts[n] = item
                if self._cache is not None:
                    self._cache.put(images[n].key, item)
        return self._family.join_features(self._output_cls, [p for p in parts if p is not None])
