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
        """The pictures (uniformly thinned to `max_frames`) as RGB arrays of the first picture's size."""
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
                    size = picture.size
                elif picture.size != size:  # a video's frames share one size: later ones follow the first
                    picture = picture.resize(size)
                frames.append(np.asarray(picture, dtype=np.uint8))
            finally:
                image.release()
        return VideoFrames(
            tuple(frames), tuple(i / self.fps for i in picks), source_fps=self.fps, duration=self.duration
        )
