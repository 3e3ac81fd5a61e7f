"""The worker process: one model's engine, driven over a pipe by the front's `ProcessEngine`.

It ignores SIGINT/SIGTERM (the front drains, then stops it) and dies with its parent: a watchdog notices within
half a second that the front is gone (even after kill -9). A thread beats every
half second with the engine's state and stats, so a front can tell a busy worker from a stuck or dead one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmbridge.engine import sharing
from vlmbridge.engine.base import RequestStream
from vlmbridge.engine.threads import in_passing_thread, name_os_thread, side_thread
from vlmbridge.engine.wire import encode_error, encode_output
from vlmbridge.memtrim import settle_heap

if TYPE_CHECKING:
    from vlmbridge.engine.base import Engine
    from vlmbridge.engine.types import EngineOutput

__all__ = ["BEAT_SECONDS", "FAULTS_ENV", "worker_main"]

BEAT_SECONDS = 0.5
# Test-only: "STAGE" makes the engine's fault hook fail the first request it meets at that stage (sample, decode,
# prefill), once. Never set outside tests.
FAULTS_ENV = "VLMBRIDGE_TEST_FAULTS"


def _die_with_parent(parent: int) -> None:
    # Polling, not PR_SET_PDEATHSIG: the kernel sends that when the *thread* that started us ends (the front starts
    # workers from short-lived loading threads), not when the front's process does.
    def watch() -> None:
        name_os_thread()
        while os.getppid() == parent:
            time.sleep(0.5)
        if os.getpgrp() == os.getpid():  # our own group (ProcessEngine's doing): take what we started with us
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(0)

    threading.Thread(target=watch, name="vlmbridge-parent-watch", daemon=True).start()


def _fault_hook(spec: str) -> Any:
    stage, victims = spec, list[str]()

    def hook(at: str, request_id: str) -> None:
        if at != stage:
            return
        if not victims:
            victims.append(request_id)
        if request_id == victims[0]:
            raise RuntimeError("injected fault")

    return hook


def worker_main(conn: Connection, parent: int) -> None:
    """The worker process's entry point: the first message says what to load."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    lock = threading.Lock()
    sock = socket.socket(fileno=os.dup(conn.fileno()))  # the front's messages bring shared inputs' descriptors
    try:
        _, model_json, path, name = sharing.receive(sock, conn)
    except (EOFError, OSError):
        return

    def send(message: tuple[Any, ...]) -> None:
        with lock:
            conn.send(message)

    try:
        from vlmbridge.engine.factory import build_engine
        from vlmbridge.settings import ModelSettings

        model = ModelSettings.model_validate_json(model_json).model_copy(update={"engine_worker": "thread"})

        def load() -> Engine:
            engine = build_engine(model, Path(path), name)
            engine.start()
            return engine

        # On a thread that ends: the torch pool loading used must not outlive it (engine/threads.py).
        engine = in_passing_thread(load, "vlmbridge-load")
        if spec := os.environ.get(FAULTS_ENV):  # after the warm-up: the fault is for a client's request
            engine.fault_hook = _fault_hook(spec)  # type: ignore[attr-defined]
    except BaseException as exc:  # the front reports why loading failed
        send(("failed", encode_error(exc)))
        return
    settle_heap(full=True)  # the model lives as long as this process
    send(("ready", engine.info))
    _Worker(engine, send).serve(sock, conn)


class _Worker:
    def __init__(self, engine: Engine, send: Any) -> None:
        self.engine = engine
        self.send = send
        # An engine whose `generate` mostly waits (vLLM's: until its own loop accepted the request) takes more
        # requests at once than one whose `generate` is CPU work beside its engine thread (templating, pixels).
        threads = int(getattr(engine, "admission_threads", 2))
        self.prepare = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="vlmbridge-prepare", initializer=side_thread
        )
        self.stop = threading.Event()
        # Outputs made during one engine step, sent as one message when the step ends (engines that announce
        # their steps; others send each output as it comes).
        self._step: list[tuple[str, EngineOutput, bool]] = []
        self._stepper: int | None = None  # the thread that runs the engine's steps, learned from its first one
        if hasattr(engine, "step_done"):
            engine.step_done = self._flush

    def serve(self, sock: socket.socket, conn: Connection) -> None:
        threading.Thread(target=self._beat, name="vlmbridge-beat", daemon=True).start()
        try:
            while True:
                try:
                    message = sharing.receive(sock, conn)
                except (EOFError, OSError):  # the front is gone
                    break
                kind = message[0]
                if kind == "generate":
                    self.prepare.submit(self._generate, message[1])
                elif kind == "abort":
                    self.engine.abort(message[1])
                elif kind == "count":
                    self.prepare.submit(self._count, message[1], message[2])
                elif kind == "shutdown":
                    break
        finally:
            self.stop.set()
            self.engine.shutdown()
            self.prepare.shutdown(wait=False, cancel_futures=True)

    def _beat(self) -> None:
        name_os_thread()
        while not self.stop.wait(BEAT_SECONDS):
            e = self.engine
            with contextlib.suppress(OSError, ValueError):
                self.send(("beat", e.state, e.state_reason, e.stats()))

    def _generate(self, request: Any) -> None:
        rid = request.request_id

        def forward(out: EngineOutput, last: bool) -> None:
            # From the engine's thread, no thread hop per token: kept until its step ends, or sent now when
            # pushed elsewhere. Outputs may overtake "accepted": the front files a request's stream before it
            # sends it, and the engine's thread never waits for a preparing thread.
            if threading.get_ident() == self._stepper:
                self._step.append((rid, out, last))
                return
            with contextlib.suppress(OSError, ValueError):  # the front went away: nothing to tell
                self.send(("out", rid, encode_output(out), last))

        try:
            self.engine.generate(request, stream=RequestStream(rid, forward=forward))
        except Exception as exc:  # a 4xx (context, images) or the engine refusing: the caller gets it as raised
            self.send(("rejected", rid, encode_error(exc)))
            return
        self.send(("accepted", rid))

    def _flush(self) -> None:
        """The engine finished a step: its outputs go to the front as one message."""
        self._stepper = threading.get_ident()
        if not self._step:
            return
        step, self._step = self._step, []
        with contextlib.suppress(OSError, ValueError):
            self.send(("outs", [(rid, encode_output(out), last) for rid, out, last in step]))

    def _count(self, call: int, messages: Any) -> None:
        try:
            result: Any = self.engine.count_prompt(messages)
        except Exception as exc:
            result = encode_error(exc)
        self.send(("counted", call, result))


if __name__ == "__main__":  # python -m vlmbridge.engine.worker FD PARENT_PID (started by ProcessEngine)
    worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]))
