"""Small files that claim gigabytes of pixels: refused from their headers, before decoding, without the server's
memory moving; large pictures that are allowed decode reduced and give their memory back (issue 12, finding 3)."""

from __future__ import annotations

import base64
import gc
import io
import struct
import threading
import zlib
from typing import Any

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.memory_probe import MiB, peak_rss, rss
from tests.server_utils import MODEL, Server, data_url, image_message, running
from tests.test_media_limits import gif_claiming, jpeg_claiming
from vlmbridge.media.inflight import release_memory

GiB = 1 << 30


def zero_png(width: int, height: int) -> bytes:
    """An all-zero bilevel PNG, compressed row by row (never materialized): 8192×8192 is about 11 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(packer.compress(row * 256) for _ in range(height // 256))
    body += packer.compress(row * (height % 256)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def body_with(*urls: str, detail: str = "high") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u, "detail": detail}} for u in urls]
    parts.append({"type": "text", "text": "hi"})
    return {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}


def settle() -> int:
    gc.collect()
    release_memory()
    return rss()


def healthy(server: Server) -> None:
    r = server.post({"model": MODEL, "messages": image_message(data_url(320, 240, seed=4)), "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Any:
    # Caches off: what they keep by design (up to their budgets) is not memory a request failed to give back.
    with running(tiny_model("qwen3_vl"), pixel_cache_mb=0, encoder_cache_mb=0, prefix_cache_mb=0) as srv:
        healthy(srv)  # imports, the processor's first call and the model's buffers before anything is measured
        yield srv


def test_eight_zero_8192_pngs_are_a_400_that_does_not_move_memory(server: Server) -> None:
    png = zero_png(8192, 8192)
    body = body_with(*[uri(png)] * 8)
    assert len(png) * 8 < 100_000  # the 88 KB request of the report
    before = settle()
    with peak_rss() as probe:
        r = server.post(body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "image_too_large" and "16777216" in error["message"]
    after = settle()
    print(f"\n8×8192² zero PNGs: peak growth {probe.growth / MiB:.1f} MiB, after {(after - before) / MiB:+.1f} MiB")
    assert probe.growth <= 1 * GiB
    assert after - before <= 100 * MiB
    healthy(server)


def test_two_such_requests_at_once(server: Server) -> None:
    body = body_with(*[uri(zero_png(8192, 8192))] * 8)
    before = settle()
    codes: list[int] = []

    def send() -> None:
        codes.append(server.post(body).status_code)

    with peak_rss() as probe:
        threads = [threading.Thread(target=send) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes == [400, 400]
    print(f"\n2 × (8×8192²) at once: peak growth {probe.growth / MiB:.1f} MiB")
    assert probe.growth <= 1 * GiB and settle() - before <= 100 * MiB
    healthy(server)


@pytest.mark.parametrize(
    ("data", "media"),
    [
        (jpeg_claiming(20000, 20000), "image/jpeg"),
        (zero_png(1, 60_000_000), "image/png"),
        (gif_claiming(65535, 65535), "image/gif"),
        (zero_png(16385, 1024), "image/png"),  # one row past 4096² worth of pixels
    ],
    ids=["jpeg-20000²", "png-1×60M", "gif-65535²", "png-16385×1024"],
)
def test_other_bomb_shapes_are_a_400(server: Server, data: bytes, media: str) -> None:
    with peak_rss() as probe:
        r = server.post(body_with(uri(data, media)))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "image_too_large"
    assert probe.growth <= 256 * MiB
    healthy(server)


def test_allowed_large_pictures_decode_bounded_and_give_memory_back(server: Server) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8000, 6000), 128).save(buf, format="JPEG", quality=70)  # 48 MP: decoded at 1/4 per side
    jpeg = uri(buf.getvalue(), "image/jpeg")
    png = uri(zero_png(4096, 4096))  # exactly at the default limit: no draft mode, decoded whole
    before = settle()
    with peak_rss() as probe:
        for url, detail in ((jpeg, "high"), (png, "low")):
            r = server.post(body_with(url, detail=detail))
            assert r.status_code == 200, r.text
    after = settle()
    print(f"\n48 MP JPEG + 4096² PNG: peak {probe.growth / MiB:.1f} MiB, after {(after - before) / MiB:+.1f} MiB")
    assert probe.growth <= 1 * GiB
    assert after - before <= 100 * MiB


def test_a_smaller_budget_lowers_the_decode_limit_but_not_below_4096_squared(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen3_vl"), max_pixels=2048 * 2048) as srv:  # limit: 8192² (the cap)
        assert srv.post(body_with(uri(zero_png(8192, 8192)), detail="low")).status_code == 200
        eight = srv.post(body_with(*[uri(zero_png(8192, 8192))] * 8))  # each fits; together over 4 × 8192²
        assert eight.status_code == 400 and "per request" in eight.json()["error"]["message"]
    with running(tiny_model("qwen3_vl"), max_pixels=256 * 256) as srv:  # limit: the 4096² floor
        assert srv.post(body_with(uri(zero_png(4096, 4096)))).status_code == 200
        assert srv.post(body_with(uri(zero_png(4097, 4096)))).status_code == 400


def test_the_request_body_is_not_the_bottleneck(server: Server) -> None:
    # The eight-image body is tiny; a refused request answers fast (nothing was decoded).
    r = httpx.post(f"{server.v1}/chat/completions", json=body_with(*[uri(zero_png(8192, 8192))] * 8), timeout=30)
    assert r.status_code == 400 and r.elapsed.total_seconds() < 5
