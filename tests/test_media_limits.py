"""Decode limits derived from the pixel budget, lazy and reduced decoding, the in-flight pixel gate, malloc_trim."""

from __future__ import annotations

import asyncio
import io
import struct
import sys
import threading
import time
from typing import Any

import pytest

from tests.helpers import png_claiming
from vlmbridge.engine.types import ChatMessage, GenerationRequest, ImagePart, PixelBudget, TextPart
from vlmbridge.errors import ImageInputError, QueueFullError
from vlmbridge.media.decode import DecodedImage, decode_image
from vlmbridge.media.inflight import TRIM_AFTER_PIXELS, PixelGate
from vlmbridge.media.limits import (
    DECODE_CAP,
    DECODE_FLOOR,
    decode_limit,
    draft_scale,
    in_flight_limit,
    request_limit,
)
from vlmbridge.media.sources import policy_from_settings
from vlmbridge.memtrim import release_memory
from vlmbridge.server.convert import hold_images, request_pixels
from vlmbridge.settings import Settings


def encode(fmt: str, size: tuple[int, int], mode: str = "RGB", **save: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 90 if mode == "L" else (10, 200, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF header is rewritten to claim width×height."""
    data = bytearray(encode("JPEG", (16, 16)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width×height around one 1×1 frame."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


# --- the rules ------------------------------------------------------------------------------------------------


def test_decode_limit_follows_the_budget_within_floor_and_cap() -> None:
    assert decode_limit(1024 * 1024) == 16 * 1024 * 1024  # the default budget: 4096×4096
    assert decode_limit(512 * 512) == DECODE_FLOOR  # small budgets still take 4K screenshots
    assert decode_limit(2048 * 2048) == DECODE_CAP == 8192 * 8192
    assert decode_limit(16384 * 32 * 32) == DECODE_CAP
    assert request_limit(1024 * 1024) == 4 * decode_limit(1024 * 1024)
    assert in_flight_limit(Settings()) == 8 * decode_limit(1024 * 1024)
    assert in_flight_limit(Settings(max_pixels_in_flight=20_000_000)) == 20_000_000
    assert policy_from_settings(Settings(max_pixels=512 * 512)).max_pixels == DECODE_FLOOR


@pytest.mark.parametrize(
    ("size", "budget", "scale"),
    [((4000, 3000), 1024 * 1024, 2), ((8000, 6000), 1024 * 1024, 4), ((8192, 8192), 512 * 512, 8),
     ((1024, 1024), 1024 * 1024, 1), ((2000, 1000), 1024 * 1024, 1), ((30000, 30000), 3136, 8)],
)  # fmt: skip
def test_draft_scale_keeps_at_least_the_budget(size: tuple[int, int], budget: int, scale: int) -> None:
    assert draft_scale(*size, budget) == scale
    w, h = size
    assert scale == 1 or (w // scale) * (h // scale) >= budget


# --- header checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        png_claiming(8192, 8192),
        png_claiming(1, 60_000_000),
        png_claiming(65535, 65535),
        jpeg_claiming(20000, 20000),
        gif_claiming(65535, 65535),
        gif_claiming(30000, 1000),
    ],
    ids=["png-8192²", "png-1×60M", "png-65535²", "jpeg-20000²", "gif-65535²", "gif-30000×1000"],
)
def test_bomb_headers_are_refused_before_decoding(data: bytes) -> None:
    with pytest.raises(ImageInputError) as info:
        decode_image(data, param="p", max_pixels=decode_limit(1024 * 1024))
    assert info.value.code == "image_too_large" and info.value.param == "p"
    assert "16777216" in info.value.message or "far more" in info.value.message  # names the limit


def test_the_limit_is_named_and_jpeg_headers_get_four_times_it() -> None:
    limit = 1000 * 1000
    with pytest.raises(ImageInputError) as info:
        decode_image(encode("PNG", (1001, 1000)), max_pixels=limit)
    assert f"{limit}" in info.value.message and "1001×1000" in info.value.message
    jpeg = decode_image(encode("JPEG", (2000, 1900)), max_pixels=limit)  # 3.8 M ≤ 4 × 1 M
    assert jpeg.size == (2000, 1900)
    with pytest.raises(ImageInputError):
        decode_image(encode("JPEG", (2001, 2000)), max_pixels=limit)


def test_decoding_waits_until_the_pixels_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    import vlmbridge.media.decode as decode_module

    real = decode_module._decode_rgb

    def spy(data: bytes, scale: int, param: str) -> Any:
        calls.append(scale)
        return real(data, scale, param)

    monkeypatch.setattr(decode_module, "_decode_rgb", spy)
    data = encode("PNG", (40, 30))
    image = decode_image(data)
    assert calls == [] and image.size == (40, 30) and image.format == "PNG"
    assert image.digest == __import__("hashlib").sha256(data).hexdigest()  # the bytes' digest, no decoding
    assert image.image.size == (40, 30) and image.image is image.image and calls == [1]
    image.release()
    assert image.image.mode == "RGB" and calls == [1, 1]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_the_header_check_reads_no_pixels(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image, ImageFile

    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(fmt, (40, 30), **({"exif": exif.tobytes()} if fmt in ("PNG", "JPEG", "WEBP") else {}))

    def refuse(self: Any) -> Any:
        raise AssertionError("pixels decoded during the header check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    image = decode_image(data)  # PIL's PNG getexif() alone would load the whole picture
    monkeypatch.undo()
    expected = (30, 40) if fmt in ("PNG", "JPEG", "WEBP") else (40, 30)
    assert image.size == expected and image.image.size == expected


def test_broken_pixel_data_fails_when_decoded_with_the_param() -> None:
    data = encode("PNG", (64, 64))
    truncated = data[: len(data) // 2]
    image = decode_image(truncated, param="messages[0].content[0].image_url")  # the header is intact
    with pytest.raises(ImageInputError) as info:
        image.decode()
    assert info.value.code == "invalid_image" and info.value.param == "messages[0].content[0].image_url"


def test_exif_rotation_is_known_from_the_header() -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (1, 2, 3)).save(buf, format="JPEG", exif=exif.tobytes())
    image = decode_image(buf.getvalue())
    assert image.size == (20, 40) and image.image.size == (20, 40)


def test_large_jpegs_decode_reduced_to_the_budget() -> None:
    data = encode("JPEG", (4000, 3000), quality=50)
    image = decode_image(data, max_pixels=decode_limit(512 * 512))
    budget = 512 * 512
    assert image.draft_scale(budget) == 4 and image.decoded_pixels(budget) == 1000 * 750
    reduced = image.decode(budget)
    assert reduced.size == (1000, 750) and reduced.mode == "RGB"
    assert image.decode(budget).tobytes() == reduced.tobytes()  # the same pixels every time
    assert image.decode(None).size == (4000, 3000)
    png = decode_image(encode("PNG", (4000, 3000)), max_pixels=decode_limit(512 * 512))
    assert png.draft_scale(budget) == 1 and png.decoded_pixels(budget) == 12_000_000  # PNG has no draft mode


def test_decodes_run_at_most_slots_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmbridge.media.decode as decode_module

    running, peak = 0, 0
    lock = threading.Lock()

    def slow(data: bytes, scale: int, param: str) -> Any:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        from PIL import Image

        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(decode_module, "_decode_rgb", slow)
    slots = threading.BoundedSemaphore(2)
    images = [decode_image(encode("PNG", (8, 8)), slots=slots) for _ in range(6)]
    threads = [threading.Thread(target=img.decode) for img in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2


# --- per request and in flight ----------------------------------------------------------------------------------


def request_with(*images: tuple[DecodedImage, int]) -> GenerationRequest:
    parts = tuple(ImagePart(img, PixelBudget(max_pixels=budget)) for img, budget in images)
    return GenerationRequest(messages=(ChatMessage("user", (*parts, TextPart("hi"))),))


def test_the_gate_reserves_refuses_and_gives_back() -> None:
    gate = PixelGate(1000)
    first = gate.hold(600)
    assert gate.in_flight == 600
    with pytest.raises(QueueFullError) as info:
        gate.hold(500)
    assert info.value.code == "pixels_in_flight" and info.value.retry_after > 0
    with pytest.raises(ImageInputError) as too_big:
        gate.hold(1001)  # could never fit: not worth retrying
    assert too_big.value.code == "image_too_large"
    first.release()
    first.release()  # twice is harmless
    assert gate.in_flight == 0

    async def go() -> None:
        async with gate.hold(1000) as held:
            assert gate.in_flight == 1000 and held.pixels == 1000
        assert gate.in_flight == 0

    asyncio.run(go())
    with pytest.raises(RuntimeError), gate.hold(10):
        raise RuntimeError("prepare failed")
    assert gate.in_flight == 0


def test_hold_images_counts_reduced_jpegs_and_drops_decoded_pixels() -> None:
    jpeg = decode_image(encode("JPEG", (4000, 3000)), max_pixels=decode_limit(1024 * 1024))
    png = decode_image(encode("PNG", (300, 200)))
    request = request_with((jpeg, 1024 * 1024), (png, 1024 * 1024))
    assert request_pixels(request) == 2000 * 1500 + 300 * 200
    gate = PixelGate(10_000_000)
    with hold_images(gate, request):
        assert png.image is not None and png._full is not None  # decoded while held
        assert gate.in_flight == 2000 * 1500 + 300 * 200
    assert png._full is None and gate.in_flight == 0


def test_the_per_request_sum_is_checked_before_decoding() -> None:
    from vlmbridge.server.convert import to_generation_request
    from vlmbridge.server.schemas import ChatCompletionRequest

    settings = Settings(max_pixels=1024 * 1024)
    pngs = [decode_image(encode("PNG", (16, 16))) for _ in range(5)]

    async def fake_load(url: str, param: str) -> DecodedImage:
        image = pngs[int(url)]
        image._size = (4096, 4000)  # each under the 16.7 M image limit; five together over the 67 M request one
        return image

    body = ChatCompletionRequest.model_validate({
        "model": "m",
        "messages": [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": str(i)}} for i in range(5)), {"type": "text", "text": "hi"}]}],
    })  # fmt: skip
    with pytest.raises(ImageInputError) as info:
        asyncio.run(to_generation_request(body, settings, fake_load))
    assert info.value.code == "image_too_large" and str(request_limit(1024 * 1024)) in info.value.message
    assert all(p._full is None for p in pngs)


# --- giving memory back -----------------------------------------------------------------------------------------


def test_release_memory_calls_malloc_trim_where_there_is_one() -> None:
    result = release_memory()
    if sys.platform.startswith("linux"):
        import ctypes.util

        libc = ctypes.util.find_library("c") or ""
        assert result is ("musl" not in libc)
    else:
        assert result is False


def test_a_large_reservation_trims_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    trimmed = threading.Event()
    monkeypatch.setattr("vlmbridge.media.inflight.release_memory", lambda: trimmed.set() or True)
    gate = PixelGate(TRIM_AFTER_PIXELS * 2)
    gate.hold(TRIM_AFTER_PIXELS - 1).release()
    assert not trimmed.wait(0.2)
    gate.hold(TRIM_AFTER_PIXELS).release()
    assert trimmed.wait(5)
