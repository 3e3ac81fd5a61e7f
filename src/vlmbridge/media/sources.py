"""Where an `image_url` may come from, and the one entry point that turns it into a decoded image.

Accepted: base64 `data:image/...` URIs, http(s) URLs through the guarded `ImageFetcher`, and local files below
an allowed directory (off by default; `file://` URLs or absolute paths). Everything else is refused, with a
pointed message for the relative `/files/…?sign=…` links Dify sends when its FILES_URL is empty. Callers' URLs
and paths stop here: only `DecodedImage` objects (header checked, pixels decoded later, at most
`decode_slots` at a time) go on to the processor.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import unquote, urlsplit

from vlmbridge.errors import ImageInputError
from vlmbridge.media.decode import MAX_DECODED_PIXELS, DecodedImage, decode_image
from vlmbridge.media.fetch import FetchPolicy, ImageFetcher
from vlmbridge.media.limits import decode_limit

if TYPE_CHECKING:
    from vlmbridge.settings import Settings

__all__ = [
    "IMAGE_MEDIA_TYPES",
    "RELATIVE_FILE_URL_MESSAGE",
    "ImageSources",
    "SourcePolicy",
    "parse_data_uri",
    "policy_from_settings",
]

# Media types a data URI may declare; the decoder still sniffs the real format from the bytes.
IMAGE_MEDIA_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif", "image/bmp", "image/x-ms-bmp"}
)
_MAX_HEADER_CHARS = 256  # `data:image/png;name=…;base64` — anything longer is not a real client
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,40}/[a-z0-9][a-z0-9.+-]{0,60}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,15}):")
# What Dify sends with an empty FILES_URL: its own file route, relative, signed with a query string.
RELATIVE_FILE_URL_MESSAGE = (
    "image URL is a relative link (/files/…), which this server cannot resolve: Dify sends these when its FILES_URL "
    "is empty. Set FILES_URL in Dify's .env to an address the model server can reach (docker-compose: "
    "FILES_URL=http://api:5001) and allow that host here (--allow-image-host api)"
)


@dataclass(frozen=True)
class SourcePolicy:
    """What `ImageSources` accepts. `max_bytes` bounds data URIs and files; `fetch.max_bytes` bounds downloads."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_DECODED_PIXELS  # decoded pixels per image (the server derives it from its budget)
    decode_slots: int = 2  # images decoded at once, server-wide (each can take ~8 bytes per pixel briefly)
    allow_remote: bool = True
    allow_local_dirs: tuple[Path, ...] = ()
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_local_dirs", tuple(Path(d) for d in self.allow_local_dirs))
        if self.max_bytes < 1 or self.max_pixels < 1 or self.decode_slots < 1:
            raise ValueError("max_bytes, max_pixels and decode_slots must be positive")


def policy_from_settings(settings: Settings) -> SourcePolicy:
    """The server's image policy from its settings (one byte limit for downloads, data URIs and files)."""
    total = settings.image_fetch_timeout
    return SourcePolicy(
        max_bytes=settings.max_image_bytes,
        max_pixels=decode_limit(settings.max_pixels),
        allow_local_dirs=tuple(settings.allow_local_dirs),
        fetch=FetchPolicy(
            allow_hosts=tuple(settings.allow_image_hosts),
            max_bytes=settings.max_image_bytes,
            connect_timeout=min(5.0, total),
            read_timeout=min(10.0, total),
            total_timeout=total,
            max_redirects=settings.image_max_redirects,
        ),
    )


