"""Threads in a process that runs a CPU engine: one multi-threaded torch pool (the engine's), names the OS shows.

torch's CPU kernels run on GNU OpenMP, which keeps a pool of worker threads for every thread that ever ran a
parallel kernel. Once the pools together hold more threads than there are CPUs, every pool's workers stop spinning
between kernels and sleep on a futex instead (libgomp's throttled spin count), so each of a decode step's ~60
parallel kernels waits for a wake-up. Measured on 2 cores: a 1536×384 bf16 linear took 33 µs on the engine's 2
threads alone and 80 µs once one other thread had run a parallel kernel (45 µs on 1 thread). So every thread but
the engine's runs torch on itself alone, and loading happens on a thread that ends (its pool goes with it).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["in_passing_thread", "name_os_thread", "os_thread_name", "side_thread", "torch_on_this_thread_only"]

T = TypeVar("T")
_PR_SET_NAME = 15  # prctl(2)
_OS_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last a NUL


def os_thread_name(name: str) -> str:
    """The name a thread called `name` in Python gets from the OS: `vlmbridge-prepare_0` → `vb-prepare_0`."""
    return name.replace("vlmbridge-", "vb-", 1).encode()[:_OS_NAME_BYTES].decode(errors="ignore")


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread its Python name (or `name`) in the OS's thread list: `top -H`, `ps -L`, py-spy.
    The OpenMP workers a thread starts inherit its name, which is how `ps -L` tells whose pool they are."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_NAME, os_thread_name(name or threading.current_thread().name).encode(), 0, 0, 0)


def torch_on_this_thread_only() -> None:
    """Run the calling thread's torch CPU ops on the thread itself, never on an OpenMP pool of its own."""
    import torch

    if torch.get_num_threads() != 1:  # the setting is per thread; set only once
        torch.set_num_threads(1)


def side_thread() -> None:
    """Initializer for a pool's threads that are not the engine's: an OS name, and torch on the thread alone."""
    name_os_thread()
    torch_on_this_thread_only()


def in_passing_thread(work: Callable[[], T], name: str) -> T:
    """`work()` on a new thread that ends when it returns, so the torch pool it used (loading is parallel) ends too."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=name_os_thread) as once:
        return once.submit(work).result()
