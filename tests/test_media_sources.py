"""ImageSources: data URIs of every format, local files under allowed dirs only, http via the guarded fetcher."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_media_fetch import PNG, ImageServer
from vlmbridge.errors import ImageInputError
from vlmbridge.media.decode import DecodedImage, decode_image
from vlmbridge.media.fetch import FetchPolicy, ImageFetcher
from vlmbridge.media.sources import ImageSources, SourcePolicy, parse_data_uri, policy_from_settings

PARAM = "messages[0].content[1].image_url"


def encode(fmt: str, size: tuple[int, int] = (12, 9), **save: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def load(url: str, policy: SourcePolicy | None = None, **kwargs: Any) -> DecodedImage:
    async def go() -> DecodedImage:
        async with ImageSources(policy or SourcePolicy(), **kwargs) as sources:
            return await sources.load(url, param=PARAM)

    result: DecodedImage = asyncio.run(go())
    return result


def refused(url: str, policy: SourcePolicy | None = None, **kwargs: Any) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        load(url, policy, **kwargs)
    err = info.value
    assert err.param == PARAM
    assert "base64," not in err.message and len(err.message) < 300 and "\n" not in err.message
    return err


# --- data URIs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media", "fmt", "data"),
    [
        ("image/png", "PNG", encode("PNG")),
        ("image/jpeg", "JPEG", encode("JPEG")),
        ("image/jpg", "JPEG", encode("JPEG")),
        ("image/webp", "WEBP", encode("WEBP")),
        ("image/gif", "GIF", encode("GIF")),
        ("image/bmp", "BMP", encode("BMP")),
        ("IMAGE/PNG", "PNG", encode("PNG")),
    ],
)
def test_data_uri_formats(media: str, fmt: str, data: bytes) -> None:
    image = load(data_uri(data, media))
    assert image.format == fmt and image.size == (12, 9) and image.image.mode == "RGB"


def test_animated_gif_gives_its_first_frame() -> None:
    image = load(data_uri(animated_gif(), "image/gif"))
    assert image.image.getpixel((5, 5)) == (255, 0, 0)


def test_data_uri_with_extra_parameters_and_mismatched_type() -> None:
    assert load("data:image/png;name=cat.png;base64," + base64.b64encode(PNG).decode()).format == "PNG"
    assert load(data_uri(encode("JPEG"), "image/png")).format == "JPEG"  # the bytes decide, not the label


@pytest.mark.parametrize(
    "payload",
    [
        "@@not-base64@@",
        "xx",
        "iVBORw0KGgo",  # missing padding
        "iVBO Rw0K",  # whitespace
        "iVBO\nRw0K",
        "QQ==QQ==",  # data after padding
        "-_-_",  # URL-safe alphabet
        "=QQ=",
        "é" * 8,
    ],
)
def test_invalid_base64(payload: str) -> None:
    err = refused(f"data:image/png;base64,{payload}")
    assert err.code == "invalid_base64" and payload not in err.message


@pytest.mark.parametrize(
    ("url", "code"),
    [
        (data_uri(PNG, "text/plain"), "unsupported_image_type"),
        (data_uri(PNG, "application/octet-stream"), "unsupported_image_type"),
        ("data:;base64," + base64.b64encode(PNG).decode(), "unsupported_image_type"),
        (data_uri(b"<svg/>", "image/svg+xml"), "unsupported_image_type"),
        (data_uri(PNG, "image/heic"), "unsupported_image_type"),
        ("data:image/png," + "%89PNG", "invalid_image_url"),  # not base64
        ("data:image/png;base64", "invalid_image_url"),  # no comma
        ("data:" + "x" * 5000 + ";base64,AAAA", "invalid_image_url"),  # header far too long
        ("data:image/png;base64,", "invalid_base64"),
        (data_uri(b"definitely not an image"), "invalid_image"),
    ],
)
def test_bad_data_uris(url: str, code: str) -> None:
    err = refused(url)
    assert err.code == code, err.message
    assert "x" * 100 not in err.message


def test_data_uri_size_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("base64 should not be decoded for an oversized payload")

    monkeypatch.setattr(binascii, "a2b_base64", never)
    err = refused("data:image/png;base64," + "A" * 4000, SourcePolicy(max_bytes=2000))
    assert err.code == "image_too_large"
    monkeypatch.undo()
    assert refused(data_uri(b"\0" * 2001), SourcePolicy(max_bytes=2000)).code == "image_too_large"
    assert refused(data_uri(b"\0" * 2000), SourcePolicy(max_bytes=2000)).code == "invalid_image"  # size ok


def test_pixel_limit_applies() -> None:
    assert refused(data_uri(encode("PNG", (20, 20))), SourcePolicy(max_pixels=100)).code == "image_too_large"


def test_parse_data_uri() -> None:
    media, payload = parse_data_uri("data:image/webp;base64,UklG", max_bytes=100, param=PARAM)
    assert (media, payload) == ("image/webp", "UklG")


def test_decoding_runs_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = decode_image

    def spy(data: bytes, **kwargs: Any) -> DecodedImage:
        threads.append(threading.current_thread())
        return real(data, **kwargs)

    monkeypatch.setattr("vlmbridge.media.sources.decode_image", spy)
    load(data_uri(PNG))
    assert threads and threads[0] is not threading.main_thread()


# --- other schemes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["", "   ", "ftp://example.com/cat.png", "javascript:alert(1)", "gopher://x/", "cat.png", "./cat.png",
     "../cat.png", "//example.com/cat.png", "C:\\cat.png", "blob:https://example.com/123", "vbscript:x"],
)  # fmt: skip
def test_other_urls_are_refused(url: str) -> None:
    assert refused(url).code == "invalid_image_url"


# --- local files ---------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (allowed / "sub" / "my cat.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "escape-dir").symlink_to(outside, target_is_directory=True)
    (allowed / "alias.png").symlink_to(allowed / "cat.png")
    (allowed / "big.png").write_bytes(PNG + b"\0" * 5000)
    (tmp_path / "link-to-allowed").symlink_to(allowed, target_is_directory=True)
    return {"root": tmp_path, "allowed": allowed, "outside": outside}


def local(tree: dict[str, Path], **kw: Any) -> SourcePolicy:
    return SourcePolicy(allow_local_dirs=(tree["allowed"],), allow_remote=False, **kw)


def test_local_files_inside_the_allowed_dir(tree: dict[str, Path]) -> None:
    allowed = tree["allowed"]
    for url in (
        str(allowed / "cat.png"),
        (allowed / "cat.png").as_uri(),
        f"file://localhost{allowed}/cat.png",
        (allowed / "sub" / "my cat.png").as_uri(),  # file:///…/my%20cat.png
        str(allowed / "alias.png"),  # a symlink that stays inside
    ):
        assert load(url, local(tree)).size == (8, 6), url


def test_allowed_dir_given_through_a_symlink(tree: dict[str, Path]) -> None:
    policy = SourcePolicy(allow_local_dirs=(tree["root"] / "link-to-allowed",), allow_remote=False)
    assert load(str(tree["root"] / "link-to-allowed" / "cat.png"), policy).size == (8, 6)
    assert load(str(tree["allowed"] / "cat.png"), policy).size == (8, 6)


@pytest.mark.parametrize(
    "relative",
    [
        "../outside/secret.png",
        "sub/../../outside/secret.png",
        "sub/../cat.png",  # stays inside, but '..' is refused outright
        "escape.png",
        "escape-dir/secret.png",
    ],
)
def test_local_escapes_are_refused(tree: dict[str, Path], relative: str) -> None:
    path = f"{tree['allowed']}/{relative}"
    for url in (path, "file://" + path, "file://" + path.replace("..", "%2e%2e")):
        assert refused(url, local(tree)).code == "image_url_refused", url


def test_local_files_outside_and_odd_ones(tree: dict[str, Path]) -> None:
    policy = local(tree)
    assert refused(str(tree["outside"] / "secret.png"), policy).code == "image_url_refused"
    assert refused("/etc/passwd", policy).code == "image_url_refused"
    assert refused(str(tree["allowed"]) + "/sub", policy).code == "image_url_refused"  # a directory
    assert refused(str(tree["allowed"] / "missing.png"), policy).code == "image_fetch_failed"
    assert refused(f"file://otherhost{tree['allowed']}/cat.png", policy).code == "invalid_image_url"
    assert refused((tree["allowed"] / "cat.png").as_uri() + "?x=1", policy).code == "invalid_image_url"
    assert refused(str(tree["allowed"] / "cat.png") + "\x00.png", policy).code == "image_url_refused"
    assert refused(str(tree["allowed"] / "big.png"), local(tree, max_bytes=len(PNG) + 10)).code == "image_too_large"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_in_the_allowed_dir_does_not_hang(tree: dict[str, Path]) -> None:
    os.mkfifo(tree["allowed"] / "pipe.png")
    assert refused(str(tree["allowed"] / "pipe.png"), local(tree)).code == "image_url_refused"


def test_local_files_off_by_default(tree: dict[str, Path]) -> None:
    for url in ((tree["allowed"] / "cat.png").as_uri(), str(tree["allowed"] / "cat.png"), "file:///etc/passwd"):
        err = refused(url, SourcePolicy(allow_remote=False))
        assert err.code == "image_url_refused" and "not enabled" in err.message


# --- http(s) through the fetcher ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    srv = ImageServer("127.0.0.1", Counter())
    yield srv
    srv.stop()


def test_http_url_is_fetched_and_decoded(server: ImageServer) -> None:
    server.hits.clear()
    policy = SourcePolicy(fetch=FetchPolicy(allow_hosts=("localhost",)))
    assert load(f"http://localhost:{server.port}/image.png", policy).size == (8, 6)
    assert server.hits == Counter({"/image.png": 1})


def test_http_refusals_reach_nothing(server: ImageServer) -> None:
    server.hits.clear()
    url = f"http://localhost:{server.port}/image.png"
    assert refused(url).code == "image_url_refused"  # loopback, not allow-listed
    assert refused(url, SourcePolicy(allow_remote=False)).code == "image_url_refused"
    assert sum(server.hits.values()) == 0


def test_a_shared_fetcher_is_left_open(server: ImageServer) -> None:
    async def go() -> None:
        async with ImageFetcher(FetchPolicy(allow_hosts=("localhost",))) as fetcher:
            sources = ImageSources(SourcePolicy(), fetcher=fetcher)
            await sources.load(f"http://localhost:{server.port}/image.png", param=PARAM)
            await sources.aclose()  # not its fetcher to close
            assert await fetcher.fetch(f"http://localhost:{server.port}/image.png", param=PARAM) == PNG

    asyncio.run(go())


def test_policy_from_settings(tmp_path: Path) -> None:
    from vlmbridge.settings import Settings

    settings = Settings(
        max_image_bytes=123_456,
        allow_image_hosts=["api", "172.18.0.0/16"],
        allow_local_dirs=[tmp_path],
        image_fetch_timeout=3.0,
        image_max_redirects=1,
    )
    policy = policy_from_settings(settings)
    assert policy.max_bytes == policy.fetch.max_bytes == 123_456
    assert policy.fetch.allow_hosts == ("api", "172.18.0.0/16") and policy.allow_local_dirs == (tmp_path,)
    assert policy.fetch.total_timeout == 3.0 and policy.fetch.connect_timeout <= 3.0
    assert policy.fetch.max_redirects == 1
