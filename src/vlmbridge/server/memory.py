"""Giving freed memory back to the OS after large requests.

A 50 MB body arrives in thousands of small chunks; once freed, glibc keeps that heap for reuse instead of
returning it, so the process would stay hundreds of MB larger after every huge request. `malloc_trim(0)` hands it
back; it takes milliseconds, so it runs only after large requests, off the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import cache

__all__ = ["LARGE_REQUEST_BYTES", "release_memory"]

LARGE_REQUEST_BYTES = 8 << 20


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> None:
    """Free what only reference cycles still hold (an exception's traceback keeps the request's frames, and with
    them its body), then return the allocator's free heap pages to the OS (glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
