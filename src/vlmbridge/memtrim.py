"""Giving freed memory back to the OS after large requests; keeping the collector off long-lived objects.

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

__all__ = ["release_memory", "settle_heap", "unsettle_heap"]

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


def settle_heap(*, full: bool = False) -> None:
    """After a model loaded: what is alive now is long-lived (torch, transformers, a tokenizer: hundreds of
    thousands of objects) and moves where the collector no longer walks it. Full passes over that heap took
    0.1-0.2 s in the front and 0.4 s in a vLLM worker, each stalling every stream (vLLM's API server freezes its
    heap the same way). `full` collects everything first (a worker, once); the front collects only the young
    generations, so a server starting many models does not pay a full pass each time."""
    gc.collect(2 if full else 1)
    gc.freeze()


def unsettle_heap() -> None:
    """After a model unloaded: its objects become collectable again (the next load freezes what is left)."""
    gc.unfreeze()
