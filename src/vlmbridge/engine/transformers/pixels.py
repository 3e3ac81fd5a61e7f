"""Processed pixels for prompts: each image through the model's own image processor at its own pixel budget, once
per content and budget.

The processor's `apply_chat_template` then runs as usual — template, control-token sanitizing, placeholder
expansion, tokenization — on a shallow copy whose image processor hands back these results instead of computing
them, so a prompt built from cached pixels is token for token the one transformers builds from the pictures.
An image is processed alone, never batched with the request's other images, so its pixels depend only on its
bytes and budget: what the caches key on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from vlmbridge.engine.transformers.caches import PixelCache, ProcessedPixels
from vlmbridge.engine.types import ImagePart, PixelBudget
from vlmbridge.errors import ImageInputError

__all__ = ["ImagePixels", "image_key"]


def image_key(part: ImagePart) -> str:
    """The content key of an image at its budget, shared by the pixel, encoder and prefix caches."""
    return f"{part.image.digest}@{part.budget.min_pixels}-{part.budget.max_pixels}"


class _Precomputed:
    """Stands in for the image processor inside one `apply_chat_template` call: returns the pixels already
    processed (in prompt order) and forwards everything else (merge_size, valid_kwargs…) to the real one."""

    def __init__(self, real: Any, outputs: dict[str, Any]) -> None:
        self._real = real
        self._outputs = outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        return BatchFeature(dict(self._outputs))

    def fetch_images(self, images: Any) -> Any:
        return images


class ImagePixels:
    def __init__(self, processor: Any, cache: PixelCache | None, default_min_pixels: int) -> None:
        self.processor = processor
        self.cache = cache
        self.default_min_pixels = default_min_pixels
        self._placeholder: Any = None

    @property
    def placeholder(self) -> Any:
        """What the chat template gets for each picture: it only needs to know there is one."""
        if self._placeholder is None:
            from PIL import Image

            self._placeholder = Image.new("RGB", (1, 1))
        return self._placeholder

    def process(self, parts: Sequence[ImagePart]) -> list[ProcessedPixels]:
        return [self._one(part) for part in parts]

    def processor_for(self, processed: Sequence[ProcessedPixels], videos: dict[str, Any] | None = None) -> Any:
        """A shallow copy of the processor that takes `processed` as its image processor's output, and `videos` as
        its video processor's (per call, so concurrent prompts on other threads are untouched)."""
        import torch

        if not processed and not videos:
            return self.processor
        proxy = copy.copy(self.processor)
        if processed:
            values = [p.pixel_values for p in processed]
            grids = [p.image_grid_thw for p in processed]
            outputs = {
                "pixel_values": values[0] if len(values) == 1 else torch.cat(values),
                "image_grid_thw": grids[0] if len(grids) == 1 else torch.cat(grids),
            }
            proxy.image_processor = _Precomputed(self.processor.image_processor, outputs)
        if videos:
            proxy.video_processor = _Precomputed(self.processor.video_processor, videos)
        return proxy

    def _one(self, part: ImagePart) -> ProcessedPixels:
        key = image_key(part)
        if self.cache is not None:
            hit = self.cache.get(key)
            if isinstance(hit, ProcessedPixels):
                return hit
        # Decoded here, inside the caller's bounded preparation step, reduced to the budget where the format
        # allows; the pixels are dropped as soon as the processor is done with them.
        picture = part.image.decode(part.budget.max_pixels)
        try:
            out = self.processor(images=[picture], return_tensors="pt", **self._size(part.budget))
        except (ValueError, TypeError) as exc:  # e.g. an aspect ratio the processor refuses
            w, h = part.image.size
            raise ImageInputError(
                f"image {w}×{h} could not be processed: {str(exc)[:200]}", param=part.image.param, code="invalid_image"
            ) from None
        finally:
            del picture
            part.image.release()
        processed = ProcessedPixels(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
        if self.cache is not None:
            self.cache.put(key, processed)
        return processed

    def _size(self, budget: PixelBudget) -> dict[str, Any]:
        # A fresh dict per call: apply_chat_template and the processor write into the kwargs they are given.
        return {
            "size": {"shortest_edge": budget.min_pixels or self.default_min_pixels, "longest_edge": budget.max_pixels}
        }
