"""Processed video pixels: each clip's sampled frames through the model's own video processor, once per content,
sampling and pixel budget.

The frames come decoded and sampled by `media.video` (our fps, `max_frames`, timestamps): the processor's own frame
sampling stays off, and the clip's metadata (source rate, frame indices) goes with them, so Qwen2.5-VL derives its
temporal positions (`second_per_grid_ts`) and Qwen3-VL its `<t seconds>` prompt text from the frames we picked.
A clip is processed alone, so its pixels depend only on its bytes, sampling and budget: what the caches key on.

`max_pixels` is per frame for every family. Qwen2/2.5-VL's video processor reads `size.longest_edge` per frame;
Qwen3-VL's reads it for the whole clip (frames × pixels), so it gets the per-frame budget times the frame count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        self._per_clip = _budget_per_clip(self.video_processor)

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
        clip = part.frames()  # decoded here, inside the caller's bounded preparation step
        frames = list(clip.frames)
        times = list(clip.timestamps)
        if len(frames) == 1:  # every Qwen-VL tower takes frames in temporal pairs: a still clip shows one twice
            frames, times = frames * 2, times * 2
        import numpy as np
        from transformers.video_utils import VideoMetadata

        fps = clip.source_fps
        width, height = clip.size
        metadata = VideoMetadata(
            total_num_frames=max(len(frames), round(clip.duration * fps)), fps=fps, width=width, height=height,
            duration=clip.duration, video_backend="pyav", frames_indices=[round(t * fps) for t in times],
        )  # fmt: skip
        budget = part.budget
        longest = budget.max_pixels * (len(frames) if self._per_clip else 1)
        default_min = int(getattr(getattr(self.video_processor, "size", None), "shortest_edge", None) or 3136)
        shortest = min(budget.min_pixels or default_min, longest)
        kwargs: dict[str, Any] = {"size": {"shortest_edge": shortest, "longest_edge": longest}}
        valid = getattr(getattr(self.video_processor, "valid_kwargs", None), "__annotations__", {})
        if "cap_pixels_per_frame" in valid:
            kwargs["cap_pixels_per_frame"] = False  # our budget is already per frame
        video_processor: Any = self.video_processor
        try:
            out = video_processor(
                videos=[np.stack(frames)], video_metadata=[metadata], do_sample_frames=False, return_metadata=True,
                return_tensors="pt", **kwargs,
            )  # fmt: skip
        except (ValueError, TypeError) as exc:  # e.g. an aspect ratio the processor refuses
            raise VideoInputError(
                f"video {width}×{height} could not be processed: {str(exc)[:200]}",
                param=getattr(part.video, "param", "video"),
                code="invalid_video",
            ) from None
        finally:
            del frames, clip
        processed = ProcessedVideo(out["pixel_values_videos"], out["video_grid_thw"], out["video_metadata"][0])
        if self.cache is not None:
            self.cache.put(key, processed)
        return processed


def _budget_per_clip(video_processor: Any) -> bool:
    """Whether this video processor reads `size.longest_edge` for a whole clip (Qwen3-VL) rather than per frame."""
    try:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    except ImportError:
        return False
    return isinstance(video_processor, Qwen3VLVideoProcessor)
