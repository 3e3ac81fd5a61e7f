"""Resident memory of this process (the in-process test server included), sampled while something runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

MiB = 1 << 20


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@dataclass
class Peak:
    before: int
    peak: int = 0

    @property
    def growth(self) -> int:
        return self.peak - self.before


@contextmanager
def peak_rss(interval: float = 0.005) -> Iterator[Peak]:
    """Samples RSS every `interval` seconds on a thread; `growth` is the peak above the starting figure."""
    probe = Peak(before=rss())
    probe.peak = probe.before
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            probe.peak = max(probe.peak, rss())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield probe
    finally:
        stop.set()
        thread.join()
        probe.peak = max(probe.peak, rss())
