"""RequestStream: the queue between a backend's producer thread and the front's event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vlmbridge.engine.base import RequestStream


def test_an_item_pushed_from_another_thread_wakes_the_waiting_reader() -> None:
    async def main() -> tuple[object, float]:
        stream: RequestStream[str] = RequestStream("r")
        threading.Timer(0.05, lambda: stream.push("tok")).start()
        started = time.monotonic()
        item = await stream.next(timeout=5)
        return item, time.monotonic() - started

    item, waited = asyncio.run(main())
    assert item == "tok"
    assert 0.03 < waited < 2


def test_a_silent_stream_times_out_at_its_bound_and_keeps_later_items() -> None:
    async def main() -> list[object]:
        stream: RequestStream[str] = RequestStream("r")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await stream.next(timeout=0.1)
        waited = time.monotonic() - started
        stream.push("late", last=True)
        return [waited, await stream.next(timeout=1), await stream.next(timeout=1)]

    waited, item, end = asyncio.run(main())
    assert 0.09 < waited < 1.5
    assert (item, end) == ("late", None)


def test_a_wake_without_an_item_does_not_extend_the_bound() -> None:
    """A wake-up whose item the reader already took (it arrives late) must not restart the wait's clock."""

    async def main() -> float:
        stream: RequestStream[str] = RequestStream("r")
        reading = asyncio.ensure_future(stream.next(timeout=0.3))
        for _ in range(5):  # stray wake-ups every 0.1 s, longer in all than the bound
            await asyncio.sleep(0.1)
            assert stream._ready is not None
            stream._ready.set()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await reading
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.05  # it had already timed out (at 0.3 s) while the wake-ups went on


def test_a_cancelled_wait_loses_no_item() -> None:
    async def main() -> object:
        stream: RequestStream[str] = RequestStream("r")
        reading = asyncio.ensure_future(stream.next(timeout=5))
        await asyncio.sleep(0.02)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        stream.push("kept")
        return await stream.next(timeout=1)

    assert asyncio.run(main()) == "kept"
