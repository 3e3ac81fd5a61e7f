"""A server-wide bound on decoded image pixels in flight, and giving freed memory back to the OS.

A request reserves its images' decoded pixels (known from their headers, before any decoding) when it starts
preparing, and gives them back once the image processor is done with them. Over the bound it gets a 429 with
Retry-After instead of pushing the process into swap or the OOM killer. glibc keeps freed heap pages (per thread
arena) mapped, so after a request with large images the reservation asks it to return them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from vlmbridge.errors import ImageInputError, QueueFullError
from vlmbridge.media.decode import DecodedImage
from vlmbridge.memtrim import release_memory

__all__ = ["TRIM_AFTER_PIXELS", "PixelGate", "PixelReservation"]

log = logging.getLogger(__name__)

TRIM_AFTER_PIXELS = 4 * 1024 * 1024  # ~12 MB of RGB: below that, what glibc keeps is not worth a trim
RETRY_AFTER_S = 1.0  # image preparation takes well under a second per request; retry soon


class PixelGate:
    """Counts decoded pixels reserved by requests; refuses a reservation that would pass `limit`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight pixel limit must be positive")
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()
        self._trimming = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def hold(self, pixels: int, images: Iterable[DecodedImage] = ()) -> PixelReservation:
        """Reserve `pixels` now (429 QueueFullError when over the bound, 400 when it can never fit).

        The reservation gives them back when its `with`/`async with` block ends or `release()` is called, and
        drops the decoded pixels of `images` then.
        """
        if pixels > self.limit:
            raise ImageInputError(
                f"the request's images (and video frames) decode to {pixels} pixels, more than the {self.limit} this "
                "server holds at once; send fewer or smaller images or clips",
                param="messages",
                code="image_too_large",
            )
        with self._lock:
            if pixels and self._in_flight + pixels > self.limit:
                raise QueueFullError(
                    f"the server is decoding {self._in_flight} pixels, and this request's {pixels} would pass "
                    f"its limit of {self.limit}; retry in a moment",
                    retry_after=RETRY_AFTER_S,
                    code="pixels_in_flight",
                )
            self._in_flight += pixels
        return PixelReservation(self, pixels, tuple(images))

    def _give_back(self, pixels: int) -> None:
        with self._lock:
            self._in_flight -= pixels
        if pixels >= TRIM_AFTER_PIXELS:
            self._trim_in_background()

    def _trim_in_background(self) -> None:
        # malloc_trim walks the whole heap (milliseconds on a large one): never on the event loop, one at a time.
        if not self._trimming.acquire(blocking=False):
            return

        def run() -> None:
            try:
                release_memory()
            finally:
                self._trimming.release()

        threading.Thread(target=run, name="vlmbridge-trim", daemon=True).start()


class PixelReservation:
    """Pixels held for one request; a context manager (sync or async). Releasing twice is harmless."""

    def __init__(self, gate: PixelGate, pixels: int, images: tuple[DecodedImage, ...]) -> None:
        self.gate = gate
        self.pixels = pixels
        self._images = images
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for image in self._images:
            image.release()
        self.gate._give_back(self.pixels)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
