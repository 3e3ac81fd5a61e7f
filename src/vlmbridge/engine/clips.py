"""A clip as the Qwen-VL video processors take it, for every engine: frames, metadata and size budget.

The frames come decoded and sampled by `media.video` (our fps, `max_frames`, timestamps); the processor's own frame
sampling stays off, and the clip's metadata (source rate, frame indices) goes with them, so Qwen2.5-VL derives its
temporal positions (`second_per_grid_ts`) and Qwen3-VL its `<t seconds>` prompt text from the frames we picked.
The transformers engine hands these to the model's video processor itself, the vLLM engine to vLLM's processor
(which calls the same one): both engines see the same frames, metadata and budget, so their token counts agree.

`max_pixels` is per frame for every family. Qwen2/2.5-VL's video processor reads `size.longest_edge` per frame;
Qwen3-VL's reads it for the whole clip (frames × pixels), so it gets the per-frame budget times the frame count.
No backend is imported here (transformers only inside functions, for the processor's own resize rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.types import VideoPart

__all__ = ["ClipInput", "budget_per_clip", "clip_input", "clip_tokens", "resized_size"]


@dataclass(frozen=True)
class ClipInput:
    """One clip ready for a video processor: frames (T, H, W, 3) uint8, metadata and size kwargs."""

    frames: Any  # numpy array
    metadata: dict[str, Any]  # transformers' VideoMetadata fields
    size: dict[str, int]  # {"shortest_edge", "longest_edge"} for this clip
    param: str
    has_cap: bool = False  # the processor has `cap_pixels_per_frame` (our budget is already per frame: off)

    @property
    def processor_kwargs(self) -> dict[str, Any]:
        """The video processor's kwargs for this clip: its size, the processor's own sampling and cap off."""
        kwargs: dict[str, Any] = {"size": dict(self.size), "do_sample_frames": False}
        if self.has_cap:
            kwargs["cap_pixels_per_frame"] = False
        return kwargs


def budget_per_clip(video_processor: Any) -> bool:
    """Whether this video processor reads `size.longest_edge` for a whole clip (Qwen3-VL) rather than per frame."""
    try:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    except ImportError:
        return False
    return isinstance(video_processor, Qwen3VLVideoProcessor)


def clip_input(part: VideoPart, video_processor: Any) -> ClipInput:
    """Decode and sample `part` (raises VideoInputError for a bad clip) into what `video_processor` takes."""
    import numpy as np

    clip = part.frames()
    frames = list(clip.frames)
    times = list(clip.timestamps)
    if len(frames) == 1:  # every Qwen-VL tower takes frames in temporal pairs: a still clip shows one twice
        frames, times = frames * 2, times * 2
    fps = clip.source_fps
    width, height = clip.size
    metadata = dict(
        total_num_frames=max(len(frames), round(clip.duration * fps)), fps=fps, width=width, height=height,
        duration=clip.duration, video_backend="pyav", frames_indices=[round(t * fps) for t in times],
    )  # fmt: skip
    budget = part.budget
    longest = budget.max_pixels * (len(frames) if budget_per_clip(video_processor) else 1)
    default_min = int(getattr(getattr(video_processor, "size", None), "shortest_edge", None) or 3136)
    shortest = min(budget.min_pixels or default_min, longest)
    param = str(getattr(part.video, "param", "video"))
    valid = getattr(getattr(video_processor, "valid_kwargs", None), "__annotations__", {})
    stacked = np.stack(frames)
    del frames, clip
    size = {"shortest_edge": shortest, "longest_edge": longest}
    return ClipInput(stacked, metadata, size, param, has_cap="cap_pixels_per_frame" in valid)


def resized_size(clip: ClipInput, video_processor: Any) -> tuple[int, int]:
    """(height, width) the processor resizes `clip`'s frames to, by its own rule (no pixels touched)."""
    patch = int(getattr(video_processor, "patch_size", 14) or 14)
    merge = int(getattr(video_processor, "merge_size", 2) or 2)
    temporal = int(getattr(video_processor, "temporal_patch_size", 2) or 2)
    count, height, width = (int(n) for n in clip.frames.shape[:3])
    low, high = clip.size["shortest_edge"], clip.size["longest_edge"]
    if budget_per_clip(video_processor):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as resize_clip

        h, w = resize_clip(count, height, width, temporal, patch * merge, low, high)
        return int(h), int(w)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=low, max_pixels=high)
    return int(h), int(w)


def clip_tokens(clip: ClipInput, video_processor: Any) -> tuple[int, int]:
    """(temporal groups, video placeholder tokens per group) the processor makes of `clip`: what a context check
    counts before an engine processes the clip."""
    patch = int(getattr(video_processor, "patch_size", 14) or 14)
    merge = int(getattr(video_processor, "merge_size", 2) or 2)
    temporal = int(getattr(video_processor, "temporal_patch_size", 2) or 2)
    h, w = resized_size(clip, video_processor)
    return math.ceil(int(clip.frames.shape[0]) / temporal), (h // patch) * (w // patch) // merge**2
