"""Small helpers shared by tests (pictures as decoded images, messages)."""

from __future__ import annotations

import io

from vlmbridge.engine.types import ChatMessage, ImagePart, PixelBudget, TextPart
from vlmbridge.media.decode import DecodedImage, decode_image
from vlmbridge.tiny.images import demo_picture, noise_picture


def png_bytes(width: int = 320, height: int = 240, seed: int | None = 0) -> bytes:
    img = demo_picture(width, height) if seed is None else noise_picture(width, height, seed)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decoded(width: int = 320, height: int = 240, seed: int | None = 0) -> DecodedImage:
    return decode_image(png_bytes(width, height, seed))


def image_question(
    image: DecodedImage, text: str = "What is in this picture?", max_pixels: int = 1024 * 1024
) -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", (ImagePart(image, PixelBudget(max_pixels=max_pixels)), TextPart(text))),)
