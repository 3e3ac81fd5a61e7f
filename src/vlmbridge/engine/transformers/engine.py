"""The transformers backend's engine: models driven step by step on one dedicated worker thread.

All model calls happen on that thread (CUDA graphs and some kernels keep per-thread state, and it keeps the
event loop free). `generate` prepares a request (chat template, image processing) on the caller's thread and
queues it. The worker prefills waiting requests together (left-padded, images of any size), then decodes every
running request in one batch; new requests join at step boundaries (continuous batching). Aborts from the front
and deadlines are checked before every step, so a client that goes away costs at most the step already running.
Outputs are token ids (`EngineOutput`); the front turns them into text.

No request can stop the worker: a failure in a step (prefill, decode forward, sampling, caching) fails only the
requests it concerns, with a classified `EngineFailedError`; an unexpected failure of the loop itself fails the
requests in flight and the loop goes on. If the thread ends anyway, or one step runs past
`EngineLimits.stall_after_s`, `state` says "failed" (so /health turns red) and waiting requests get a 503.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from vlmbridge.engine.base import EngineInfo, EngineState, PromptStats, RequestStream
from vlmbridge.engine.context import new_token_budget
from vlmbridge.engine.threads import name_os_thread
from vlmbridge.engine.transformers.batch import RunningBatch
from vlmbridge.engine.transformers.caches import EncoderCache, PrefixCache, PrefixHit
from vlmbridge.engine.transformers.family import adapter_for
from vlmbridge.engine.transformers.grammar import GrammarBook
from vlmbridge.engine.transformers.prefill import Prefilled, Prefiller
from vlmbridge.engine.transformers.prompt import PreparedRequest, PromptBuilder
from vlmbridge.engine.transformers.sampling import Sampler, resolve_sampling
from vlmbridge.engine.transformers.sequence import FaultHook, Sequence, describe, public_error, step_error
from vlmbridge.engine.transformers.vision import VisionFeatures
from vlmbridge.engine.types import (
    CacheCounters,
    ChatMessage,
    EngineOutput,
    EngineStats,
    GenerationRequest,
    warm_up_request,
)
from vlmbridge.errors import (
    EngineFailedError,
    EngineNotReadyError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)
from vlmbridge.loader import LoadedModel

if TYPE_CHECKING:
    from vlmbridge.settings import ModelSettings

__all__ = ["EngineCounters", "EngineLimits", "FaultHook", "PreparedRequest", "TransformersEngine"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    context_length: int | None = None  # None: min(model maximum, 32768)
    default_max_new_tokens: int = 512
    max_batch_size: int = 8
    max_queue: int = 64
    # Prompt tokens prefilled in one forward pass (bounds prefill activation memory); one prompt always fits.
    max_prefill_tokens: int = 8192
    # When idle, wait this long for more requests so a burst is prefilled together.
    batch_wait_s: float = 0.0
    # Finished requests' KV kept for follow-up turns, and vision-encoder outputs; 0 turns a cache off.
    prefix_cache_bytes: int = 1 << 30
    encoder_cache_bytes: int = 256 << 20
    pixel_cache_bytes: int = 256 << 20  # processed pixels per picture and budget: follow-ups skip the processor
    # torch CPU threads for prefills and for decode steps; 0 leaves torch's setting alone.
    prefill_threads: int = 0
    decode_threads: int = 0
    # The worker counts as stuck (state "failed") once one loop iteration runs longer than this; 0 = never.
    # Generous on purpose: one long prefill on a CPU takes many seconds.
    stall_after_s: float = 120.0
    grammar_compile_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, model: ModelSettings, *, on_cpu: bool = False) -> EngineLimits:
        """The limits `model` asks for. On a CPU, prefills and decode steps use every core (or `torch_threads`).
        Leaving a core to the front measured slower once the engine's torch pool was the process's only one
        (engine/threads.py): on 2 cores, 1 client streamed 130-144 tokens/s on 1 thread and 150-164 on 2."""
        cores = os.cpu_count() or 2
        threads = model.torch_threads or cores
        prefill_threads, decode_threads = (threads, threads) if on_cpu else (0, 0)
        return cls(
            context_length=model.context_length,
            default_max_new_tokens=model.max_new_tokens,
            max_batch_size=model.max_batch_size,
            max_queue=model.max_queue,
            max_prefill_tokens=model.max_prefill_tokens,
            batch_wait_s=model.batch_wait_ms / 1000,
            prefix_cache_bytes=model.prefix_cache_mb << 20,
            encoder_cache_bytes=model.encoder_cache_mb << 20,
            pixel_cache_bytes=model.pixel_cache_mb << 20,
            prefill_threads=prefill_threads,
            decode_threads=decode_threads,
            stall_after_s=model.engine_stall_timeout,
            grammar_compile_timeout_s=model.grammar_compile_timeout,
        )


@dataclass
class EngineCounters:
    """The worker's running counters (read from other threads; ints are updated atomically under the GIL)."""

    decode_steps: int = 0
    prefill_batches: int = 0
    cancelled: int = 0
    # Decode steps a request took part in after its client had already cancelled: at most one per request,
    # because cancellation is checked before every step.
    steps_after_cancel: int = 0
    max_batch_seen: int = 0


