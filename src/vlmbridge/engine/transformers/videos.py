"""Processed video pixels: each clip's sampled frames through the model's own video processor, once per content,
sampling and pixel budget.

The frames, their metadata and the per-clip size budget come from `engine.clips` (shared with the vLLM engine, so
both engines process a clip alike). A clip is processed alone, so its pixels depend only on its bytes, sampling and
budget: what the caches key on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.clips import clip_input
from vlmbridge.engine.types import VideoPart
from vlmbridge.errors import VideoInputError

__all__ = ["ProcessedVideo", "VideoPixels", "video_key"]


def video_key(part: VideoPart) -> str:
    """The content key of a clip at its sampling and budget, shared by the pixel, encoder and prefix caches."""
    b = part.budget
    return f"video:{part.video.digest}@{part.sampling.key()}@{b.min_pixels}-{b.max_pixels}"


@dataclass(frozen=True)
class ProcessedVideo:
    """The video processor's output for one clip: its patch rows, (t, h, w) grid of shape (1, 3), and metadata."""

    pixel_values_videos: Any
    video_grid_thw: Any
    metadata: Any  # transformers' VideoMetadata: source fps, frame indices (timestamps), duration

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in (self.pixel_values_videos, self.video_grid_thw))


class VideoPixels:
    def __init__(self, processor: Any, cache: Any | None) -> None:
        self.processor = processor
        self.video_processor = getattr(processor, "video_processor", None)
        self.cache = cache  # PixelCache (shared with images; keys differ)
        self._placeholder: Any = None

    @property
    def supported(self) -> bool:
        return self.video_processor is not None

    @property
    def placeholder(self) -> Any:
        """What the chat template gets for each clip: a valid 2-frame video; its pixels come processed."""
        if self._placeholder is None:
            import numpy as np

            self._placeholder = np.zeros((2, 4, 4, 3), dtype=np.uint8)
        return self._placeholder

    def process(self, parts: list[VideoPart]) -> list[ProcessedVideo]:
        return [self._one(part) for part in parts]

    def outputs(self, processed: list[ProcessedVideo]) -> dict[str, Any]:
        """What the video processor returns for these clips together, in prompt order."""
        import torch

        return {
            "pixel_values_videos": torch.cat([p.pixel_values_videos for p in processed]),
            "video_grid_thw": torch.cat([p.video_grid_thw for p in processed]),
            "video_metadata": [p.metadata for p in processed],
        }

    def _one(self, part: VideoPart) -> ProcessedVideo:
        key = video_key(part)
        if self.cache is not None:
            hit = self.cache.get(key)
            if isinstance(hit, ProcessedVideo):
                return hit
        clip = clip_input(part, self.video_processor)  # decoded here, inside the caller's bounded preparation step
        from transformers.video_utils import VideoMetadata

        width, height = clip.metadata["width"], clip.metadata["height"]
        video_processor: Any = self.video_processor
        try:
            out = video_processor(
                videos=[clip.frames], video_metadata=[VideoMetadata(**clip.metadata)], return_metadata=True,
                return_tensors="pt", **clip.processor_kwargs,
            )  # fmt: skip
        except (ValueError, TypeError) as exc:  # e.g. an aspect ratio the processor refuses
            raise VideoInputError(
                f"video {width}×{height} could not be processed: {str(exc)[:200]}",
                param=clip.param,
                code="invalid_video",
            ) from None
        finally:
            del clip
        processed = ProcessedVideo(out["pixel_values_videos"], out["video_grid_thw"], out["video_metadata"][0])
        if self.cache is not None:
            self.cache.put(key, processed)
        return processed
