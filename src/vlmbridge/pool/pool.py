"""Several models behind one server: load on first request, evict the least recently used idle model when a new one
would not fit the memory budget, unload after `keep_alive`, swap a model's weights without dropping requests.

    pool = ModelPool(slots, budget=8 << 30)
    pool.start()                                  # `load: startup` models begin loading; the keep-alive reaper runs
    copy = await pool.acquire(slot)               # loads it if needed (one load however many wait), leases it
    ...; slot.release(copy)                       # when the response has ended
    pool.reload("name", Path("/models/new"))      # new worker, warm-up, atomic switch; the old one drains

Memory accounting: a loaded model counts what its worker process tree holds (PSS, measured); a model about to load
reserves the planner's estimate plus what an idle worker process costs (measured once, corrected by every load)
before it starts, and eviction makes room for that first. One reservation at a time (`_admit`), so two loads
never count on the same free memory; a model with requests in flight or queued is never evicted, nor a pinned one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from vlmbridge.budget import format_bytes
from vlmbridge.errors import EngineNotReadyError, MemoryBudgetError, ModelNotFoundError, VlmbridgeError
from vlmbridge.memtrim import settle_heap
from vlmbridge.output.client import ModelClient
from vlmbridge.pool.measure import idle_worker_bytes
from vlmbridge.pool.prepare import FolderFacts, folder_facts, planned_bytes, run_doctor
from vlmbridge.pool.slot import Copy, EngineSlot

__all__ = ["ModelPool", "wait_for_load"]

log = logging.getLogger(__name__)

_REAP_S = 0.25  # how often idle models are checked against their keep_alive
_EXPECTED_LOAD_S = 10.0  # the progress estimate for a model's first load; later ones use the last load's time


class ModelPool:
    def __init__(self, slots: Iterable[EngineSlot], *, budget: int | None = None, on_gpu: bool = False) -> None:
        """`budget`: bytes all models may hold together (None: not counted); `on_gpu`: the budget is GPU memory,
        counted from the engines' allocator figures (an idle worker's RAM is not part of it)."""
        self.slots: dict[str, EngineSlot] = {}
        self._names: dict[str, EngineSlot] = {}
        for slot in slots:
            self.slots[slot.name] = slot
            for name in slot.names:
                self._names[name] = slot
        if not self.slots:
            raise ValueError("a pool needs at least one model")
        self.budget = budget
        self.on_gpu = on_gpu
        self._lock = threading.Lock()
        self._admit = threading.Lock()
        self._reserved: dict[int, int] = {}
        self._tokens = itertools.count(1)
        self._baseline: int | None = None
        self._stop = threading.Event()
        self._facts: dict[str, FolderFacts] = {}

    # --- names ------------------------------------------------------------------------------------------------------
    @property
    def default(self) -> EngineSlot:
        return next(iter(self.slots.values()))

    def resolve(self, name: str | None) -> EngineSlot:
        """The slot serving `name` (a name or an alias; None = the first configured model)."""
        if name is None:
            return self.default
        slot = self._names.get(name)
        if slot is None:
            served = ", ".join(repr(n) for n in self.slots)
            raise ModelNotFoundError(f"model {name!r} is not served here; this server serves {served}")
        return slot

    def facts(self, slot: EngineSlot) -> FolderFacts:
        """Context, modality and quantization from the folder's config (cached), for models not loaded."""
        if slot.spec is None or slot.path is None:
            return FolderFacts(None, None, None)
        key = f"{slot.name}\0{slot.path}"
        if key not in self._facts:
            self._facts[key] = folder_facts(slot.spec.settings, slot.path)
        return self._facts[key]

    # --- life -------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        for slot in self.slots.values():
            if slot.ready_made:  # nothing to load: serving from the first request on, as the caller expects
                self._run_load(slot, None, self.begin_load(slot, inline=True))
            elif not slot.on_demand and slot.can_load:
                self.begin_load(slot)
        if any(s.spec is not None and s.spec.keep_alive is not None for s in self.slots.values()):
            threading.Thread(target=self._reap, name="vlmbridge-keep-alive", daemon=True).start()

    def shutdown(self) -> None:
        self._stop.set()
        for slot in self.slots.values():
            copy = slot.take_current(only_if_idle=False)
            for old in [*slot.draining, *([copy] if copy is not None else [])]:
                slot.retire(old)

    @property
    def startup_ready(self) -> bool:
        """Every model that loads at start-up is ready (what /health's 200 means)."""
        return all(s.state == "ready" for s in self.slots.values() if not s.on_demand)

    # --- requests ---------------------------------------------------------------------------------------------------
    def pending_load(self, slot: EngineSlot) -> Future[None] | None:
        """The load a request for `slot` should wait for (starting it if the model is unloaded), or None when
        the request should go ahead (or be refused) as things are."""
        if slot.current is not None:
            return None
        future = slot.loading
        if future is not None:
            # At start-up a model that is still loading answers 503 (the health check gates traffic); a load
            # that requests started is waited for.
            return future if slot.on_demand or slot.loaded_once else None
        if slot.last_failure is not None or slot.spec is None:
            return None  # a failed model is reloaded by an operator (`vlmbridge models load`), not per request
        return self.begin_load(slot)

    async def acquire(self, slot: EngineSlot) -> Copy:
        """Lease the slot's model for one request, loading it first if it is not loaded."""
        for _ in range(3):  # a model can be unloaded again between its load and the lease (keep_alive 0)
            future = self.pending_load(slot)
            if future is not None:
                await wait_for_load(slot, future)
            try:
                return slot.lease()
            except EngineNotReadyError:
                if slot.current is not None or slot.last_failure is not None or slot.spec is None:
                    raise
        return slot.lease()

    # --- admin actions (blocking: call them off the event loop) -----------------------------------------------------
    def load(self, name: str) -> None:
        """Load the model now (a failed one is tried again); returns once it is ready, raises if it failed."""
        slot = self.resolve(name)
        if slot.current is None:
            self.begin_load(slot, retry=True).result()

    def unload(self, name: str, timeout: float | None = None) -> None:
        """Stop giving the model new requests, let those it holds finish (within `timeout`), then stop it."""
        slot = self.resolve(name)
        future = slot.loading
        if future is not None:
            try:
                future.result()
            except Exception:
                return
        copy = slot.take_current(only_if_idle=False)
        if copy is not None:
            self._drain(slot, copy, timeout)

    def reload(self, name: str, path: Path | None = None) -> None:
        """Hot swap: load a new copy (new weights in the folder, or `path`), switch to it once warmed up; the old
        one finishes its requests and exits. If the new one fails, the old one keeps serving and this raises."""
        slot = self.resolve(name)
        if slot.spec is None and path is not None:
            raise EngineNotReadyError(f"model {name!r} was given to the server ready-made; it cannot load a new path")
        while (under_way := slot.loading) is not None:  # a load already under way is not this swap: let it end
            with contextlib.suppress(Exception):
                under_way.result()
        self.begin_load(slot, path, swap=True, retry=True).result()

    # --- loading ------------------------------------------------------------------------------------------------------
    def begin_load(
        self,
        slot: EngineSlot,
        path: Path | None = None,
        *,
        swap: bool = False,
        retry: bool = False,
        inline: bool = False,
    ) -> Future[None]:
        """Start loading the slot (once: a load under way is shared) on a thread (`inline`: the caller runs
        `_run_load` itself); the future says how it ended."""
        with slot.lock:
            if slot.loading is not None:
                return slot.loading
            future: Future[None] = Future()
            if slot.current is not None and not swap:
                future.set_result(None)
                return future
            if slot.last_failure is not None and not retry and slot.current is None:
                future.set_exception(EngineNotReadyError(f"model {slot.name!r} failed: {slot.last_failure}"))
                return future
            slot.loading, slot.progress = future, 0.0
        if inline:
            return future
        threading.Thread(
            target=self._run_load, args=(slot, path, future), name=f"load-{slot.name}", daemon=True
        ).start()
        return future

    def _run_load(self, slot: EngineSlot, path: Path | None, future: Future[None]) -> None:
        try:
            self._load(slot, path)
        except BaseException as exc:
            if not isinstance(exc, MemoryBudgetError):  # no room now is not a broken model: it may fit later
                slot.fail(exc)
            log.error("model %s: loading failed: %s", slot.name, exc)
            with slot.lock:
                slot.loading, slot.progress = None, None
            if not future.done():
                future.set_exception(exc)
            return
        with slot.lock:
            slot.loading, slot.progress = None, None
        if not future.done():
            future.set_result(None)

    def _load(self, slot: EngineSlot, path: Path | None) -> None:
        started = time.monotonic()
        where = path or slot.path
        planned = 0
        if slot.spec is not None and where is not None:
            if slot.spec.doctor or path is not None:
                run_doctor(slot.spec.settings, where)
            slot.progress = 0.1
            try:
                planned = planned_bytes(slot.spec.settings, where)
            except (VlmbridgeError, OSError, ValueError) as exc:
                # The doctor passed (or was skipped): let the load say what is wrong; its memory is measured after.
                log.warning("model %s: no memory plan (%s); counting the worker's measured size only", slot.name, exc)
        in_process = slot.spec is None or slot.spec.settings.engine_worker != "process"
        # Without a budget nothing is counted: skip measuring an idle worker (an interpreter importing torch). On a
        # GPU the plan already holds the CUDA context, and a worker's RAM is not GPU memory.
        counts_worker = not in_process and self.budget is not None and not self.on_gpu
        need = planned + (self._idle_worker() if counts_worker else 0)
        token = self._reserve(slot, need)
        try:
            slot.progress = 0.2
            ticker = threading.Thread(target=self._tick, args=(slot, started), daemon=True)
            ticker.start()
            engine, tools, start = slot.build(where)
            try:
                if start:
                    engine.start()
                client = ModelClient(engine, tools()) if tools is not None else None
            except BaseException:
                engine.shutdown()  # a worker that failed to load exits with it
                raise
            copy = Copy(engine, client, where, planned)
            old = slot.install(copy, path)
        finally:
            with self._lock:
                self._reserved.pop(token, None)
        slot.load_seconds = time.monotonic() - started
        if counts_worker:
            self._learn(copy)
        log.info(
            "model %s: loaded in %.1f s (%s)",
            slot.name,
            slot.load_seconds,
            format_bytes(copy.memory_bytes(), binary=True),
        )
        settle_heap()  # the front's share of the model (its tokenizer; all of it in-process) is long-lived
        if old is not None:
            threading.Thread(target=self._drain, args=(slot, old), name=f"drain-{slot.name}", daemon=True).start()

    def _tick(self, slot: EngineSlot, started: float) -> None:
        """Progress while the engine loads, estimated from how long this model's last load took (engines do not
        report loading progress across the process boundary)."""
        expected = slot.load_seconds or _EXPECTED_LOAD_S
        while slot.loading is not None and not self._stop.is_set():
            done = min((time.monotonic() - started) / expected, 0.95)
            if slot.progress is not None:
                slot.progress = max(slot.progress, 0.2 + 0.75 * done)
            time.sleep(0.2)

    def _idle_worker(self) -> int:
        """What a worker holds beyond its plan: measured once for an idle one, then the most any loaded worker was
        seen to hold beyond its plan (a model serving long streams holds more than one just loaded)."""
        served = [
            c.peak - c.planned
            for s in self.slots.values()
            for c in [*s.draining, *([s.current] if s.current is not None else [])]
            if c.peak
        ]
        with self._lock:
            if self._baseline is not None:
                self._baseline = max(self._baseline, *served)
                return self._baseline
        try:
            measured = idle_worker_bytes()
        except (OSError, RuntimeError) as exc:
            log.warning("%s; counting idle workers as 0 bytes until a load is measured", exc)
            measured = 0
        with self._lock:
            self._baseline = max(self._baseline or 0, measured)
            return self._baseline

    def _learn(self, copy: Copy) -> None:
        """What a loaded worker holds beyond the plan: the next reservation counts at least that much."""
        overhead = copy.memory_bytes() - copy.planned
        with self._lock:
            self._baseline = max(self._baseline or 0, overhead)

    # --- memory ------------------------------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """What the loaded and draining models hold now (measured), plus what loads under way reserved."""
        with self._lock:
            reserved = sum(self._reserved.values())
        return reserved + sum(slot.memory_bytes() for slot in self.slots.values())

    def _reserve(self, slot: EngineSlot, need: int) -> int:
        with self._admit:
            while self.budget is not None:
                used = self.used_bytes()
                if used + need <= self.budget:
                    break
                victim = self._victim(slot)
                if victim is not None:
                    copy = victim.take_current(only_if_idle=True)
                    if copy is not None:
                        log.info(
                            "model %s: unloading (least recently used) to make room for %s", victim.name, slot.name
                        )
                        victim.retire(copy)
                    continue
                current = slot.current
                if current is not None and slot.spec is not None:
                    # A swap that cannot hold two copies: drain the old one first (requests wait for the new one).
                    log.warning("model %s: no room for two copies; draining the old one before loading", slot.name)
                    taken = slot.take_current(only_if_idle=False)
                    if taken is not None:
                        self._drain(slot, taken)
                    continue
                raise MemoryBudgetError(
                    f"model {slot.name!r} needs about {format_bytes(need, binary=True)}; "
                    f"{format_bytes(used, binary=True)} of the {format_bytes(self.budget, binary=True)} memory budget "
                    "is held by models that are busy, pinned or loading",
                    fix="retry when a model is idle, unload one (vlmbridge models unload), or raise --memory-budget",
                    code="memory_budget",
                )
            token = next(self._tokens)
            with self._lock:
                self._reserved[token] = need
            return token

    def _victim(self, loading: EngineSlot) -> EngineSlot | None:
        """The least recently used model that is loaded, ready, idle and not pinned."""
        candidates = [
            s
            for s in self.slots.values()
            if s is not loading
            and not s.pinned
            and s.loading is None
            and (c := s.current) is not None
            and c.engine.state == "ready"
            and c.idle
        ]
        return min(candidates, key=lambda s: s.last_used or 0.0, default=None)

    def _drain(self, slot: EngineSlot, copy: Copy, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not copy.idle and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        slot.retire(copy)

    def _reap(self) -> None:
        while not self._stop.wait(_REAP_S):
            now = time.time()
            for slot in self.slots.values():
                keep = slot.spec.keep_alive if slot.spec is not None else None
                copy = slot.current
                if keep is None or copy is None or slot.loading is not None or not copy.idle:
                    continue
                if now - (slot.last_used or now) >= keep:
                    taken = slot.take_current(only_if_idle=True)
                    if taken is not None:
                        log.info(
                            "model %s: idle for %.0f s (keep_alive); unloading",
                            slot.name,
                            now - (slot.last_used or now),
                        )
                        slot.retire(taken)


async def wait_for_load(slot: EngineSlot, future: Future[None]) -> None:
    """Await a load; its failure reaches the request as a 503 that names the model and the cause."""
    try:
        await asyncio.shield(asyncio.wrap_future(future))  # a request that gives up must not cancel the load
    except EngineNotReadyError:
        raise
    except VlmbridgeError as exc:
        code = getattr(exc, "code", None) or slot.code
        raise EngineNotReadyError(
            f"model {slot.name!r} failed to load: {exc.message}", fix=exc.fix, code=code
        ) from None
    except Exception as exc:
        raise EngineNotReadyError(f"model {slot.name!r} failed to load: {type(exc).__name__}: {exc}") from None