@dataclass
class _Queued:
    prepared: PreparedRequest
    stream: RequestStream[EngineOutput]


class TransformersEngine:
    """An Engine backed by a LoadedModel. Construct, then `start()`; `shutdown()` to stop the worker."""

    prepares_in_process = True  # `generate` templates and processes pixels on the calling thread

    def __init__(
        self,
        loaded: LoadedModel,
        model_id: str,
        limits: EngineLimits | None = None,
        *,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.loaded = loaded
        self.limits = limits or EngineLimits()
        model = loaded.model
        text_cfg = model.config.get_text_config(decoder=True)
        max_pos = int(getattr(text_cfg, "max_position_embeddings", 32768) or 32768)
        self.context_length = min(self.limits.context_length or min(max_pos, 32768), max_pos)
        self._info = EngineInfo(
            model_id=model_id,
            model_path=str(loaded.folder.path),
            model_type=loaded.folder.model_type or "",
            model_class=loaded.model_class,
            kind=loaded.kind,
            context_length=self.context_length,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            quantization=loaded.quantization,
            quantization_reason=loaded.quantization_reason,
        )
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else []
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if loaded.tokenizer.eos_token_id is not None:
            eos_ids.add(int(loaded.tokenizer.eos_token_id))
        self._eos = frozenset(eos_ids)
        self._pad_id = int(gen.pad_token_id) if gen.pad_token_id is not None else min(self._eos, default=0)
        self._vocab = int(getattr(text_cfg, "vocab_size", 0) or len(loaded.tokenizer))
        self.family = adapter_for(loaded.folder.model_type, vlm=loaded.kind == "vlm")
        self.prompts = PromptBuilder(
            loaded.processor, loaded.tokenizer, self.context_length, pixel_cache_bytes=self.limits.pixel_cache_bytes,
            image_token=self.family.image_token or "<|image_pad|>",
        )  # fmt: skip
        self._rope_index = self.family.rope_index(model)
        self._cache_kw = self.family.cache_keyword(model)
        self.prefix_cache = PrefixCache(self.limits.prefix_cache_bytes) if self.limits.prefix_cache_bytes else None
        self.encoder_cache = EncoderCache(self.limits.encoder_cache_bytes) if self.limits.encoder_cache_bytes else None
        vision = VisionFeatures(model, self.encoder_cache, self.family) if loaded.kind == "vlm" else None
        self._prefiller = Prefiller(
            model, loaded.device, self._pad_id, self._rope_index, self._cache_kw, self._new_cache,
            self.prefix_cache, vision,
        )  # fmt: skip
        self._queue: queue.Queue[_Queued] = queue.Queue(maxsize=self.limits.max_queue)
        self._held: list[_Queued] = []  # taken from the queue but over this step's prefill budget
        self._batch = RunningBatch()
        self._state: EngineState = "loading"
        self._reason = "starting"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()
        self._pending: list[Sequence] = []  # admitted and being prefilled, not yet in the batch
        self._closed: EngineNotReadyError | None = None  # set once the worker takes no more requests
        self._death: str | None = None  # why the worker thread ended, when it was not shut down
        self._faults = 0  # loop iterations in a row that failed
        self._last_fault = ""
        self._ids = itertools.count(1)
        # Request ids the front asked to stop (added on any thread), with when: an abort that crossed the
        # request's own end is forgotten after a minute.
        self._aborted: dict[str, float] = {}
        self._abort_lock = threading.Lock()
        self.counters = EngineCounters()
        self.fault_hook = fault_hook
        # Called on the engine's thread after every loop iteration: a worker process sends that step's outputs
        # to the front as one message instead of one per request.
        self.step_done: Callable[[], None] | None = None
        self._grammars: GrammarBook | None = None  # built on the first constrained request
        self._grammars_lock = threading.Lock()

    # --- Engine interface -------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        return "failed" if self._worker_problem() else self._state

    @property
    def state_reason(self) -> str:
        return self._worker_problem() or self._reason

    @property
    def last_heartbeat(self) -> float:
        """time.monotonic() when the worker last began a loop iteration (at least every ~0.5 s when idle)."""
        return self._heartbeat

    @property
    def fault_hook(self) -> FaultHook | None:
        """Test-only fault injection, off (None) by default: called as hook(stage, request_id) on the worker.

        Whatever it raises is what that stage raised. Stages: "prefill" (before a prefill forward, once per
        request in it), "decode" (before a decode forward, once per row: raising fails every row of that step,
        as a failed forward does), "sample" and "accept" (one row's token choice and detokenizing: fails that
        row only), "remember" (filing a finished request's KV: the request has already ended, nothing fails).
        """
        return self._fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: FaultHook | None) -> None:
        self._fault_hook = hook
        self._prefiller.fault_hook = hook

    def _worker_problem(self) -> str | None:
        """Why a ready engine's worker cannot serve (it ended, or is stuck in one step); None when it can."""
        if self._state != "ready" or self._thread is None or self._stop.is_set():
            return None
        if self._death is not None or not self._thread.is_alive():
            return f"the engine worker stopped ({self._death or 'unknown cause'}); restart the server"
        stalled = time.monotonic() - self._heartbeat
        bound = self.limits.stall_after_s
        if bound and stalled > bound:
            return f"engine worker stuck for {stalled:.0f} s (one step over the {bound:g} s bound)"
        return None

    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    def active_count(self) -> int:
        return len(self._batch)

    def start(self, *, warm_up: bool = True) -> None:
        if self._thread is not None:
            return
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="vlmbridge-engine", daemon=True)
        self._thread.start()
        if not warm_up:
            self._state, self._reason = "ready", "ready (no warm-up)"
            return
        self._state, self._reason = "warming_up", "running a warm-up generation"
        try:
            self._warm_up()
        except Exception as exc:
            self._state, self._reason = "failed", f"warm-up generation failed: {exc}"
            log.error("warm-up failed: %s", exc)
            raise
        self._state, self._reason = "ready", "ready"

    def _warm_up(self) -> None:
        req = warm_up_request(self.prompts.is_vlm)
        for out in self.submit(self.prepare(req), warm_up=True):  # the last output comes after its KV is filed
            if out.error is not None:
                raise out.error
        for cache in (self.prefix_cache, self.encoder_cache, self.prompts.pixel_cache):
            if cache is not None:
                cache.clear()  # the warm-up's picture and prompt are nobody's conversation

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Render and tokenize the prompt, process images, check the context. Thread-safe; raises 4xx errors."""
        inputs = self.prompts.build(request.messages, request.chat_template_kwargs, tools=request.tools)
        wanted = new_token_budget(
            request, inputs.prompt_tokens, self.context_length, self.limits.default_max_new_tokens
        )
        if not request.request_id:
            request = replace(request, request_id=f"req-{next(self._ids)}")
        grammar = None
        if request.structured is not None:  # its matcher is built here, off the engine thread, with a timeout
            # A thinking model's reasoning is free; the grammar takes over at `</think>`.
            think_end = self.prompts.think_end_id if inputs.ends_in_think_block else None
            grammar = self.grammars().constraint(request.structured, dormant_until=think_end)
        return PreparedRequest(request=request, inputs=inputs, max_new_tokens=wanted, grammar=grammar)

    def grammars(self) -> GrammarBook:
        """The engine's grammars and their cache (built once, on first use: it reads the whole vocabulary)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarBook(
                    self.loaded.tokenizer, self._vocab, self._eos,
                    compile_timeout_s=self.limits.grammar_compile_timeout_s,
                )  # fmt: skip
            return self._grammars

    def submit(
        self,
        prepared: PreparedRequest,
        *,
        warm_up: bool = False,
        stream: RequestStream[EngineOutput] | None = None,
    ) -> RequestStream[EngineOutput]:
        if not warm_up and self.state != "ready":
            raise EngineNotReadyError(f"model is not ready: {self.state_reason}")
        if self._closed is not None:
            raise self._closed
        stream = stream if stream is not None else RequestStream(prepared.request.request_id)
        try:
            self._queue.put_nowait(_Queued(prepared, stream))
        except queue.Full:
            raise QueueFullError(f"{self._queue.maxsize} requests are already waiting; retry later") from None
        self._wake.set()
        if self._closed is not None:  # the worker closed after the check above: nobody else will answer it
            self._drain_queue(self._closed)
        return stream

    def generate(
        self, request: GenerationRequest, stream: RequestStream[EngineOutput] | None = None
    ) -> RequestStream[EngineOutput]:
        return self.submit(self.prepare(request), stream=stream)

    def abort(self, request_id: str) -> None:
        with self._abort_lock:
            self._aborted[request_id] = time.monotonic()
        self._wake.set()

    def _take_abort(self, request_id: str) -> bool:
        """Whether the front asked to stop this request (and forget the ask: a request ends once)."""
        if not self._aborted:  # the common case, without the lock
            return False
        with self._abort_lock:
            return self._aborted.pop(request_id, None) is not None

    def _forget_stale_aborts(self) -> None:
        if self._aborted:
            old = time.monotonic() - 60
            with self._abort_lock:
                for rid in [rid for rid, at in self._aborted.items() if at < old]:
                    del self._aborted[rid]

    def stats(self) -> EngineStats:
        c = self.counters
        caches = {
            name: CacheCounters(s.hits, s.misses, s.evictions, s.bytes, s.entries)
            for name, cache in (
                ("prefix", self.prefix_cache), ("encoder", self.encoder_cache), ("pixel", self.prompts.pixel_cache)
            )
            if cache is not None and (s := cache.stats) is not None
        }  # fmt: skip
        return EngineStats(
            queue_depth=self.queue_depth(),
            running=len(self._batch),
            decode_steps=c.decode_steps,
            prefill_batches=c.prefill_batches,
            cancelled=c.cancelled,
            steps_after_cancel=c.steps_after_cancel,
            max_batch_seen=c.max_batch_seen,
            caches=caches,
            device_memory_bytes=self._device_memory(),
        )

    def _device_memory(self) -> int | None:
        device = self.loaded.device
        if device.type != "cuda":
            return None
        import torch

        return int(torch.cuda.memory_reserved(device))

    def count_prompt(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        inputs = self.prompts.build(messages)
        return PromptStats(inputs.prompt_tokens, inputs.image_tokens, inputs.video_tokens)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._grammars is not None:
            self._grammars.close()
        self._state, self._reason = "stopped", "shut down"

    # --- worker -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        """The worker thread: serve until shut down; if anything else ends it, say why and answer everyone."""
        name_os_thread()  # before its first parallel kernel: its OpenMP workers take the name too
        try:
            self._serve()
        except BaseException as exc:  # the thread ends here either way; it must not end unexplained
            self._death = f"{type(exc).__name__}; see the server log"
            log.critical("the engine worker stopped: %s", describe(exc))
            log.debug("traceback of the failure above", exc_info=exc)
        finally:
            self._close()
            self._end_step()  # what closing answered goes out too

    def _serve(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                try:
                    self._iterate()
                except Exception as exc:
                    self._recover(exc)
                    continue
                finally:
                    self._end_step()
                if self._faults:
                    self._faults, self._last_fault = 0, ""

    def _iterate(self) -> None:
        self._forget_stale_aborts()
        if not self._batch and not self._held and self._queue.empty():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            if self.limits.batch_wait_s and not self._stop.is_set():
                time.sleep(self.limits.batch_wait_s)  # let a burst arrive and be prefilled together
            return
        admitted = self._admit()
        if admitted:
            self._threads(self.limits.prefill_threads)
            self._prefill(admitted)
            self._end_step()  # first tokens go out now, not one decode step later
        if self._batch:
            self._threads(self.limits.decode_threads)
            self._decode_step()

    def _end_step(self) -> None:
        if self.step_done is not None:
            try:
                self.step_done()
            except Exception:  # the listener's own problem (a front that went away): the engine goes on
                log.debug("step listener failed", exc_info=True)

    def _recover(self, exc: Exception) -> None:
        """A failure outside any one request's step: fail what is in flight and go on with an empty batch."""
        in_flight = [s for s in (*self._batch.seqs, *self._pending) if not s.ended]
        text = describe(exc)
        if text != self._last_fault:  # the same fault again and again is logged once
            log.error("engine step failed; failing %d request(s) in flight: %s", len(in_flight), text)
            log.debug("traceback of the failure above", exc_info=exc)
        self._last_fault = text
        error = public_error(exc, "engine_error", "an engine step")
        for seq in in_flight:
            seq.fail(error)
        self._batch, self._pending = RunningBatch(), []  # the cache may be half-changed: keep nothing of it
        self._faults += 1
        self._stop.wait(min(0.01 * 2**self._faults, 1.0))  # a fault that repeats must not spin a core

    def _close(self) -> None:
        """The worker takes no more requests: answer the running ones and everyone still waiting."""
        if self._death is None:
            waiting: EngineNotReadyError = ShuttingDownError("the server is shutting down", code="shutting_down")
            running: Exception = waiting
        else:
            waiting = EngineNotReadyError(f"the engine worker stopped ({self._death})", code="engine_stopped")
            running = EngineFailedError("the engine worker stopped while working on this request", code="engine_died")
        self._closed = waiting
        for seq in (*self._batch.seqs, *self._pending):
            seq.fail(running)
        self._batch, self._pending = RunningBatch(), []
        held, self._held = self._held, []
        for q in held:
            q.stream.push(EngineOutput(finish_reason="error", error=waiting), last=True)
        self._drain_queue(waiting)

    def _drain_queue(self, error: Exception) -> None:
        while True:
            try:
                q = self._queue.get_nowait()
            except queue.Empty:
                return
            q.stream.push(EngineOutput(finish_reason="error", error=error), last=True)

    @staticmethod
    def _threads(count: int) -> None:
        import torch

        if count and torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def _admit(self) -> list[_Queued]:
        """Waiting requests that fit the free batch rows and one prefill's token budget."""
        room = self.limits.max_batch_size - len(self._batch)
        taken: list[_Queued] = []
        tokens = 0
        while room > 0:
            if self._held:
                q = self._held.pop(0)
            else:
                try:
                    q = self._queue.get_nowait()
                except queue.Empty:
                    break
            if self._take_abort(q.stream.request_id):  # aborted while it waited: counted like one mid-decode
                self.counters.cancelled += 1
                q.stream.push(EngineOutput(finish_reason="abort"), last=True)
                continue
            size = q.prepared.inputs.prompt_tokens
            if taken and tokens + size > self.limits.max_prefill_tokens:
                self._held.insert(0, q)  # first in line for the next step
                break
            taken.append(q)
            tokens += size
            room -= 1
        return taken

    def _sequence(self, q: _Queued) -> Sequence:
        prepared = q.prepared
        resolved = resolve_sampling(prepared.request.sampling, self.loaded.model.generation_config)
        return Sequence(
            prepared=prepared,
            stream=q.stream,
            sampler=Sampler(resolved, prepared.inputs.input_ids, self._vocab, self.loaded.device, prepared.grammar),
            eos=self._eos,
        )

    def _prefill(self, admitted: list[_Queued]) -> None:
        self._pending = self._start(admitted)
        fresh: list[Sequence] = []
        for seq in self._pending:  # a cached prefix means a short tail of its own; the rest prefill together
            hit = self._find_prefix(seq)
            if hit is None:
                fresh.append(seq)
            else:
                self._run_prefill(partial(self._prefiller.on_prefix, seq, hit), [seq])
        if len(fresh) == 1:
            self._run_prefill(partial(self._prefiller.together, fresh), fresh)
        elif fresh and not self._run_prefill(partial(self._prefiller.together, fresh), fresh, quiet=True):
            for seq in fresh:  # one bad prompt must not fail its neighbours: retry them one by one
                self._run_prefill(partial(self._prefiller.together, [seq]), [seq])
        self._pending = []

    def _start(self, admitted: list[_Queued]) -> list[Sequence]:
        """A Sequence per admitted request; one that cannot even be set up fails alone."""
        seqs: list[Sequence] = []
        for q in admitted:
            try:
                seqs.append(self._sequence(q))
            except Exception as exc:
                error = step_error(exc, "prefill_failed", "setting up the request", [q.stream.request_id])
                q.stream.push(EngineOutput(finish_reason="error", error=error), last=True)
        return seqs

    def _find_prefix(self, seq: Sequence) -> PrefixHit | None:
        try:
            return self._prefiller.find_prefix(seq)
        except Exception as exc:  # the cache is an optimisation: without it the request simply prefills in full
            log.warning("prefix cache lookup failed for %s: %s", seq.request_id, describe(exc))
            return None

    def _run_prefill(self, run: Callable[[], Prefilled | None], seqs: list[Sequence], quiet: bool = False) -> bool:
        """Run one prefill and join its survivors to the batch. False if it raised (and `quiet` kept them alive)."""
        try:
            self._probe("prefill", seqs)
            done = run()
        except Exception as exc:
            # A retry must not repeat a first token that already went out; then the prefill fails for good.
            if quiet and not any(s.generated or s.ended for s in seqs):
                log.warning("batched prefill of %d requests failed (%s); retrying one by one", len(seqs), describe(exc))
                return False
            error = step_error(exc, "prefill_failed", "prefill", [s.request_id for s in seqs])
            for seq in seqs:
                seq.fail(error)
            return True
        self.counters.prefill_batches += 1
        if done is not None:
            try:
                self._batch.join(done.seqs, done.cache, done.mask)
            except EngineFailedError as exc:  # refused before anything changed: the running batch is intact
                error = step_error(exc, exc.code, "joining the batch", [s.request_id for s in done.seqs])
                for seq in done.seqs:
                    seq.fail(error)
                return True
            self.counters.max_batch_seen = max(self.counters.max_batch_seen, len(self._batch))
        return True

    def _probe(self, stage: str, seqs: list[Sequence]) -> None:
        hook = self._fault_hook
        if hook is not None:
            for seq in seqs:
                hook(stage, seq.request_id)

    def _new_cache(self, layers: list[tuple[Any, Any]] | None = None) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(ddp_cache_data=layers, config=self.loaded.model.config)
        except (AttributeError, TypeError, ValueError):  # remote-code configs may lack the layer fields
            return DynamicCache(ddp_cache_data=layers)

    def _expire(self) -> None:
        """Aborted and timed-out requests leave before the next step (an aborted one's KV is filed first: the
        front aborts on a stop string, and the conversation goes on from there)."""
        now = time.monotonic()
        aborted = []
        for row, seq in enumerate(self._batch.seqs):
            deadline = seq.prepared.request.deadline
            if self._take_abort(seq.request_id):
                seq.abort()
                self.counters.cancelled += 1
                self._prefiller.remember(seq, self._batch.cache, self._batch.mask[row], row)
                aborted.append(seq)
            elif deadline is not None and now > deadline:
                seq.fail(RequestTimeoutError("the request ran past its timeout"))
        self._drop_finished(aborted)

    def _drop_finished(self, finished: list[Sequence]) -> None:
        """Take finished rows out of the batch, then send their last outputs: whoever sees a request end can
        rely on its KV being filed and on the engine being done with it."""
        try:
            self._batch.drop_finished()
        finally:
            for seq in finished:
                seq.release()

    def _decode_step(self) -> None:
        self._expire()
        if not self._batch:
            return
        for seq in self._batch.seqs:  # grammar masks are computed while the model runs
            if seq.sampler.constraint is not None:
                seq.sampler.constraint.prefetch()
        try:
            self._probe("decode", self._batch.seqs)
            ids, mask, position_ids = self._batch.step_inputs(self.loaded.device, self._rope_index is not None)
            out = self.loaded.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                **{self._cache_kw: self._batch.cache},
            )  # fmt: skip
        except Exception as exc:
            error = step_error(exc, "decode_failed", "decode step", [s.request_id for s in self._batch.seqs])
            for seq in self._batch.seqs:
                seq.fail(error)
            self._batch = RunningBatch()  # the cache and mask may hold half a step: keep nothing of them
            return
        self.counters.decode_steps += 1
        self.counters.max_batch_seen = max(self.counters.max_batch_seen, len(self._batch))
        self._batch.advance()
        logits = out.logits[:, -1, :]
        hook = self._fault_hook
        finished = []
        for row, seq in enumerate(self._batch.seqs):
            if self._aborted and seq.request_id in self._aborted:
                self.counters.steps_after_cancel += 1
            seq.step(logits[row], hook)  # a failure ends this row only
            if seq.finish is not None:
                self._prefiller.remember(seq, self._batch.cache, self._batch.mask[row], row)
                finished.append(seq)
        self._drop_finished(finished)
