"""One configured model in the pool: its running copy (if any), the copies still draining after a swap or an
unload, its state for /health and /admin, and the in-flight count that keeps it from being evicted.

A request leases the current copy (`lease`) and gives it back when its response ends (`release`); a copy that
was swapped out or unloaded finishes what it holds and only then shuts down. Everything here is quick and under
the slot's lock; loading, eviction and swapping are the pool's (vlmbridge.pool.pool).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Literal

from vlmbridge.engine.base import Engine
from vlmbridge.errors import EngineNotReadyError, VlmbridgeError, WorkerDiedError
from vlmbridge.memtrim import unsettle_heap
from vlmbridge.output.client import ModelClient
from vlmbridge.output.pipeline import TextTools
from vlmbridge.pool.measure import tree_pss_bytes
from vlmbridge.pool.spec import ModelSpec

__all__ = ["Copy", "EngineSlot", "SlotState"]

log = logging.getLogger(__name__)

SlotState = Literal["unloaded", "loading", "ready", "draining", "failed"]


class Copy:
    """One running copy of a model: its engine, the front's client for it, and the requests it holds."""

    def __init__(self, engine: Engine, client: ModelClient | None, path: Path | None, planned: int) -> None:
        self.engine = engine
        self.client = client
        self.path = path
        self.planned = planned
        self.in_flight = 0
        self.peak = 0  # the most it was measured to hold: what serving costs beyond loading

    def memory_bytes(self) -> int:
        """Measured where it can be — on a GPU what the CUDA allocator holds, on the CPU the worker process tree's
        PSS — else the planner's figure."""
        stats = self.engine.stats()
        if stats.device_memory_bytes is not None:
            measured: int | None = stats.device_memory_bytes
        else:
            measured = tree_pss_bytes(stats.worker_pid) if stats.worker_pid else None
        held = measured if measured is not None else self.planned
        self.peak = max(self.peak, held)
        return held

    def client_or_refuse(self, name: str) -> ModelClient:
        if self.client is None:
            raise EngineNotReadyError(f"model {name!r} has no tokenizer in the front; it cannot generate")
        return self.client

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.engine.queue_depth() == 0


