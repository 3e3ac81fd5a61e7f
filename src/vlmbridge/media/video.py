"""Turn untrusted video bytes into checked, lazily decoded clips (PyAV, FFmpeg's own codecs in a wheel).

Decoding happens from bytes in memory only, with the container format sniffed from its magic bytes and passed to
FFmpeg explicitly from an allowlist (mp4/mov, matroska/webm): FFmpeg's playlist and list demuxers (hls, concat,
image2, …) would otherwise open URLs and files on their own, and probing is never asked to guess. The codec must be
on `ALLOWED_CODECS`. `probe_video` reads the header only — container, codec, frame size, duration, frame count —
and checks them before a frame is decoded (a 2-frame file can claim ten hours, a 100 KB one 8K frames). Frames are
decoded on demand (`frames`), bounded in frames walked and wall time, rotated as the display matrix says (phone
clips), reduced to the pixel budget, and sampled uniformly at the requested fps within `max_frames`, with the
timestamp of every frame kept (Qwen3-VL writes them into the prompt).

Codec choice: h264, hevc, vp8, vp9, av1 and mpeg4 (part 2) — what phones, browsers and screen recorders write.
Lossless/intra codecs (ffv1, rawvideo, png, mjpeg…) are refused: they are not what clients send, and they make
decoding cost proportional to the claimed frame size rather than to the upload.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from vlmbridge.errors import VideoInputError

__all__ = [
    "ALLOWED_CODECS",
    "DecodedVideo",
    "VideoFrames",
    "VideoLimits",
    "VideoSampling",
    "probe_video",
    "sample_times",
    "sniff_container",
]

ALLOWED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4"})
_MKV_MAGIC = b"\x1a\x45\xdf\xa3"  # EBML header: Matroska and WebM
SEEK_GAP_S = 2.0  # a target this far past the last decoded frame is reached by seeking, not by decoding through


def sniff_container(data: bytes) -> str | None:
    """The FFmpeg demuxer for these bytes ("mov,mp4" family or "matroska"), or None when not on the allowlist."""
    if data[4:8] == b"ftyp":  # ISO base media (mp4, mov, m4v, 3gp): the file-type box comes first
        return "mp4"
    if data[:4] == _MKV_MAGIC:
        return "matroska"
    return None


@dataclass(frozen=True)
class VideoLimits:
    """Hard bounds checked from the header, then again while decoding (a header may lie)."""

    max_seconds: float = 600.0
    max_frame_pixels: int = 3840 * 2160  # 4K UHD; the frame size the header claims
    max_source_frames: int = 36000  # frames walked in one decode (10 minutes at 60 fps)
    decode_timeout: float = 60.0  # wall seconds for one clip's decode


@dataclass(frozen=True)
class VideoSampling:
    """How frames are picked: uniformly at `fps` frames per second, at most `max_frames` of them, each reduced to
    at most `max_pixels` (None: as decoded). Part of every cache key."""

    fps: float = 2.0
    max_frames: int = 32
    max_pixels: int | None = None

    def key(self) -> str:
        return f"{self.fps:g}fps-{self.max_frames}f-{self.max_pixels}px"


@dataclass(frozen=True)
class VideoFrames:
    """Decoded frames, backend-neutral: RGB uint8 arrays (H, W, 3) of one size, each with its time in seconds.

    `source_fps` and `duration` describe the clip the frames came from (what a processor's metadata wants)."""

    frames: tuple[Any, ...]
    timestamps: tuple[float, ...]
    source_fps: float
    duration: float
    decoded: int = 0  # frames the decoder produced to find these (seeking skips the rest)

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.frames[0].shape[:2]
        return int(w), int(h)


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """Target times: every 1/fps seconds from 0 over `duration`, spread uniformly when that exceeds max_frames."""
    count = max(1, min(max_frames, math.floor(duration * fps + 1e-9) or 1))
    if count == 1:
        return [0.0]
    if duration * fps <= max_frames:
        return [i / fps for i in range(count)]
    step = duration / count  # cover the whole clip: the last target sits one step before its end
    return [i * step for i in range(count)]


class DecodedVideo:
    """A video whose header passed the limits; frames decoded on demand. Never holds or shows the caller's URL.

    `digest` is the sha256 of the bytes as received: caches key on it (with the sampling) without decoding."""

    def __init__(
        self,
        data: bytes,
        *,
        container: str,
        codec: str,
        size: tuple[int, int],
        duration: float | None,
        source_fps: float | None,
        limits: VideoLimits,
        param: str = "video",
        slots: threading.Semaphore | None = None,
    ) -> None:
        self._data: bytes | memoryview = data  # a memoryview of shared memory in a worker process (engine/sharing)
        self.container = container
        self.codec = codec
        self.size = size  # (width, height) as stored; rotation shows at decode
        self.duration = duration
        self.source_fps = source_fps
        self.limits = limits
        self.param = param
        self.digest = hashlib.sha256(data).hexdigest()
        self._slots = slots

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slots"] = None  # crossing to a worker process: bytes and header facts only
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        w, h = self.size
        return f"DecodedVideo({self.container}/{self.codec} {w}×{h}, {self.duration}s, {self.digest[:12]})"

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def frames(self, sampling: VideoSampling) -> VideoFrames:
        """Decode and sample (at most `slots` clips at a time). Raises VideoInputError on a bad or over-limit file."""
        if self._slots is None:
            return self._decode(sampling)
        with self._slots:
            return self._decode(sampling)

    def _decode(self, sampling: VideoSampling) -> VideoFrames:
        import av

        fps_src = self.source_fps or sampling.fps
        # Unknown duration: sample as if it were the longest allowed; targets past the end stay unused.
        targets = sample_times(self.duration or self.limits.max_seconds, sampling.fps, sampling.max_frames)
        picked: list[Any] = []
        times: list[float] = []
        walk = _Walk(self.limits, self.param, fps_src)
        try:
            with av.open(io.BytesIO(self._data), mode="r", format=self.container) as container:
                stream = container.streams.video[0]
                base = stream.time_base
                start = float(stream.start_time * base) if stream.start_time and base else 0.0
                frames = iter(container.decode(stream))
                seeking, i = base is not None, 0
                while i < len(targets):
                    behind = walk.position
                    jumped = seeking and start + targets[i] - behind > SEEK_GAP_S
                    if jumped and base is not None:
                        # Far ahead (a long clip under max_frames): jump to the keyframe before the target
                        # instead of decoding everything in between.
                        container.seek(int((start + targets[i]) / base), stream=stream, backward=True)
                        frames = iter(container.decode(stream))
                        walk.restart = None
                    found = walk.until(frames, start + targets[i])
                    if jumped and walk.restart is not None and walk.restart <= behind:
                        seeking = False  # keyframes too sparse: the jump went back; decoding on is cheaper
                    if found is None:
                        break
                    frame, t = found
                    picked.append(self._rgb(frame, sampling.max_pixels))
                    times.append(t - start)
                    while i < len(targets) and start + targets[i] <= t:
                        i += 1  # one frame serves every target it already passed
        except VideoInputError:
            raise
        except Exception as exc:  # whatever FFmpeg or the conversion makes of these bytes, they are the caller's
            raise VideoInputError(
                f"video could not be decoded: {str(exc)[:200]}", param=self.param, code="invalid_video"
            ) from None
        if not picked:
            raise VideoInputError("video holds no decodable frame", param=self.param, code="invalid_video")
        duration = self.duration if self.duration is not None else walk.last + 1 / fps_src
        return VideoFrames(tuple(picked), tuple(times), float(fps_src), float(duration), decoded=walk.count)

    def _rgb(self, frame: Any, max_pixels: int | None) -> Any:
        import numpy as np

        w, h = frame.width, frame.height
        if max_pixels is not None and w * h > 2 * max_pixels:
            # Reduced while converting (2× the budget: the processor's own resize still decides the last step).
            scale = math.sqrt(2 * max_pixels / (w * h))
            w, h = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
        rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
        turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
        # The display matrix rotates counterclockwise by `rotation` degrees (as FFmpeg's autorotate applies it).
        return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


class _Walk:
    """Frames decoded for one clip, against the limits: frames walked, time reached, wall time spent."""

    def __init__(self, limits: VideoLimits, param: str, fps: float) -> None:
        self.limits, self.param, self.fps = limits, param, fps
        self.deadline = time.monotonic() + limits.decode_timeout
        self.count = 0
        self.position = 0.0  # time of the frame decoded last (seconds, as stored)
        self.last = 0.0
        self.restart: float | None = 0.0  # time of the first frame decoded after a seek (None: none yet)

    def until(self, frames: Any, target: float) -> tuple[Any, float] | None:
        """The first frame at or after `target` (seconds, as stored); None when the clip ends first."""
        limits = self.limits
        for frame in frames:
            self.count += 1
            t = float(frame.time) if frame.time is not None else (self.count - 1) / self.fps
            self.position, self.last = t, max(self.last, t)
            if self.restart is None:
                self.restart = t
            if self.count > limits.max_source_frames or t > limits.max_seconds:
                raise VideoInputError(
                    f"video runs past {limits.max_source_frames} frames or {limits.max_seconds:g} s while decoding "
                    "(more than its header said)",
                    param=self.param,
                    code="video_too_long",
                )
            if time.monotonic() > self.deadline:
                raise VideoInputError(
                    f"video took longer than {limits.decode_timeout:g} s to decode",
                    param=self.param,
                    code="video_decode_timeout",
                )
            if t + 1e-6 >= target:
                return frame, t
        return None


def probe_video(
    data: bytes,
    *,
    param: str = "video",
    limits: VideoLimits | None = None,
    slots: threading.Semaphore | None = None,
) -> DecodedVideo:
    """Check video bytes from their header (container, codec, frame size, duration, frame count); decode nothing."""
    import av

    limits = limits or VideoLimits()
    if not data:
        raise VideoInputError("video is empty (0 bytes)", param=param, code="invalid_video")
    container_name = sniff_container(data)
    if container_name is None:
        raise VideoInputError(
            "video format not recognised: send MP4/MOV or Matroska/WebM", param=param, code="unsupported_video_format"
        )
    try:
        with av.open(io.BytesIO(data), mode="r", format=container_name) as container:
            if not container.streams.video:
                raise VideoInputError("the file holds no video stream", param=param, code="invalid_video")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            codec = str(ctx.name)
            width, height = int(ctx.width or 0), int(ctx.height or 0)
            duration = _duration(stream, container, limits.max_source_frames)
            frames = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate
            source_fps = float(rate) if rate else None
    except VideoInputError:
        raise
    except Exception as exc:  # a file FFmpeg cannot read is the caller's input, never a 500
        raise VideoInputError(f"video could not be read: {str(exc)[:200]}", param=param, code="invalid_video") from None
    if codec not in ALLOWED_CODECS:
        raise VideoInputError(
            f"video codec {codec[:32]!r} is not accepted; send H.264, HEVC, VP8, VP9, AV1 or MPEG-4",
            param=param,
            code="unsupported_video_codec",
        )
    if width < 1 or height < 1:
        raise VideoInputError("video has no frame size in its header", param=param, code="invalid_video")
    if width * height > limits.max_frame_pixels:
        raise VideoInputError(
            f"video frames are {width}×{height} = {width * height} pixels, more than the {limits.max_frame_pixels} "
            "this server decodes per frame",
            param=param,
            code="video_too_large",
        )
    if duration is not None and duration > limits.max_seconds:
        raise VideoInputError(
            f"video is {duration:.0f} s long, more than the {limits.max_seconds:g} s allowed",
            param=param,
            code="video_too_long",
        )
    if frames > limits.max_source_frames:
        raise VideoInputError(
            f"video has {frames} frames, more than the {limits.max_source_frames} this server decodes per clip",
            param=param,
            code="video_too_long",
        )
    if source_fps is not None and not (0 < source_fps <= 1000):
        source_fps = None  # nonsense rates (1/36000 for two frames ten hours apart) say nothing useful
    return DecodedVideo(
        data, container=container_name, codec=codec, size=(width, height), duration=duration,
        source_fps=source_fps, limits=limits, param=param, slots=slots,
    )  # fmt: skip


def _duration(stream: Any, container: Any, max_packets: int) -> float | None:
    """Seconds from the stream header, else the container's (FFmpeg's AV_TIME_BASE microseconds), else the last
    packet's end found by demuxing (no decoding, at most `max_packets`); None if still unknown."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return float(container.duration) / 1_000_000
    end = None
    for n, packet in enumerate(container.demux(stream)):
        if n >= max_packets or packet.pts is None or packet.time_base is None:
            break
        end = max(end or 0.0, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    return end
