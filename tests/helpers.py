"""Small helpers shared by tests (pictures as decoded images, messages)."""

from __future__ import annotations

import io
from typing import Any

from vlmbridge.engine.types import ChatMessage, ImagePart, PixelBudget, TextPart
from vlmbridge.media.decode import DecodedImage, decode_image
from vlmbridge.output.client import ChunkStream, ModelClient
from vlmbridge.output.pipeline import TextTools
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


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width×height (a decompression-bomb shape): only the header is real."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def generate(engine: Any, request: Any) -> ChunkStream:
    """A request through the front's output pipeline, as the server runs it (the engine speaks token ids)."""
    return ModelClient(engine, TextTools(engine.loaded.tokenizer)).generate(request)