class EngineSlot:
    """A served model. Built by the pool from a `ModelSpec`, or (tests, embedding) from an engine or a factory.

    `factory`/`tools` (zero-argument) build the engine and the front's text tools for the slot's own folder;
    with a `spec`, the slot builds them for any folder (a reload from a new path)."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], Engine] | None = None,
        engine: Engine | None = None,
        *,
        tools: Callable[[], TextTools] | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.path: Path | None = spec.path if spec is not None else None
        self.lock = threading.Lock()
        self._factory = factory
        self._tools_factory = tools
        self._given = engine
        self._current: Copy | None = None
        self.draining: list[Copy] = []
        self._failure: str | None = None
        self.code: str | None = None
        self.progress: float | None = None
        self.loading: Future[None] | None = None
        self.last_used: float | None = None
        self.unloading = False
        self.loaded_once = False
        self.loads = 0  # copies installed so far (loads and swaps)
        self.load_seconds: float | None = None

    # --- what it is configured as -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names if self.spec is not None else (self.name,)

    @property
    def pinned(self) -> bool:
        return self.spec.pinned if self.spec is not None else True

    @property
    def on_demand(self) -> bool:
        return self.spec is not None and self.spec.load == "on-demand"

    @property
    def ready_made(self) -> bool:
        """An engine was handed over ready to serve (tests, embedding): nothing loads."""
        return self._given is not None

    @property
    def can_load(self) -> bool:
        return self.spec is not None or self._factory is not None or self._given is not None

    # --- building a copy (blocking; the pool runs it on a loading thread) ---------------------------------------
    def build(self, path: Path | None) -> tuple[Engine, Callable[[], TextTools] | None, bool]:
        """An engine for `path` (None: the slot's own folder), its tools' factory, and whether it still needs
        `start()` (one handed over ready-made does not)."""
        if self._given is not None:
            engine, self._given = self._given, None
            return engine, self._tools_factory, False
        if self.spec is not None:
            from vlmbridge.engine.factory import build_engine

            settings = self.spec.settings
            where = path or self.spec.path

            def tools() -> TextTools:
                from vlmbridge.output.client import load_text_tools

                return load_text_tools(where, settings.trust_remote_code)

            return build_engine(settings, where, self.name), tools, True
        if self._factory is None:
            raise EngineNotReadyError(f"model {self.name!r} has nothing to load it from")
        return self._factory(), self._tools_factory, True

    # --- state ----------------------------------------------------------------------------------------------------
    def install(self, copy: Copy, path: Path | None) -> Copy | None:
        """Make `copy` the one new requests get (atomically); the one it replaces, if any, is returned to drain."""
        with self.lock:
            old, self._current = self._current, copy
            if old is not None:
                self.draining.append(old)
            if path is not None:
                self.path = path
            self._failure, self.code, self.progress = None, None, None
            self.loaded_once = True
            self.loads += 1
            self.last_used = time.time()
        return old

    def fail(self, error: BaseException) -> None:
        if isinstance(error, VlmbridgeError):
            reason = error.message + (f" — fix: {error.fix}" if error.fix else "")
            code = getattr(error, "code", None) or getattr(error, "cause", None) or "load_failed"
        else:
            reason, code = f"{type(error).__name__}: {error}", "load_failed"
        with self.lock:
            self._failure, self.code, self.progress = reason, str(code), None

    def take_current(self, *, only_if_idle: bool) -> Copy | None:
        """Detach the current copy so no new request gets it (to unload it); None if there is none or, with
        `only_if_idle`, if it holds requests (an eviction must never stop one)."""
        with self.lock:
            copy = self._current
            if copy is None or (only_if_idle and not copy.idle):
                return None
            self._current = None
            self.draining.append(copy)
            return copy

    @property
    def current(self) -> Copy | None:
        return self._current

    @property
    def state(self) -> SlotState:
        copy = self._current
        if copy is not None:
            engine_state = copy.engine.state
            if engine_state == "ready":
                return "ready"
            return "failed" if engine_state in ("failed", "stopped") else "loading"
        if self.loading is not None:
            return "loading"
        if self._failure is not None:
            return "failed"
        if self.draining or self.unloading:
            return "draining"
        if self.spec is None and not self.loaded_once:
            return "loading"  # a slot given to the app loads at start-up (or, without a factory, never)
        return "unloaded"

    @property
    def reason(self) -> str:
        copy = self._current
        if copy is not None:
            return copy.engine.state_reason
        if self.loading is not None:
            return "loading the model"
        if self._failure is not None:
            return self._failure
        return "draining" if self.draining else "not loaded"

    @property
    def last_failure(self) -> str | None:
        return self._failure

    def memory_bytes(self) -> int:
        with self.lock:
            copies = [*self.draining, *([self._current] if self._current is not None else [])]
        return sum(c.memory_bytes() for c in copies)

    @property
    def in_flight(self) -> int:
        with self.lock:
            copies = [*self.draining, *([self._current] if self._current is not None else [])]
        return sum(c.in_flight for c in copies)

    # --- requests ---------------------------------------------------------------------------------------------------
    def lease(self) -> Copy:
        """The current copy, counted as in use until `release`; raises if it cannot take requests now."""
        with self.lock:
            copy = self._ready()
            copy.in_flight += 1
            self.last_used = time.time()
            return copy

    def _ready(self) -> Copy:
        """The current copy if it takes requests (the caller holds the lock); raises otherwise."""
        copy = self._current
        if copy is None or copy.engine.state != "ready":
            self._refuse(copy)
        assert copy is not None
        return copy

    def _refuse(self, copy: Copy | None) -> None:
        if copy is not None and copy.engine.state == "restarting":
            raise WorkerDiedError(f"model {self.name!r} is restarting: {copy.engine.state_reason}", code="worker_died")
        code = self.code if copy is None and self._failure is not None else None  # a failed load's cause, e.g. VB104
        raise EngineNotReadyError(f"model {self.name!r} is not ready: {self.reason}", code=code)

    def release(self, copy: Copy) -> None:
        with self.lock:
            copy.in_flight -= 1
            self.last_used = time.time()

    def retire(self, copy: Copy) -> None:
        """Shut a detached copy down (its worker process exits) and forget it."""
        try:
            copy.engine.shutdown()
        except Exception:  # a copy that will not stop cleanly must not keep the others from unloading
            log.exception("model %s: shutting down a copy failed", self.name)
        with self.lock:
            if copy in self.draining:
                self.draining.remove(copy)
        unsettle_heap()  # the unloaded copy's objects can go

    # --- what the single-model app and its tests used -----------------------------------------------------------
    @property
    def engine(self) -> Engine:
        with self.lock:
            return self._ready().engine

    @property
    def client(self) -> ModelClient:
        copy = self._current
        if copy is None or copy.client is None:
            raise EngineNotReadyError(f"model {self.name!r} is not ready: {self.reason}")
        return copy.client

    def peek(self) -> Engine | None:
        copy = self._current
        return copy.engine if copy is not None else None

    def wait_loaded(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            future = self.loading
            if future is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    future.result(remaining)
                except TimeoutError:
                    return
                except Exception:
                    return
                continue
            if self.state != "loading" or not self.can_load or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(0.01)
