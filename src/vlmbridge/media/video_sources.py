"""Where a `video_url` may come from, and the one entry point that turns it into a header-checked clip.

The same rules as images (`ImageSources`): base64 `data:video/...` URIs, http(s) URLs through the guarded fetcher
(checked addresses only, redirects re-checked), and files below an allowed directory — under the video byte cap.
Callers' URLs and paths stop here: only `DecodedVideo` objects (header checked, frames decoded later) go on.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from vlmbridge.errors import ImageInputError, VideoInputError
from vlmbridge.media.sources import ImageSources, SourcePolicy
from vlmbridge.media.video import DecodedVideo, VideoLimits, probe_video

if TYPE_CHECKING:
    from vlmbridge.settings import Settings

__all__ = ["VIDEO_MEDIA_TYPES", "VideoSources", "video_limits"]

# Media types a data URI may declare; the decoder still sniffs the real container from the bytes.
VIDEO_MEDIA_TYPES = frozenset(
    {"video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/matroska", "video/x-m4v"}
)
_IMAGE_WORD = re.compile(r"(?<!-)\bimage\b(?!-)")  # not inside flag names such as --allow-image-host


def video_limits(settings: Settings) -> VideoLimits:
    return VideoLimits(
        max_seconds=settings.max_video_seconds,
        max_frame_pixels=settings.max_video_frame_pixels,
        max_source_frames=max(1, int(settings.max_video_seconds * 120)),  # up to 120 fps over the longest clip
        decode_timeout=settings.video_decode_timeout,
    )


class VideoSources:
    """Loads `video_url` values under the image source rules with the video byte cap. `await aclose()` at shutdown.

    `decode_slots` bounds the clips decoded at once (each holds its sampled frames while being processed)."""

    def __init__(self, policy: SourcePolicy, limits: VideoLimits, *, decode_slots: int = 1) -> None:
        fetch = replace(policy.fetch, user_agent=policy.fetch.user_agent.replace("image", "video"), accept="video/*")
        self._sources = ImageSources(replace(policy, fetch=fetch))
        self.limits = limits
        self.decode_slots = threading.BoundedSemaphore(decode_slots)

    @classmethod
    def from_settings(cls, settings: Settings, images: SourcePolicy) -> VideoSources:
        cap = settings.max_video_bytes
        return cls(replace(images, max_bytes=cap, fetch=replace(images.fetch, max_bytes=cap)), video_limits(settings))

    async def aclose(self) -> None:
        await self._sources.aclose()

    async def load(self, url: str, *, param: str) -> DecodedVideo:
        """Check the clip `url` names (header only); any refusal raises VideoInputError."""
        try:
            data = await self._sources.read(url, param=param, kind="video", media_types=VIDEO_MEDIA_TYPES)
        except ImageInputError as exc:
            # The shared fetch and file rules speak of images; the caller sent a video.
            message = _IMAGE_WORD.sub("video", str(exc))
            code = (exc.code or "invalid_video_url").replace("image", "video")
            raise VideoInputError(message, param=param, code=code) from None
        return await asyncio.to_thread(probe_video, data, param=param, limits=self.limits, slots=self.decode_slots)
