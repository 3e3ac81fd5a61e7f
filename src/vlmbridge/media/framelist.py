"""A video sent as a list of pictures (`{"type": "video", "video": ["data:image/...", ...]}`).

Each picture went through the image checks (`DecodedImage`: header checked, decoded later); here they become one
clip at a stated frame rate, with the same interface as a decoded file (`frames(sampling)`), so the backends never
know which of the two a video came as.
"""

from __future__ import annotations

import hashlib
from typing import Any

from vlmbridge.errors import VideoInputError
from vlmbridge.media.decode import DecodedImage
from vlmbridge.media.video import VideoFrames, VideoSampling

__all__ = ["FrameListVideo"]


class FrameListVideo:
    """Pictures taken `fps` times a second. `digest` covers every picture and the rate (timestamps follow it)."""

    def __init__(self, images: tuple[DecodedImage, ...], *, fps: float, param: str = "video") -> None:
        if not images:
            raise VideoInputError("a video frame list needs at least one picture", param=param, code="invalid_video")
        self.images = images
        self.fps = fps
        self.param = param
        self.size = images[0].size
        self.duration = len(images) / fps
        joined = "|".join(i.digest for i in images) + f"@{fps:g}"
        self.digest = hashlib.sha256(joined.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"FrameListVideo({len(self.images)} frames at {self.fps:g} fps, {self.digest[:12]})"

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.images)

    def frames(self, sampling: VideoSampling) -> VideoFrames:
        """The pictures (uniformly thinned to `max_frames`) as RGB arrays of the first picture's size, each reduced
        to about twice the per-frame budget right after decoding (one full-size picture in memory at a time)."""
        import numpy as np

        n = len(self.images)
        count = min(n, sampling.max_frames)
        picks = sorted({round(i * (n - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]
        frames: list[Any] = []
        size: tuple[int, int] | None = None
        for index in picks:
            image = self.images[index]
            try:
                picture = image.decode(sampling.max_pixels)
                if size is None:
                    size = _reduced(picture.size, sampling.max_pixels)
                if picture.size != size:  # reduced, and a video's frames share one size: the first one's
                    picture = picture.resize(size)
                frames.append(np.asarray(picture, dtype=np.uint8))
            finally:
                image.release()
        return VideoFrames(
            tuple(frames), tuple(i / self.fps for i in picks), source_fps=self.fps, duration=self.duration
        )


def _reduced(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """`size` scaled down to about 2 × max_pixels (the processor's own resize decides the last step)."""
    w, h = size
    if max_pixels is None or w * h <= 2 * max_pixels:
        return size
    scale = (2 * max_pixels / (w * h)) ** 0.5
    return max(2, int(w * scale)), max(2, int(h * scale))
