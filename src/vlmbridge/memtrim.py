"""Giving freed memory back to the OS after large requests.

glibc keeps freed heap pages (per thread arena) mapped for reuse, so after a 50 MB body or a large image the
process would stay hundreds of MB larger. `malloc_trim(0)` hands them back; it walks the heap (milliseconds), so
callers run it off the event loop and only after large requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import sys

__all__ = ["release_memory"]

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl (Alpine) has none
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory(*, collect: bool = False) -> bool:
    """Ask glibc to return free heap memory to the OS (`malloc_trim(0)`); False where that is not available.

    `collect` first frees what only reference cycles hold (an exception's traceback keeps a request's frames,
    and with them its body). Thread-safe; takes milliseconds on a large heap: call it off the event loop.
    """
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    try:
        trim(0)
    except OSError:  # pragma: no cover - a libc that refuses
        log.debug("malloc_trim failed", exc_info=True)
        return False
    return True
