"""The embedded engine: transformers models driven step by step on one dedicated worker thread.

All model calls happen on that thread (CUDA graphs and some kernels keep per-thread state, and it keeps the
event loop free). Requests are prepared (chat template, image processing) on the caller's thread, queued, then
prefilled and decoded by the worker, which checks cancellation and deadlines before every step. Sequences
share one left-padded KV cache, so the decode loop already runs batches; how many requests join is
`max_batch_size`.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vlmbridge.engine import kv
from vlmbridge.engine.base import EngineInfo, EngineState, PromptStats, RequestStream
from vlmbridge.engine.prompt import ModelInputs, PromptBuilder
from vlmbridge.engine.sampling import Sampler, resolve_sampling
from vlmbridge.engine.textstream import IncrementalDecoder, ReasoningSplitter, StopMatcher, token_text_table
from vlmbridge.engine.types import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ImagePart,
    PixelBudget,
    SamplingParams,
    TextPart,
    Usage,
)
from vlmbridge.errors import (
    ContextLengthError,
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
    VlmbridgeError,
)
from vlmbridge.loader import LoadedModel

__all__ = ["EngineLimits", "EngineStats", "PreparedRequest", "TransformersEngine"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    context_length: int | None = None  # None: min(model maximum, 32768)
    default_max_new_tokens: int = 512
    max_batch_size: int = 1
    max_queue: int = 64


@dataclass
class EngineStats:
    """Counters for metrics (read from other threads; ints are updated atomically under the GIL)."""

    decode_steps: int = 0
    cancelled: int = 0
    # Decode steps a request took part in after its client had already cancelled: at most one per request,
    # because cancellation is checked before every step.
    steps_after_cancel: int = 0


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


@dataclass
class _Sequence:
    prepared: PreparedRequest
    stream: RequestStream
    sampler: Sampler
    decoder: IncrementalDecoder
    stopper: StopMatcher
    splitter: ReasoningSplitter
    text_pos: int = 0  # real tokens in the cache (text position of the next token)
    rope_pos: int = 0  # rotary position of the next token (differs from text_pos after images in M-RoPE)
    next_token: int = -1
    generated: int = 0
    finish: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.prepared.request.request_id


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
        self._eos = set(eos if isinstance(eos, list) else [eos])
        if loaded.tokenizer.eos_token_id is not None:
            self._eos.add(int(loaded.tokenizer.eos_token_id))
        self._pad_id = next(iter(sorted(self._eos)), 0) if gen.pad_token_id is None else int(gen.pad_token_id)
        self._token_text = token_text_table(loaded.tokenizer)
        self._vocab = int(getattr(text_cfg, "vocab_size", 0) or len(loaded.tokenizer))
        inner = getattr(model, "model", None)
        self._rope_index = getattr(inner, "get_rope_index", None)  # M-RoPE models (all Qwen-VL families)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._queue: queue.Queue[_Queued] = queue.Queue(maxsize=self.limits.max_queue)
        self._active: list[_Sequence] = []
        self._cache: Any = None
        self._mask: Any = None
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
        return self._queue.qsize()

    def active_count(self) -> int:
        return len(self._active)

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
        from vlmbridge.media.decode import decode_image
        from vlmbridge.tiny.images import demo_picture

        parts: list[TextPart | ImagePart] = [TextPart("Hi")]
        if self.prompts.is_vlm:
            import io

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
        rid = request.request_id or f"req-{next(self._ids)}"
        if rid != request.request_id:
            from dataclasses import replace

            request = replace(request, request_id=rid)
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
                admitted = self._admit()
                if not self._active and not admitted:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for item in admitted:
                    self._prefill(item)
                if self._active:
                    self._decode_step()
        for seq in self._active:
            self._fail(seq, EngineNotReadyError("server is shutting down"))
        self._drain_queue()

    def _drain_queue(self) -> None:
        while True:
            try:
                q = self._queue.get_nowait()
            except queue.Empty:
                return
            q.stream.push(GenerationChunk(finish_reason="error", error=EngineNotReadyError("server is shutting down")))

    def _admit(self) -> list[_Queued]:
        room = self.limits.max_batch_size - len(self._active)
        taken: list[_Queued] = []
        while room > 0:
            try:
                q = self._queue.get_nowait()
            except queue.Empty:
                break
            if q.stream.cancelled:
                q.stream.push(GenerationChunk(finish_reason="cancelled"))
                continue
            taken.append(q)
            room -= 1
        return taken

    def _new_sequence(self, q: _Queued) -> _Sequence:
        prepared = q.prepared
        resolved = resolve_sampling(prepared.request.sampling, self.loaded.model.generation_config)
        return _Sequence(
            prepared=prepared,
            stream=q.stream,
            sampler=Sampler(resolved, prepared.inputs.input_ids, self._vocab, self.loaded.device, self._token_text),
            decoder=IncrementalDecoder(self.loaded.tokenizer),
            stopper=StopMatcher(prepared.request.sampling.stop),
            splitter=ReasoningSplitter(prepared.inputs.ends_in_think_block),
        )

    def _prefill(self, q: _Queued) -> None:
        import torch

        seq = self._new_sequence(q)
        model = self.loaded.model
        try:
            tensors = {
                k: v.to(self.loaded.device) if hasattr(v, "to") else v for k, v in seq.prepared.inputs.tensors.items()
            }
            ids = tensors["input_ids"]
            length = int(ids.shape[1])
            text_pos = torch.arange(length, device=ids.device).view(1, -1)
            if self._rope_index is not None:
                rope, delta = self._rope_index(
                    ids,
                    mm_token_type_ids=tensors.get("mm_token_type_ids", torch.zeros_like(ids)),
                    image_grid_thw=tensors.get("image_grid_thw"),
                    video_grid_thw=tensors.get("video_grid_thw"),
                    attention_mask=tensors.get("attention_mask"),
                )
                position_ids = torch.cat([text_pos[None], rope], dim=0)
                seq.rope_pos = length + int(delta.reshape(-1)[0])
            else:
                position_ids = text_pos
                seq.rope_pos = length
            seq.text_pos = length
            cache = self._new_cache()
            out = model(
                **tensors,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
            logits = out.logits[0, -1]
        except Exception as exc:  # one bad prompt must not take the engine down
            log.exception("prefill failed for %s", seq.request_id)
            self._fail(seq, exc)
            return
        prefill_done = time.monotonic()
        token, lp = seq.sampler.choose(logits)
        self._emit(seq, token, lp, prefill_done_at=prefill_done)
        if seq.finish is None:
            seq.next_token = token
            self._join_batch(seq, cache, torch.ones((1, length), dtype=torch.long, device=ids.device))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.loaded.model.config)
        except (AttributeError, TypeError, ValueError):  # remote-code configs may lack the layer fields
            return DynamicCache()

    def _join_batch(self, seq: _Sequence, cache: Any, mask: Any) -> None:
        import torch

        if not self._active:
            self._active, self._cache, self._mask = [seq], cache, mask
            return
        if not kv.supports_batch_surgery(self._cache):
            raise RuntimeError("this model's cache cannot be batched; set max_batch_size=1")
        cur, new = int(self._mask.shape[1]), int(mask.shape[1])
        if new < cur:
            kv.left_pad_cache(cache, cur - new)
            mask = torch.cat([torch.zeros((1, cur - new), dtype=mask.dtype, device=mask.device), mask], dim=1)
        elif new > cur:
            kv.left_pad_cache(self._cache, new - cur)
            pad = torch.zeros((self._mask.shape[0], new - cur), dtype=self._mask.dtype, device=self._mask.device)
            self._mask = torch.cat([pad, self._mask], dim=1)
        kv.concat_caches(self._cache, cache)
        self._mask = torch.cat([self._mask, mask], dim=0)
        self._active.append(seq)

    def _decode_step(self) -> None:
        import torch

        now = time.monotonic()
        for seq in list(self._active):
            deadline = seq.prepared.request.deadline
            if seq.stream.cancelled:
                seq.finish = "cancelled"
                self.stats.cancelled += 1
                seq.stream.push(GenerationChunk(finish_reason="cancelled", usage=self._usage(seq)))
            elif deadline is not None and now > deadline:
                self._fail(seq, RequestTimeoutError("the request ran past its timeout"))
        self._drop_finished()
        if not self._active:
            return
        device = self.loaded.device
        batch = len(self._active)
        ids = torch.tensor([[s.next_token] for s in self._active], dtype=torch.long, device=device)
        self._mask = torch.cat([self._mask, torch.ones((batch, 1), dtype=self._mask.dtype, device=device)], dim=1)
        text_pos = torch.tensor([[s.text_pos] for s in self._active], dtype=torch.long, device=device)
        if self._rope_index is not None:
            rope = torch.tensor([[s.rope_pos] for s in self._active], dtype=torch.long, device=device)
            position_ids = torch.cat([text_pos[None], rope[None].expand(3, -1, -1)], dim=0)
        else:
            position_ids = text_pos
        try:
            out = self.loaded.model(
                input_ids=ids,
                attention_mask=self._mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kw: self._cache},
            )
        except Exception as exc:
            log.exception("decode step failed; failing %d request(s)", batch)
            for seq in self._active:
                self._fail(seq, exc)
            self._drop_finished()
            return
        self.stats.decode_steps += 1
        logits = out.logits[:, -1, :]
        for row, seq in enumerate(self._active):
            if seq.stream.cancelled:
                self.stats.steps_after_cancel += 1
            seq.text_pos += 1
            seq.rope_pos += 1
            token, lp = seq.sampler.choose(logits[row])
            self._emit(seq, token, lp)
            seq.next_token = token
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._active) if s.finish is None]
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active, self._cache, self._mask = [], None, None
            return
        kv.select_rows(self._cache, keep)
        self._mask = self._mask[keep]
        self._active = [self._active[i] for i in keep]
        # Columns that are padding for every remaining row can go.
        lead = int((self._mask.cumsum(dim=1) == 0).all(dim=0).sum())
        if lead:
            kv.trim_left(self._cache, lead)
            self._mask = self._mask[:, lead:]

    # --- output -----------------------------------------------------------------------------------------
    def _emit(self, seq: _Sequence, token: int, logprob: Any, prefill_done_at: float | None = None) -> None:
        seq.generated += 1
        seq.sampler.observe(token)
        text = ""
        if token in self._eos and not seq.prepared.request.sampling.ignore_eos:
            seq.finish = "stop"
        else:
            text = seq.stopper.feed(seq.decoder.add(token))
            if seq.stopper.stopped:
                seq.finish = "stop"
            elif seq.generated >= seq.prepared.max_new_tokens:
                seq.finish = "length"
        if seq.finish is not None and not seq.stopper.stopped:
            text += seq.stopper.feed(seq.decoder.flush()) + seq.stopper.flush()
        delta = seq.splitter.feed(text)
        if seq.finish is not None:
            tail = seq.splitter.flush()
            delta = type(delta)(text=delta.text + tail.text, reasoning=delta.reasoning + tail.reasoning)
        seq.stream.push(
            GenerationChunk(
                text=delta.text,
                reasoning=delta.reasoning,
                token_ids=(token,),
                logprobs=(logprob,) if logprob is not None else (),
                finish_reason=seq.finish,
                usage=self._usage(seq) if seq.finish is not None else None,
                prefill_done_at=prefill_done_at,
            )
        )

    def _usage(self, seq: _Sequence) -> Usage:
        inputs = seq.prepared.inputs
        return Usage(
            prompt_tokens=inputs.prompt_tokens,
            completion_tokens=seq.generated,
            image_tokens=inputs.image_tokens,
        )

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        seq.finish = "error"
        error = exc if isinstance(exc, VlmbridgeError) else _internal(exc)
        seq.stream.push(GenerationChunk(finish_reason="error", error=error, usage=self._usage(seq)))


def _internal(exc: BaseException) -> Exception:
    if isinstance(exc, InvalidRequestError):
        return exc
    text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return RuntimeError(f"{type(exc).__name__}: {text}")
