"""Test videos, encoded at test time with PyAV: a coloured background and a white bar that moves per frame."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from fractions import Fraction

import numpy as np


def clip_bytes(
    seed: int = 0,
    *,
    frames: int = 10,
    fps: int = 5,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    fmt: str = "mp4",
    rotation: int | None = None,
    times: Sequence[int] | None = None,
    gop: int | None = None,
) -> bytes:
    """A clip of `frames` frames at `fps`; `seed` picks the colours and where the bar starts. `times` (seconds)
    places the frames at those instants instead (a 1-fps time base)."""
    import av

    width, height = size
    rng = np.random.default_rng(seed)
    background, bar = rng.integers(0, 256, 3, dtype=np.uint8), rng.integers(0, 256, 3, dtype=np.uint8)
    start = int(rng.integers(0, max(1, height - 8)))
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=1 if times is not None else fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(len(times) if times is not None else frames):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[:] = background
            top = (start + 4 * i) % max(1, height - 8)
            rgb[top : top + 8, : max(8, width // 3)] = bar
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = times[i], Fraction(1, 1)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_uri(data: bytes, media: str = "video/mp4") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def video_message(url: str, text: str = "What happens in this clip?", **budget: object) -> list[dict[str, object]]:
    return [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url, **budget}}, {"type": "text", "text": text}],
        }
    ]
