"""The embedded engine: transformers models driven step by step on one dedicated worker thread.

All model calls happen on that thread (CUDA graphs and some kernels keep per-thread state, and it keeps the
event loop free). Requests are prepared (chat template, image processing) on the caller's thread and queued.
The worker prefills waiting requests together (left-padded, images of any size), then decodes every running
request in one batch; new requests join at step boundaries (continuous batching). Cancellation and deadlines
are checked before every step, so a client that goes away costs at most the step already running.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from vlmbridge.engine.base import EngineInfo, EngineState, PromptStats, RequestStream
from vlmbridge.engine.batch import RunningBatch
from vlmbridge.engine.caches import EncoderCache, PrefixCache
from vlmbridge.engine.prefill import Prefilled, Prefiller
from vlmbridge.engine.prompt import ModelInputs, PromptBuilder
from vlmbridge.engine.sampling import Sampler, resolve_sampling
from vlmbridge.engine.sequence import Sequence
from vlmbridge.engine.textstream import IncrementalDecoder, ReasoningSplitter, StopMatcher, token_text_table
from vlmbridge.engine.types import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    ImagePart,
    PixelBudget,
    SamplingParams,
    TextPart,
)
from vlmbridge.engine.vision import VisionFeatures
from vlmbridge.errors import ContextLengthError, EngineNotReadyError, QueueFullError, RequestTimeoutError
from vlmbridge.loader import LoadedModel

__all__ = ["EngineLimits", "EngineStats", "PreparedRequest", "TransformersEngine"]

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
    batch_wait_s: float = 0.005
    # Finished requests' KV kept for follow-up turns, and vision-encoder outputs; 0 turns a cache off.
    prefix_cache_bytes: int = 1 << 30
    encoder_cache_bytes: int = 256 << 20
    # torch CPU threads for prefills and for decode steps; 0 leaves torch's setting alone.
    prefill_threads: int = 0
    decode_threads: int = 0


@dataclass
class EngineStats:
    """Counters for metrics (read from other threads; ints are updated atomically under the GIL)."""

    decode_steps: int = 0
    prefill_batches: int = 0
    cancelled: int = 0
    # Decode steps a request took part in after its client had already cancelled: at most one per request,
    # because cancellation is checked before every step.
    steps_after_cancel: int = 0
    max_batch_seen: int = 0


@dataclass
class PreparedRequest:
    request: GenerationRequest
    inputs: ModelInputs
    max_new_tokens: int


@dataclass
class _Queued:
    prepared: PreparedRequest
    stream: RequestStream


class TransformersEngine:
    """An Engine backed by a LoadedModel. Construct, then `start()`; `shutdown()` to stop the worker."""

    def __init__(self, loaded: LoadedModel, model_id: str, limits: EngineLimits | None = None) -> None:
        self.loaded = loaded
        self.limits = limits or EngineLimits()
        model = loaded.model
        text_cfg = model.config.get_text_config(decoder=True)
        max_pos = int(getattr(text_cfg, "max_position_embeddings", 32768) or 32768)
        self.context_length = min(self.limits.context_length or min(max_pos, 32768), max_pos)
        self.prompts = PromptBuilder(loaded.processor, loaded.tokenizer, self.context_length)
        self._info = EngineInfo(
            model_id=model_id,
            model_path=str(loaded.folder.path),
            model_type=loaded.folder.model_type or "",
            model_class=loaded.model_class,
            kind=loaded.kind,
            context_length=self.context_length,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
        )
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else []
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if loaded.tokenizer.eos_token_id is not None:
            eos_ids.add(int(loaded.tokenizer.eos_token_id))
        self._eos = frozenset(eos_ids)
        self._pad_id = int(gen.pad_token_id) if gen.pad_token_id is not None else min(self._eos, default=0)
        self._token_text = token_text_table(loaded.tokenizer)
        self._vocab = int(getattr(text_cfg, "vocab_size", 0) or len(loaded.tokenizer))
        inner = getattr(model, "model", None)
        self._rope_index = getattr(inner, "get_rope_index", None)  # M-RoPE models (all Qwen-VL families)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.prefix_cache = PrefixCache(self.limits.prefix_cache_bytes) if self.limits.prefix_cache_bytes else None
        self.encoder_cache = EncoderCache(self.limits.encoder_cache_bytes) if self.limits.encoder_cache_bytes else None
        vision = VisionFeatures(model, self.encoder_cache) if loaded.kind == "vlm" else None
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
        self._ids = itertools.count(1)
        self.stats = EngineStats()

    # --- Engine interface -------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def state_reason(self) -> str:
        return self._reason

    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    def active_count(self) -> int:
        return len(self._batch)

    def start(self, *, warm_up: bool = True) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._worker, name="vlmbridge-engine", daemon=True)
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
        import io

        from vlmbridge.media.decode import decode_image
        from vlmbridge.tiny.images import demo_picture

        parts: list[TextPart | ImagePart] = [TextPart("Hi")]
        if self.prompts.is_vlm:
            buf = io.BytesIO()
            demo_picture(64, 64).save(buf, format="PNG")
            parts.insert(0, ImagePart(decode_image(buf.getvalue()), PixelBudget(max_pixels=64 * 64 * 4)))
        req = GenerationRequest(
            messages=(ChatMessage("user", tuple(parts)),),
            sampling=SamplingParams(max_new_tokens=2, temperature=0.0),
            request_id="warm-up",
        )
        for chunk in self.submit(self.prepare(req), warm_up=True):
            if chunk.error is not None:
                raise chunk.error
        while self.active_count():  # the worker files the warm-up's KV right after its last chunk
            time.sleep(0.001)
        for cache in (self.prefix_cache, self.encoder_cache):
            if cache is not None:
                cache.clear()  # the warm-up's picture and prompt are nobody's conversation

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Render and tokenize the prompt, process images, check the context. Thread-safe; raises 4xx errors."""
        inputs = self.prompts.build(request.messages, request.chat_template_kwargs)
        room = self.context_length - inputs.prompt_tokens
        wanted = request.sampling.max_new_tokens or self.limits.default_max_new_tokens
        if wanted > room:
            if request.max_tokens_explicit:
                raise ContextLengthError(
                    f"max_tokens={wanted} plus the {inputs.prompt_tokens}-token prompt exceeds the "
                    f"{self.context_length}-token context; ask for at most {room}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            wanted = room
        if not request.request_id:
            request = replace(request, request_id=f"req-{next(self._ids)}")
        return PreparedRequest(request=request, inputs=inputs, max_new_tokens=wanted)

    def submit(self, prepared: PreparedRequest, *, warm_up: bool = False) -> RequestStream:
        if not warm_up and self._state != "ready":
            raise EngineNotReadyError(f"model is not ready: {self._reason}")
        stream = RequestStream(prepared.request.request_id)
        try:
            self._queue.put_nowait(_Queued(prepared, stream))
        except queue.Full:
            raise QueueFullError(f"{self._queue.maxsize} requests are already waiting; retry later") from None
        self._wake.set()
        return stream

    def generate(self, request: GenerationRequest) -> RequestStream:
        return self.submit(self.prepare(request))

    def count_prompt(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        inputs = self.prompts.build(messages)
        return PromptStats(prompt_tokens=inputs.prompt_tokens, image_tokens=inputs.image_tokens)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._state, self._reason = "stopped", "shut down"

    # --- worker -----------------------------------------------------------------------------------------
    def _worker(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                if not self._batch and not self._held and self._queue.empty():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    if self.limits.batch_wait_s and not self._stop.is_set():
                        time.sleep(self.limits.batch_wait_s)  # let a burst arrive and be prefilled together
                    continue
                admitted = self._admit()
                if admitted:
                    self._threads(self.limits.prefill_threads)
                    self._prefill(admitted)
                if self._batch:
                    self._threads(self.limits.decode_threads)
                    self._decode_step()
        stopping = EngineNotReadyError("server is shutting down")
        for seq in self._batch.seqs:
            seq.fail(stopping)
        for q in self._held:
            q.stream.push(GenerationChunk(finish_reason="error", error=stopping))
        while True:
            try:
                q = self._queue.get_nowait()
            except queue.Empty:
                return
            q.stream.push(GenerationChunk(finish_reason="error", error=stopping))

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
            if q.stream.cancelled:
                q.stream.push(GenerationChunk(finish_reason="cancelled"))
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
            sampler=Sampler(resolved, prepared.inputs.input_ids, self._vocab, self.loaded.device, self._token_text),
            decoder=IncrementalDecoder(self.loaded.tokenizer),
            stopper=StopMatcher(prepared.request.sampling.stop),
            splitter=ReasoningSplitter(prepared.inputs.ends_in_think_block),
            eos=self._eos,
        )

    def _prefill(self, admitted: list[_Queued]) -> None:
        seqs = [self._sequence(q) for q in admitted]
        fresh: list[Sequence] = []
        for seq in seqs:  # a cached prefix means a short tail of its own; the rest prefill together
            hit = self._prefiller.find_prefix(seq)
            if hit is None:
                fresh.append(seq)
            else:
                self._run_prefill(partial(self._prefiller.on_prefix, seq, hit), [seq])
        if len(fresh) == 1:
            self._run_prefill(partial(self._prefiller.together, fresh), fresh)
        elif fresh and not self._run_prefill(partial(self._prefiller.together, fresh), fresh, quiet=True):
            for seq in fresh:  # one bad prompt must not fail its neighbours: retry them one by one
                self._run_prefill(partial(self._prefiller.together, [seq]), [seq])

    def _run_prefill(self, run: Callable[[], Prefilled | None], seqs: list[Sequence], quiet: bool = False) -> bool:
        """Run one prefill and join its survivors to the batch. False if it raised (and `quiet` kept them alive)."""
        try:
            done = run()
        except Exception as exc:
            if quiet:
                log.warning("batched prefill of %d requests failed (%s); retrying one by one", len(seqs), exc)
                return False
            log.exception("prefill failed for %s", ", ".join(s.request_id for s in seqs))
            for seq in seqs:
                seq.fail(exc)
            return True
        self.stats.prefill_batches += 1
        if done is not None:
            self._batch.join(done.seqs, done.cache, done.mask)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._batch))
        return True

    def _new_cache(self, layers: list[tuple[Any, Any]] | None = None) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(ddp_cache_data=layers, config=self.loaded.model.config)
        except (AttributeError, TypeError, ValueError):  # remote-code configs may lack the layer fields
            return DynamicCache(ddp_cache_data=layers)

    def _decode_step(self) -> None:
        now = time.monotonic()
        for seq in self._batch.seqs:
            deadline = seq.prepared.request.deadline
            if seq.stream.cancelled:
                seq.cancel()
                self.stats.cancelled += 1
            elif deadline is not None and now > deadline:
                seq.fail(RequestTimeoutError("the request ran past its timeout"))
        self._batch.drop_finished()
        if not self._batch:
            return
        ids, mask, position_ids = self._batch.step_inputs(self.loaded.device, self._rope_index is not None)
        try:
            out = self.loaded.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                **{self._cache_kw: self._batch.cache},
            )  # fmt: skip
        except Exception as exc:
            log.exception("decode step failed; failing %d request(s)", len(self._batch))
            for seq in self._batch.seqs:
                seq.fail(exc)
            self._batch.drop_finished()
            return
        self.stats.decode_steps += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._batch))
        self._batch.advance()
        logits = out.logits[:, -1, :]
        for row, seq in enumerate(self._batch.seqs):
            if seq.stream.cancelled:
                self.stats.steps_after_cancel += 1
            token, logprob = seq.sampler.choose(logits[row])
            seq.accept(token, logprob)
            if seq.finish is not None:
                self._prefiller.remember(seq, self._batch.cache, self._batch.mask[row], row)
        self._batch.drop_finished()
