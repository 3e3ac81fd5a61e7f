"""An engine in its own worker process, behind the same contract: `ProcessEngine` is what the front holds.

Requests go to the worker over a Unix socket (images and videos as their source bytes, decoded there; large ones
in shared memory, see `sharing`); outputs, acknowledgements and heartbeats come back on a reader thread.
Supervision lives here: when the worker dies (out of memory, a native crash, kill -9) or stops beating, only its
requests fail — with `WorkerDiedError` (503, code `worker_died`, the cause in the message) — and it restarts with
backoff; a third crash within five minutes leaves the model `failed` with the cause until an operator acts (no
crash loop). Unloading a model frees all of its memory: the process exits.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmbridge.engine import sharing
from vlmbridge.engine.base import EngineInfo, EngineState, PromptStats, RequestStream, wake_streams
from vlmbridge.engine.types import ChatMessage, EngineOutput, EngineStats, GenerationRequest
from vlmbridge.engine.wire import decode_error, decode_output
from vlmbridge.errors import EngineNotReadyError, ModelLoadError, WorkerDiedError

if TYPE_CHECKING:
    from vlmbridge.settings import ModelSettings

__all__ = ["ProcessEngine"]

log = logging.getLogger(__name__)

_BACKOFF_S = (1.0, 2.0, 4.0)
_CRASHES, _CRASH_WINDOW_S = 3, 300.0
_ANSWER_S = 300.0  # a worker that neither accepts nor refuses a request in this long is treated as stuck


def _worker_env(python: str) -> dict[str, str] | None:
    """Another interpreter imports the vlmbridge this front runs (not whatever its venv holds), first on its path."""
    if python == sys.executable:
        return None
    import vlmbridge

    source = str(Path(vlmbridge.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group (the worker and every process it started), and remove the shared-memory
    segments its processes had mapped: vLLM's message queues (`/dev/shm/psm_*`, 160-250 MB each) outlive a
    SIGKILL, and a container's /dev/shm (64 MB by default in Docker) would soon be full of them."""
    segments = _group_segments(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for path in segments:  # whoever still maps one keeps its memory until it exits
        with contextlib.suppress(OSError):
            os.unlink(path)


def _group_segments(pgid: int) -> set[str]:
    """The /dev/shm/psm_* files (multiprocessing.shared_memory's names) that processes of group `pgid` map."""
    found: set[str] = set()
    if not sys.platform.startswith("linux"):
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            with open(f"/proc/{entry.name}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find("/dev/shm/psm_")
                    if at >= 0:
                        found.add(line[at:].split()[0])
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


class ProcessEngine:
    prepares_in_process = False  # the worker templates and decodes; `generate` here only waits for its answer

    def __init__(
        self,
        model: ModelSettings,
        path: Path,
        name: str,
        *,
        beat_timeout: float = 10.0,
        python: str | None = None,
    ) -> None:
        """`python`: the worker's interpreter (default: this one); another venv's (vLLM's) runs this same
        vlmbridge code, found through PYTHONPATH."""
        self._model_json = model.model_dump_json()
        self._path = str(path)
        self._name = name
        self._beat_timeout = beat_timeout
        self._python = python or sys.executable
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._sock: socket.socket | None = None  # the same socket as `_conn`: it carries shared inputs' descriptors
        self._shared_bytes = 0  # input bytes handed over in shared memory instead of through the socket
        self._info: EngineInfo | None = None
        self._state: EngineState = "loading"
        self._reason = "starting the worker process"
        self._streams: dict[str, RequestStream[EngineOutput]] = {}
        self._waiting: dict[str, Future[None]] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._stats = EngineStats()
        self._last_beat = time.monotonic()
        self._crashes: deque[float] = deque(maxlen=_CRASHES)
        self._stopping = threading.Event()
        self._generation = 0  # which worker the reader and watchdog threads belong to
        self._ready: Future[None] = Future()  # the current worker loaded the model (or failed to)

    # --- contract ----------------------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineNotReadyError(f"model {self._name!r} is not loaded yet")
        return self._info

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def state_reason(self) -> str:
        return self._reason

    @property
    def pid(self) -> int | None:
        """The worker's process id (None while there is none)."""
        return self._proc.pid if self._proc is not None else None

    def start(self, *, warm_up: bool = True) -> None:
        """Start the worker and wait until it loaded and warmed up the model (the worker always warms up)."""
        self._spawn()
        error = self._ready.exception()
        if error is not None:
            raise error

    def generate(
        self, request: GenerationRequest, stream: RequestStream[EngineOutput] | None = None
    ) -> RequestStream[EngineOutput]:
        if self._state != "ready":
            raise EngineNotReadyError(f"model {self._name!r} is not ready: {self._reason}")
        rid = request.request_id
        stream = stream if stream is not None else RequestStream(rid)
        answer: Future[None] = Future()
        with self._lock:
            self._streams[rid] = stream
            self._waiting[rid] = answer
        try:
            self._send(("generate", request))
            answer.result(timeout=_ANSWER_S)  # the worker templated it and processed its images, or refused
        except TimeoutError:
            self._kill(f"no answer to a request for {_ANSWER_S:.0f} s")
            raise WorkerDiedError(
                "the model's worker stopped answering; it is restarting", code="worker_died"
            ) from None
        except Exception:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
        return stream

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            with contextlib.suppress(EngineNotReadyError):
                self._send(("abort", request_id))

    def count_prompt(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        call = next(self._call_ids)
        answer: Future[Any] = Future()
        self._calls[call] = answer
        try:
            self._send(("count", call, messages))
            result = answer.result(timeout=_ANSWER_S)
        finally:
            self._calls.pop(call, None)
        if isinstance(result, dict):
            raise decode_error(result)
        return result  # type: ignore[no-any-return]

    def queue_depth(self) -> int:
        return self._stats.queue_depth + len(self._waiting)

    def stats(self) -> EngineStats:
        return replace(self._stats, worker_pid=self.pid, shared_input_bytes=self._shared_bytes)

    def shutdown(self) -> None:
        self._stopping.set()
        self._state, self._reason = "stopped", "shut down"
        proc = self._proc
        with contextlib.suppress(EngineNotReadyError):
            self._send(("shutdown",))
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            _kill_group(proc)  # anything the worker started and left behind
        self._close_transport()
        self._fail_all(EngineNotReadyError("the server is shutting down", code="shutting_down"))

    # --- the worker's life ---------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        # A fresh interpreter (`python -m vlmbridge.engine.worker`) on one end of a socket pair: nothing of the
        # front's state (threads, the event loop, its __main__) is copied or re-imported.
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(
            [self._python, "-m", "vlmbridge.engine.worker", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=_worker_env(self._python),
            # Its own process group: what the worker starts (vLLM's engine core and model workers) is killed with
            # it, even after a SIGKILL that gives it no chance to clean up. Not its own session: Linux schedules
            # each session as a group (autogroup); with a worker's group against the front's, and vLLM's engine
            # core spinning (sched_yield) in the worker's, the front went unscheduled 0.4 s at a time and requests
            # stalled for seconds under load.
            process_group=0,
        )
        theirs.close()
        front = Connection(os.dup(ours.fileno()))
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._proc, self._conn, self._sock = proc, front, ours
            self._ready = Future()
            self._state = "loading" if not self._crashes else "restarting"
            self._last_beat = time.monotonic()
        self._send(("load", self._model_json, self._path, self._name))
        threading.Thread(
            target=self._read, args=(front, generation), name="vlmbridge-worker-reader", daemon=True
        ).start()
        threading.Thread(target=self._watch, args=(generation,), name="vlmbridge-worker-watch", daemon=True).start()

    def _close_transport(self) -> None:
        conn, sock = self._conn, self._sock
        self._conn = self._sock = None
        for end in (conn, sock):
            if end is not None:
                with contextlib.suppress(OSError):
                    end.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        conn, sock = self._conn, self._sock
        if conn is None or sock is None:
            raise EngineNotReadyError(f"model {self._name!r} has no worker: {self._reason}")
        packed = sharing.pack(message)  # outside the lock: copying a large picture holds up no other request
        try:
            with self._send_lock:
                sharing.send(sock, conn, packed)
                self._shared_bytes += packed.shared_bytes
        except (OSError, ValueError, EOFError):
            raise WorkerDiedError(
                f"the model's worker is gone ({self._reason}); it is restarting", code="worker_died"
            ) from None
        finally:
            packed.close()  # the worker holds its own descriptors now (or the worker is gone)

    def _read(self, conn: Connection, generation: int) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            # Any message is a sign of life: a worker whose beats queue behind a burst of outputs that this
            # thread drains slowly (a busy front) is not stuck.
            self._last_beat = time.monotonic()
            self._dispatch(message)
        if generation == self._generation and not self._stopping.is_set():
            self._on_death(self._death_cause())

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "outs":  # one engine step's outputs: one wake-up for all their readers
            wake_streams([s for rid, item, last in message[1] if (s := self._deliver(rid, item, last, wake=False))])
        elif kind == "out":
            self._deliver(*message[1:])
        elif kind == "beat":
            _, state, reason, stats = message
            self._stats = stats
            if self._state == "ready" and state == "failed":
                self._kill(f"the engine reported: {reason}")
        elif kind in ("accepted", "rejected"):
            future = self._waiting.get(message[1])
            if future is not None and not future.done():
                if kind == "accepted":
                    future.set_result(None)
                else:
                    future.set_exception(decode_error(message[2]))
        elif kind == "counted":
            call = self._calls.get(message[1])
            if call is not None and not call.done():
                call.set_result(message[2])
        elif kind == "ready":
            self._info = message[1]
            self._last_beat = time.monotonic()  # beats start now: a long load is not silence
            self._state, self._reason = "ready", "ready"  # earlier crashes still count within their window
            self._resolve_ready(None)
        elif kind == "failed":
            error = decode_error(message[1])
            self._state, self._reason = "failed", f"loading failed: {error}"
            self._stopping.set()  # a folder that does not load will not load on a restart either
            self._resolve_ready(error)

    def _deliver(self, rid: str, item: Any, last: bool, wake: bool = True) -> RequestStream[EngineOutput] | None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.push(decode_output(item), last=last, wake=wake)
            if last:
                self._streams.pop(rid, None)
        return stream

    def _resolve_ready(self, error: Exception | None) -> None:
        if not self._ready.done():
            if error is None:
                self._ready.set_result(None)
            else:
                self._ready.set_exception(error)

    def _watch(self, generation: int) -> None:
        """No heartbeat for `beat_timeout` seconds: the worker is frozen; kill it so it restarts."""
        while generation == self._generation and not self._stopping.is_set():
            time.sleep(0.5)
            proc = self._proc
            if proc is None or proc.poll() is not None or self._state != "ready":
                continue
            silent = time.monotonic() - self._last_beat
            if silent > self._beat_timeout:
                self._kill(f"no heartbeat for {silent:.0f} s")

    def _kill(self, why: str) -> None:
        proc = self._proc
        log.error("model %s: worker %s is stuck (%s); killing it", self._name, proc.pid if proc else "?", why)
        self._reason = f"worker stuck: {why}"
        if proc is not None:
            _kill_group(proc)

    def _death_cause(self) -> str:
        proc = self._proc
        if proc is None:
            return "no worker"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        code = proc.returncode
        _kill_group(proc)  # the worker is gone: so must be what it started
        if self._reason.startswith("worker stuck"):
            return self._reason
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"worker process killed by {signal.Signals(-code).name}"
        return f"worker process exited with code {code}"

    def _on_death(self, cause: str) -> None:
        log.error("model %s: %s; failing its %d request(s)", self._name, cause, len(self._streams))
        self._fail_all(WorkerDiedError(f"the model's worker died: {cause}", code="worker_died"))
        self._close_transport()
        if self._info is None:  # it never loaded: a restart would fail the same way
            self._state, self._reason = "failed", f"the worker died while loading the model: {cause}"
            self._resolve_ready(ModelLoadError(self._reason))
            return
        now = time.monotonic()
        self._crashes.append(now)
        recent = [t for t in self._crashes if now - t <= _CRASH_WINDOW_S]
        if len(recent) >= _CRASHES:
            self._state = "failed"
            self._reason = f"{cause}; {len(recent)} crashes within {_CRASH_WINDOW_S / 60:.0f} minutes, not restarting"
            log.critical("model %s: %s", self._name, self._reason)
            return
        delay = _BACKOFF_S[min(len(recent), len(_BACKOFF_S)) - 1]
        self._state, self._reason = "restarting", f"{cause}; restarting in {delay:g} s"
        threading.Timer(delay, self._restart).start()

    def _restart(self) -> None:
        if not self._stopping.is_set():
            self._spawn()

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            waiting = dict(self._waiting)
            calls = dict(self._calls)
        for stream in streams.values():
            stream.push(EngineOutput(finish_reason="error", error=error), last=True)
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)
        for call in calls.values():
            if not call.done():
                call.set_exception(error)
