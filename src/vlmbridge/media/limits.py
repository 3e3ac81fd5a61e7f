"""How many pixels the server decodes, derived from the pixel budget rather than fixed.

A picture is resized to at most `max_pixels` before the model sees it, so decoding far more than that only costs
memory: a 90 KB all-zero PNG can claim 8192×8192 and decode into 200 MB. The rules, in decoded pixels:

- per image: 16 × max_pixels (room for a 4× downscale per side), at least 4096×4096 (so everyday photos and 4K
  screenshots pass whatever the budget) and at most 8192×8192. JPEG headers may claim 4× that, because a JPEG is
  decoded reduced (libjpeg's DCT scaling, 1/2 to 1/8 per side) to the smallest scale still above the budget;
- per request (all its images together): 4 × the per-image limit;
- in flight (every request between header check and the end of image processing): `--max-pixels-in-flight`,
  by default 8 × the per-image limit; beyond it a request is answered 429 and retried.

With the default 1024×1024 budget: 16.8 M pixels per image (~50 MB as RGB), 67 M per request, 134 M in flight.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmbridge.settings import Settings

__all__ = [
    "DECODE_CAP",
    "DECODE_FLOOR",
    "JPEG_HEADER_FACTOR",
    "decode_limit",
    "draft_scale",
    "in_flight_limit",
    "request_limit",
]

DECODE_FACTOR = 16
DECODE_FLOOR = 4096 * 4096
DECODE_CAP = 8192 * 8192
JPEG_HEADER_FACTOR = 4  # a JPEG over the limit still decodes at ≤ 1/2 per side, so ≤ 1/4 of its header pixels
REQUEST_FACTOR = 4
IN_FLIGHT_FACTOR = 8


def decode_limit(max_pixels: int) -> int:
    """Most pixels one image may decode into under the server's pixel budget `max_pixels`."""
    return min(max(DECODE_FACTOR * max_pixels, DECODE_FLOOR), DECODE_CAP)


def request_limit(max_pixels: int) -> int:
    """Most decoded pixels all images of one request may add up to."""
    return REQUEST_FACTOR * decode_limit(max_pixels)


def in_flight_limit(settings: Settings) -> int:
    """The server-wide bound on decoded pixels in flight: the setting, or 8 × the per-image limit."""
    if settings.max_pixels_in_flight is not None:
        return settings.max_pixels_in_flight
    return IN_FLIGHT_FACTOR * decode_limit(settings.max_pixels)


def draft_scale(width: int, height: int, max_pixels: int) -> int:
    """The JPEG reduction (1, 2, 4 or 8 per side) that keeps at least `max_pixels`: the image shrinks to the
    budget afterwards anyway, so decoding more only costs memory and time."""
    if max_pixels <= 0 or width * height < 4 * max_pixels:
        return 1
    ratio = math.sqrt(width * height / max_pixels)  # the downscale per side the budget asks for
    return max(s for s in (1, 2, 4, 8) if s <= ratio)
