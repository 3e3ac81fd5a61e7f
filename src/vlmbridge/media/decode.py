"""Turn untrusted image bytes into a checked, lazily decoded RGB image.

Only decoded pixels ever reach transformers: callers' URLs and paths stop here. `decode_image` reads the header
only (format, size, EXIF orientation) and checks the pixel count before any pixel is decoded (a 100-byte PNG can
claim 65535×65535), without touching PIL's global MAX_IMAGE_PIXELS. Pixels are decoded on first use — inside the
engine's bounded preparation step, and not at all when the processed pixels are cached — reduced where the format
allows it (JPEG), and at most `slots` at a time.
"""

from __future__ import annotations

import hashlib
import io
import threading
from typing import Any

from vlmbridge.errors import ImageInputError
from vlmbridge.media.limits import DECODE_CAP, JPEG_HEADER_FACTOR, draft_scale

__all__ = ["ALLOWED_FORMATS", "MAX_DECODED_PIXELS", "DecodedImage", "decode_image"]

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
MAX_DECODED_PIXELS = DECODE_CAP  # the default per-image limit outside the server (which derives its own)
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90°


class DecodedImage:
    """An image whose header passed the limits: format, oriented size and a digest of the source bytes, known up
    front; RGB pixels decoded on demand. Never holds or shows the caller's URL.

    `digest` is the sha256 of the bytes as received: caches key on it (with the pixel budget) without decoding.
    """

    def __init__(
        self,
        data: bytes,
        *,
        format: str,
        size: tuple[int, int],
        param: str = "image",
        slots: threading.Semaphore | None = None,
    ) -> None:
        self._data: bytes | memoryview = data  # a memoryview of shared memory in a worker process (engine/sharing)
        self.format = format
        self._size = size
        self.param = param
        self.digest = hashlib.sha256(data).hexdigest()
        self._slots = slots
        self._lock = threading.Lock()
        self._full: Any = None  # the full-size decode, kept once `image` was asked for

    def __getstate__(self) -> dict[str, Any]:
        # Crossing to a worker process: the source bytes and what the header said; never decoded pixels.
        return {
            "data": self._data,
            "format": self.format,
            "size": self._size,
            "param": self.param,
            "digest": self.digest,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._data, self.format, self._size = state["data"], state["format"], tuple(state["size"])
        self.param, self.digest = state["param"], state["digest"]
        self._slots, self._lock, self._full = None, threading.Lock(), None

    def __repr__(self) -> str:
        w, h = self._size
        return f"DecodedImage({self.format} {w}×{h}, {self.digest[:12]})"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation, as the model will see it."""
        return self._size

    @property
    def pixels(self) -> int:
        return self._size[0] * self._size[1]

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def draft_scale(self, max_pixels: int | None) -> int:
        """Per-side reduction a decode for this budget uses: JPEG only (PNG, WebP, GIF and BMP cannot)."""
        if self.format != "JPEG" or max_pixels is None:
            return 1
        return draft_scale(*self._size, max_pixels)

    def decoded_pixels(self, max_pixels: int | None = None) -> int:
        """Pixels a decode for the budget `max_pixels` materializes (None: full size)."""
        s = self.draft_scale(max_pixels)
        w, h = self._size
        return -(-w // s) * -(-h // s)

    @property
    def image(self) -> Any:
        """The full-size RGB PIL image (decoded once, then kept until `release()`)."""
        with self._lock:
            if self._full is None:
                self._full = self._decode(1)
            return self._full

    def decode(self, max_pixels: int | None = None) -> Any:
        """An RGB PIL image for the pixel budget `max_pixels`, reduced where the format allows (not kept).

        Always the same pixels for the same bytes and budget, so caches keyed by (digest, budget) stay exact.
        """
        scale = self.draft_scale(max_pixels)
        with self._lock:
            if scale == 1 and self._full is not None:
                return self._full
        return self._decode(scale)

    def release(self) -> None:
        """Drop the decoded pixels (the bytes stay, so the image can be decoded again)."""
        with self._lock:
            self._full = None

    def _decode(self, scale: int) -> Any:
        if self._slots is None:
            rgb = _decode_rgb(self._data, scale, self.param)
        else:
            with self._slots:
                rgb = _decode_rgb(self._data, scale, self.param)
        if scale == 1 and rgb.size != self._size:  # a PNG eXIf chunk after the pixels rotated it after all
            self._size = (int(rgb.size[0]), int(rgb.size[1]))
        return rgb


def decode_image(
    data: bytes,
    *,
    param: str = "image",
    max_pixels: int = MAX_DECODED_PIXELS,
    slots: threading.Semaphore | None = None,
) -> DecodedImage:
    """Check PNG/JPEG/WebP/GIF (first frame)/BMP bytes from their header; decode nothing yet.

    `max_pixels` bounds the decoded pixels per image (JPEG headers may claim `JPEG_HEADER_FACTOR` times more, as
    they decode reduced). Raises ImageInputError with a one-line reason.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageInputError("image is empty (0 bytes)", param=param, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise ImageInputError(
            "image could not be decoded: not a PNG, JPEG, WebP, GIF or BMP file",
            param=param,
            code="invalid_image",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own guard fires on headers far beyond ours; the size is not known here.
        raise ImageInputError(
            f"image claims far more pixels than the {max_pixels} this server decodes per image",
            param=param,
            code="image_too_large",
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"image could not be decoded: {exc}", param=param, code="invalid_image") from None
    with img:
        fmt = img.format or "unknown"
        width, height = (int(v) for v in img.size)
        if width < 1 or height < 1:
            raise ImageInputError("image has no pixels", param=param, code="invalid_image")
        allowed = max_pixels * (JPEG_HEADER_FACTOR if fmt == "JPEG" else 1)
        if width * height > allowed:
            raise ImageInputError(
                f"image is {width}×{height} = {width * height} pixels, more than the {allowed} this server decodes "
                "per image (16 × its --max-pixels budget, at least 4096×4096, at most 8192×8192; JPEG 4×)",
                param=param,
                code="image_too_large",
            )
        if _orientation(img) in _SWAPS_SIDES:
            width, height = height, width
    return DecodedImage(data, format=fmt, size=(width, height), param=param, slots=slots)


def _orientation(img: Any) -> int:
    """The EXIF orientation (1-8) from the header's EXIF block (JPEG APP1, WebP, PNG eXIf before IDAT), without
    decoding: PIL's PNG getexif() would load the whole image to look for an eXIf chunk after the pixels."""
    from PIL import Image

    raw = img.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112, 1)
    except Exception:  # a broken EXIF block: show the image as stored, as browsers do
        return 1
    return value if isinstance(value, int) else 1


def _decode_rgb(data: bytes | memoryview, scale: int, param: str) -> Any:
    """Decode `data` (already checked) to RGB: first frame, EXIF orientation applied, JPEG reduced by `scale`."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS)) as img:
            if scale > 1:
                w, h = img.size
                img.draft("RGB", (w // scale, h // scale))  # libjpeg's DCT scaling: never reads the full size
            img.load()  # a freshly opened animated GIF/WebP sits on its first frame; counting frames costs a scan
            # Transpose only when EXIF says so: exif_transpose copies the whole image even when nothing changes.
            oriented = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
            return _to_rgb(oriented)
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ImageInputError(f"image could not be decoded: {exc}", param=param, code="invalid_image") from None


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    if img.mode == "RGB":
        return img.copy() if img.readonly else img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white, as a viewer shows it, rather than onto black.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # CMYK, P, L, I;16, YCbCr…