def parse_data_uri(
    url: str, *, max_bytes: int, param: str, kind: str = "image", media_types: frozenset[str] = IMAGE_MEDIA_TYPES
) -> tuple[str, str]:
    """(media type, base64 payload) of a `data:image/…;base64,` URI (`kind`/… for videos), with the size checked
    before decoding."""
    comma = url.find(",", 0, 5 + _MAX_HEADER_CHARS + 1)
    if comma < 0:
        raise ImageInputError("data URI has no ',' after a short header", param=param, code="invalid_image_url")
    media_type, *params = (p.strip().lower() for p in url[5:comma].split(";"))
    if not params or params[-1] != "base64":
        raise ImageInputError(
            "data URI must be base64-encoded (';base64' before the comma)", param=param, code="invalid_image_url"
        )
    if not media_type.startswith(f"{kind}/"):
        shown = repr(media_type) if _MEDIA_TYPE.match(media_type) else f"a non-{kind} type"
        raise ImageInputError(
            f"data URI media type must be {kind}/*, got {shown}", param=param, code=f"unsupported_{kind}_type"
        )
    if media_type not in media_types:
        shown = repr(media_type) if _MEDIA_TYPE.match(media_type) else f"this {kind} type"
        formats = "PNG, JPEG, WebP, GIF or BMP" if kind == "image" else "MP4, MOV, WebM or Matroska"
        raise ImageInputError(f"{shown} is not supported; send {formats}", param=param, code=f"unsupported_{kind}_type")
    payload = url[comma + 1 :]
    if len(payload) > 4 * ((max_bytes + 2) // 3):
        raise ImageInputError(
            f"data URI image is about {len(payload) * 3 // 4} bytes, more than the {max_bytes} allowed",
            param=param,
            code="image_too_large",
        )
    if not payload:
        raise ImageInputError("data URI holds no data", param=param, code="invalid_base64")
    return media_type, payload


def _decode_base64(payload: str, *, param: str) -> bytes:
    # strict_mode: standard alphabet only, correct padding, nothing after it, no whitespace.
    try:
        return binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ImageInputError(
            "data URI is not valid base64 (standard alphabet, padded, no whitespace)",
            param=param,
            code="invalid_base64",
        ) from None


class ImageSources:
    """Loads `image_url` values under a `SourcePolicy`. Create one per app; `await aclose()` at shutdown.

    A `fetcher` passed in stays the caller's to close; otherwise one is created from `policy.fetch`.
    """

    def __init__(self, policy: SourcePolicy | None = None, *, fetcher: ImageFetcher | None = None) -> None:
        self.policy = policy or SourcePolicy()
        # allow_remote=False wins over a fetcher passed in: no URL is fetched then.
        self._owns_fetcher = fetcher is None and self.policy.allow_remote
        self._fetcher = (fetcher or ImageFetcher(self.policy.fetch)) if self.policy.allow_remote else None
        # (as configured, resolved): a path is checked against both before and after resolving symlinks.
        self._dirs = tuple((d.absolute(), d.resolve()) for d in self.policy.allow_local_dirs)
        self.decode_slots = threading.BoundedSemaphore(self.policy.decode_slots)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_fetcher and self._fetcher is not None:
            await self._fetcher.aclose()

    async def load(self, url: str, *, param: str) -> DecodedImage:
        """Check the image `url` names (header only; pixels decode later); any refusal raises ImageInputError."""
        url = url.strip()
        if url[:5].lower() == "data:":  # base64-decoded and checked in one thread hop
            _, payload = parse_data_uri(url, max_bytes=self.policy.max_bytes, param=param)
            return await asyncio.to_thread(self._decode_payload, payload, param)
        data = await self.read(url, param=param)
        return await asyncio.to_thread(self._check, data, param)

    async def read(
        self, url: str, *, param: str, kind: str = "image", media_types: frozenset[str] = IMAGE_MEDIA_TYPES
    ) -> bytes:
        """The bytes `url` names (data URI, guarded download or allowed local file), at most `policy.max_bytes`;
        any refusal raises ImageInputError (its messages say `kind`: the same rules serve videos)."""
        url = url.strip()
        if not url:
            raise ImageInputError(f"{kind} URL is empty", param=param, code=f"invalid_{kind}_url")
        scheme_match = _SCHEME.match(url)
        scheme = scheme_match.group(1).lower() if scheme_match else ""
        if scheme == "data":
            _, payload = parse_data_uri(
                url, max_bytes=self.policy.max_bytes, param=param, kind=kind, media_types=media_types
            )
            return await asyncio.to_thread(self._payload_bytes, payload, param)
        if scheme in ("http", "https"):
            if self._fetcher is None:
                raise ImageInputError(
                    "this server does not fetch image URLs; send the image as a base64 data URI",
                    param=param,
                    code="image_url_refused",
                )
            return await self._fetcher.fetch(url, param=param)
        if not scheme and self._is_relative_file_url(url):
            raise ImageInputError(RELATIVE_FILE_URL_MESSAGE, param=param, code="relative_file_url")
        if scheme == "file" or (not scheme and url.startswith("/") and not url.startswith("//")):
            path = self._local_path(url, param)
            return await asyncio.to_thread(self._read_local, path, param)
        if scheme:
            shown = f"{scheme!r} " if len(scheme) <= 10 else ""
            raise ImageInputError(
                f"image URL scheme {shown}is not supported; use https://, http:// or a data:image/...;base64 URI",
                param=param,
                code="invalid_image_url",
            )
        raise ImageInputError(
            "image_url must be an http(s) URL or a data:image/...;base64 URI", param=param, code="invalid_image_url"
        )

    def _is_relative_file_url(self, url: str) -> bool:
        """A scheme-less link with a query string, or below /files/ (Dify's file route) unless that is an allowed
        local directory: no file path carries `?timestamp=…&sign=…`."""
        if url.startswith("//"):
            return False  # protocol-relative: a host without a scheme, refused as an invalid URL
        if "?" in url:
            return True
        if not url.startswith("/files/"):
            return False
        path = Path(url)
        return not any(path.is_relative_to(d) for pair in self._dirs for d in pair)

    def _check(self, data: bytes, param: str) -> DecodedImage:
        return decode_image(data, param=param, max_pixels=self.policy.max_pixels, slots=self.decode_slots)

    def _decode_payload(self, payload: str, param: str) -> DecodedImage:
        return self._check(self._payload_bytes(payload, param), param)

    def _payload_bytes(self, payload: str, param: str) -> bytes:
        data = _decode_base64(payload, param=param)
        if len(data) > self.policy.max_bytes:
            raise ImageInputError(
                f"data URI image is {len(data)} bytes, more than the {self.policy.max_bytes} allowed",
                param=param,
                code="image_too_large",
            )
        return data

    def _local_path(self, url: str, param: str) -> Path:
        """The absolute path `url` names, checked lexically against the allowed dirs (no filesystem access)."""
        if not self._dirs:
            raise ImageInputError(
                "local image files are not enabled on this server", param=param, code="image_url_refused"
            )
        raw = url
        if url[:5].lower() == "file:":
            parts = urlsplit(url)
            try:
                if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
                    raise ValueError("file URL with a host, query or fragment")
                raw = unquote(parts.path, errors="strict")
            except ValueError:  # UnicodeDecodeError included
                raise ImageInputError(
                    "file URL must be file:///absolute/path (UTF-8, no host, query or fragment)",
                    param=param,
                    code="invalid_image_url",
                ) from None
        path = Path(raw)
        if "\x00" in raw or not path.is_absolute() or ".." in path.parts:
            raise ImageInputError(
                "local image path must be absolute, without '..'", param=param, code="image_url_refused"
            )
        if not any(path.is_relative_to(d) for pair in self._dirs for d in pair):
            raise ImageInputError(
                "local image path is outside the allowed directories", param=param, code="image_url_refused"
            )
        return path

    def _read_local(self, path: Path, param: str) -> bytes:
        """Read at most max_bytes of a regular file whose real path (symlinks resolved) stays inside."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ImageInputError("local image file not found", param=param, code="image_fetch_failed") from None
        if not any(real.is_relative_to(resolved) for _, resolved in self._dirs):
            raise ImageInputError(
                "local image path leads outside the allowed directories", param=param, code="image_url_refused"
            )
        limit = self.policy.max_bytes
        try:
            # O_NOFOLLOW/O_NONBLOCK: a symlink swapped in after the check, or a FIFO, cannot trap us.
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            raise ImageInputError("local image file cannot be opened", param=param, code="image_fetch_failed") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageInputError("local image path is not a regular file", param=param, code="image_url_refused")
            if not self._opened_inside(fd):
                raise ImageInputError(
                    "local image path leads outside the allowed directories", param=param, code="image_url_refused"
                )
            if info.st_size > limit:
                raise ImageInputError(
                    f"local image is {info.st_size} bytes, more than the {limit} allowed",
                    param=param,
                    code="image_too_large",
                )
            chunks: list[bytes] = []
            remaining = limit + 1  # the file may grow after fstat: read one byte past the limit at most
            while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 20))):
                chunks.append(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > limit:
            raise ImageInputError(
                f"local image is more than the {limit} bytes allowed", param=param, code="image_too_large"
            )
        return data

    def _opened_inside(self, fd: int) -> bool:
        # Where the kernel says the open file lives (Linux): closes the race of a directory swapped mid-check.
        link = f"/proc/self/fd/{fd}"
        if not os.path.exists(link):
            return True
        opened = Path(os.readlink(link))
        return any(opened.is_relative_to(resolved) for _, resolved in self._dirs)
