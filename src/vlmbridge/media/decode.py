"""Turn untrusted image bytes into a bounded RGB PIL image.

Only decoded pixels ever reach transformers: callers' URLs and paths stop here. The pixel count is checked from
the header before any pixel is decoded (a 100-byte PNG can claim 65535×65535), without touching PIL's global
MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

from vlmbridge.errors import ImageInputError

__all__ = ["ALLOWED_FORMATS", "DecodedImage", "decode_image"]

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
MAX_DECODED_PIXELS = 64 * 1024 * 1024  # far above any pixel budget, far below a decompression bomb


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for a processor, with a content digest for caches and logs (never the bytes)."""

    image: Any = field(repr=False)  # PIL.Image.Image, RGB, EXIF orientation applied
    format: str
    digest: str  # sha256 of the decoded RGB pixels and size

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.image.size
        return int(width), int(height)


def decode_image(data: bytes, *, param: str = "image", max_pixels: int = MAX_DECODED_PIXELS) -> DecodedImage:
    """Decode PNG/JPEG/WebP/GIF (first frame)/BMP bytes. Raises ImageInputError with a one-line reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

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
    except Image.DecompressionBombError:
        raise ImageInputError(
            f"image claims more than {max_pixels} pixels (decompression bomb guard)",
            param=param,
            code="image_too_large",
        ) from None
    except (OSError, ValueError) as exc:
        raise ImageInputError(f"image could not be decoded: {exc}", param=param, code="invalid_image") from None
    fmt = img.format or "unknown"
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageInputError("image has no pixels", param=param, code="invalid_image")
    if width * height > max_pixels:
        raise ImageInputError(
            f"image is {width}×{height} = {width * height} pixels, more than the {max_pixels} allowed",
            param=param,
            code="image_too_large",
        )
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP: the first frame
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img) or img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageInputError(f"image could not be decoded: {exc}", param=param, code="invalid_image") from None
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode() + rgb.tobytes()).hexdigest()
    return DecodedImage(image=rgb, format=fmt, digest=digest)


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white, as a viewer shows it, rather than onto black.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # CMYK, P, L, I;16, YCbCr…
