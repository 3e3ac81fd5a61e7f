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
from dataclasses import dataclass, field, replace
from typing import Any

from vlmbridge.engine import kv
from vlmbridge.engine.base import EngineInfo, EngineState, PromptStats, RequestStream
from vlmbridge.engine.batch import RunningBatch, pack_prompts, prefill_positions
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
    queued_at: float = field(default_factory=time.monotonic)


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
                    self._prefill(admitted)
                if self._batch:
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
        try:
            self._prefill_together(seqs)
            return
        except Exception as exc:
            if len(seqs) == 1:
                log.exception("prefill failed for %s", seqs[0].request_id)
                seqs[0].fail(exc)
                return
            # One bad prompt must not fail its neighbours: retry them one by one.
            log.warning("batched prefill of %d requests failed (%s); retrying one by one", len(seqs), exc)
        for seq in seqs:
            try:
                self._prefill_together([seq])
            except Exception as exc:
                log.exception("prefill failed for %s", seq.request_id)
                seq.fail(exc)

    def _prefill_together(self, seqs: list[Sequence]) -> None:
        device = self.loaded.device
        packed = pack_prompts([s.prepared.inputs for s in seqs], self._pad_id, device)
        position_ids, text_next, rope_next = prefill_positions(packed, self._rope_index)
        cache = self._new_cache()
        out = self.loaded.model(
            **packed, position_ids=position_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}
        )
        self.stats.prefill_batches += 1
        done = time.monotonic()
        logits = out.logits[:, -1, :]
        for row, seq in enumerate(seqs):
            seq.text_pos, seq.rope_pos = text_next[row], rope_next[row]
            token, logprob = seq.sampler.choose(logits[row])
            seq.accept(token, logprob, prefill_done_at=done)
        keep = [i for i, s in enumerate(seqs) if s.finish is None]
        if not keep:
            return
        mask = packed["attention_mask"]
        if len(keep) < len(seqs):
            kv.select_rows(cache, keep)
            mask = mask[keep]
        self._batch.join([seqs[i] for i in keep], cache, mask)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._batch))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.loaded.model.config)
        except (AttributeError, TypeError, ValueError):  # remote-code configs may lack the layer fields
            return DynamicCache()

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
        self._batch.drop_finished()
