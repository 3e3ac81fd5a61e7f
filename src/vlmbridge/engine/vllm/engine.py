"""`VllmEngine`: vLLM's `AsyncLLM` behind our engine contract, inside a model's worker process.

`AsyncLLM` lives on an asyncio loop in a thread of its own (vLLM's engine core and model workers are processes
beneath it). `generate` does our part on the caller's thread — the chat template with control tokens sanitized,
images decoded within their pixel budgets, clips decoded and sampled, the context check — then hands vLLM token ids,
PIL images and video frames with their metadata (never URLs) and waits until vLLM accepted or refused the request.
A pump task on the loop turns vLLM's delta outputs into `EngineOutput`s (token ids; the front's output pipeline
detokenizes, matches stop strings and aborts, as for the transformers engine). Usage comes from vLLM: prompt tokens,
image and video tokens counted from the placeholder ids in `RequestOutput.prompt_token_ids`, cached tokens from
its prefix cache.

Structured output and forced tool calls: vLLM's `guidance` backend (llguidance, the transformers backend's library)
compiles the grammar text both engines build, so both constrain identically. A Thinking checkpoint gets vLLM's
`qwen3` reasoning parser, which keeps the grammar off the reasoning until `</think>`; each request says whether its
prompt left a <think> block open (`reasoning_ended`), so a prompt without one is constrained from its first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vlmbridge.engine.base import EngineInfo, EngineState, PromptStats, RequestStream
from vlmbridge.engine.types import (
    ChatMessage,
    EngineOutput,
    EngineStats,
    GenerationRequest,
    PixelBudget,
    StructuredSpec,
    warm_up_request,
)
from vlmbridge.engine.vllm.inputs import VllmInputs, budget_kwargs, generation_config
from vlmbridge.engine.vllm.mapping import PreparedPrompt, from_vllm, to_vllm
from vlmbridge.engine.vllm.preflight import check_devices, check_vllm, gpu_share
from vlmbridge.errors import (
    ContextLengthError,
    EngineFailedError,
    EngineNotReadyError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    RequestTimeoutError,
)
from vlmbridge.families import family_for
from vlmbridge.folder import ModelFolder

if TYPE_CHECKING:
    from vlmbridge.settings import ModelSettings

__all__ = ["VllmEngine"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_ACCEPT_S = 300.0  # vLLM's input processing of one request (HF processor on its images)
_LATE = "the request ran past its timeout"


class VllmEngine:
    prepares_in_process = True  # `generate` templates and decodes pixels on the calling thread

    def __init__(self, model: ModelSettings, path: Path, name: str) -> None:
        self.version = check_vllm()
        import torch

        check_devices(model, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        self.model = model
        folder = ModelFolder.open(path)
        fam = family_for(folder.model_type)
        is_vlm = bool(fam and fam.is_vlm)
        max_pos = int(folder.text_config.get("max_position_embeddings") or 32768)
        self.context_length = min(model.context_length or min(max_pos, 32768), max_pos)
        self._inputs = VllmInputs(
            path, vlm=is_vlm, context_length=self.context_length, default_max_new_tokens=model.max_new_tokens
        )
        self._generation_config = generation_config(path)
        self._image_token_id = self._inputs.image_token_id
        on_cpu = model.device == "cpu" or not torch.cuda.is_available()
        dtype = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[model.dtype]
        self._info = EngineInfo(
            model_id=name,
            model_path=str(path),
            model_type=folder.model_type or "",
            model_class=(folder.architectures or ["?"])[0],
            kind="vlm" if is_vlm else "text",
            context_length=self.context_length,
            dtype=dtype if dtype != "auto" else (folder.stored_dtype or "auto"),
            device="cpu" if on_cpu else "cuda",
            quantization="none",
        )
        self._state: EngineState = "loading"
        self._reason = "starting vLLM"
        self._capacity = model.max_batch_size + model.max_queue
        # A worker prepares this many requests at once: `generate` mostly waits for vLLM's loop to accept.
        self.admission_threads = max(2, min(16, model.max_batch_size))
        self._live: dict[str, RequestStream[EngineOutput]] = {}  # only touched on the loop's thread
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._early_aborts: set[str] = set()  # aborts that overtook their request's acceptance
        self._ids = itertools.count(1)
        self._steps = 0
        self._cancelled = 0
        self._max_batch = 0
        # Called on the loop's thread once the outputs of one vLLM step are pushed: a worker process sends them to
        # the front as one message (the transformers engine's hook too).
        self.step_done: Callable[[], None] | None = None
        self._step_pending = False
        if on_cpu:  # vLLM's default takes a share of all RAM for the KV cache
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{model.vllm_cpu_kv_cache_gib:g}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vlmbridge-vllm-loop", daemon=True)
        self._thread.start()
        try:
            self._llm: Any = self._call(self._build(path, dtype, is_vlm, on_cpu), timeout=None)
        except Exception as exc:  # vLLM's own start-up failure: the front gets its last words, the log the rest
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise ModelLoadError(
                f"vLLM failed to start: {type(exc).__name__}: {str(exc)[:300]}",
                fix="the worker's log above has vLLM's traceback (look for 'ERROR' lines from EngineCore/Worker)",
                cause="vllm_start",
            ) from exc
        # The pool counts a model's device memory: vLLM's share of the GPU (our worker's own allocator holds none).
        # Read once vLLM's processes are started, from the device's properties: mem_get_info would create a CUDA
        # context (hundreds of MB of GPU memory) in this process, which runs no kernels.
        self._device_bytes = None if on_cpu else gpu_share(model, int(torch.cuda.get_device_properties(0).total_memory))

    async def _build(self, path: Path, dtype: str, is_vlm: bool, on_cpu: bool) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        m = self.model
        args: dict[str, Any] = dict(
            model=str(path),
            served_model_name=[self._info.model_id],
            dtype=dtype,
            max_model_len=self.context_length,
            max_num_seqs=m.max_batch_size,
            enable_prefix_caching=True,
            tensor_parallel_size=m.tensor_parallel_size,
            pipeline_parallel_size=m.pipeline_parallel_size,
            distributed_executor_backend=m.distributed_executor_backend,
            gpu_memory_utilization=m.gpu_memory_utilization,
            enforce_eager=on_cpu,  # CPU: no graphs to capture; compiling costs minutes on start-up
            disable_log_stats=True,
            structured_outputs_config=StructuredOutputsConfig(
                backend="guidance", reasoning_parser="qwen3" if self._inputs.opens_thinking else ""
            ),
        )
        if is_vlm:
            # Start-up reservation from our admission limits: the most images one request may carry (max_images;
            # the front refuses more), each at most max_pixels, and the most clips (max_videos; the front refuses
            # more) — vLLM never reserves for media we would refuse. No clips allowed (or video refused for this
            # model, see inputs._video_refusal): no video reservation at all.
            videos = m.max_videos if self._inputs.video_refusal is None else 0
            args["limit_mm_per_prompt"] = {"image": m.max_images, "video": videos}
            args["mm_processor_kwargs"] = budget_kwargs(PixelBudget(m.max_pixels, m.min_pixels))
            if videos and self._inputs.video_bridged:
                # vLLM's engine core profiles with dummy clips in processes of its own, where compat's bridge is
                # not: it sizes memory without them (on CPU the KV cache is set explicitly anyway).
                args["skip_mm_profiling"] = True
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    # --- contract ------------------------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        if self._state == "ready" and getattr(self._llm, "errored", False):
            return "failed"
        return self._state

    @property
    def state_reason(self) -> str:
        if self.state == "failed" and self._state == "ready":
            return "vLLM's engine core died; restart the model"
        return self._reason

    def start(self, *, warm_up: bool = True) -> None:
        if warm_up:
            self._state, self._reason = "warming_up", "running a warm-up generation"
            try:
                self._warm_up()
            except Exception as exc:
                self._state, self._reason = "failed", f"warm-up generation failed: {exc}"
                raise
        self._state, self._reason = "ready", "ready"

    def generate(
        self, request: GenerationRequest, stream: RequestStream[EngineOutput] | None = None
    ) -> RequestStream[EngineOutput]:
        if self.state not in ("ready", "warming_up"):
            raise EngineNotReadyError(f"model is not ready: {self.state_reason}")
        if len(self._live) >= self._capacity:
            raise QueueFullError(f"{self._capacity} requests are already in the engine; retry later")
        if not request.request_id:
            request = replace(request, request_id=f"req-{next(self._ids)}")
        prepared = self._inputs.prepare(request)
        stream = stream if stream is not None else RequestStream(request.request_id)
        prompt, params = to_vllm(prepared, self._generation_config)
        self._call(self._submit(prepared, prompt, params, stream), timeout=_ACCEPT_S)
        return stream

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already stopped: shutting down
            asyncio.run_coroutine_threadsafe(self._abort(request_id), self._loop)

    def count_prompt(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        return self._inputs.count(messages)

    def queue_depth(self) -> int:
        return max(0, len(self._live) - self.model.max_batch_size)

    def stats(self) -> EngineStats:
        live = len(self._live)
        return EngineStats(
            queue_depth=self.queue_depth(),
            running=min(live, self.model.max_batch_size),
            decode_steps=self._steps,
            cancelled=self._cancelled,
            max_batch_seen=self._max_batch,
            device_memory_bytes=self._device_bytes,
        )

    def shutdown(self) -> None:
        self._state, self._reason = "stopped", "shut down"
        llm, self._llm = self._llm, None
        try:
            llm.shutdown()
        except Exception as exc:  # shutting down: report, never raise
            log.warning("vLLM shutdown: %s", exc)
        del llm  # now, while the interpreter is whole (AsyncLLM.__del__ shuts down again)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # --- on the loop -------------------------------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    async def _submit(self, prepared: PreparedPrompt, prompt: dict[str, Any], params: Any, stream: Any) -> None:
        rid = prepared.request.request_id
        try:
            collector = await self._llm.add_request(
                rid, prompt, params, reasoning_ended=None if prepared.reasoning_open else True
            )
        except Exception as exc:
            raise _refusal(exc, prepared.request.structured) from None
        self._live[rid] = stream
        self._max_batch = max(self._max_batch, min(len(self._live), self.model.max_batch_size))
        self._tasks[rid] = asyncio.get_running_loop().create_task(self._pump(rid, collector, prepared, stream))
        if rid in self._early_aborts:
            self._early_aborts.discard(rid)
            await self._abort(rid)

    async def _pump(self, rid: str, collector: Any, prepared: PreparedPrompt, stream: Any) -> None:
        first = True
        deadline = prepared.request.deadline
        try:
            while True:
                out = collector.get_nowait()
                if out is None:
                    left = None if deadline is None else deadline - time.monotonic()
                    try:
                        out = await asyncio.wait_for(collector.get(), left)
                    except TimeoutError:  # past the request's deadline: stop it in vLLM too
                        self._end(rid, EngineOutput(finish_reason="error", error=RequestTimeoutError(_LATE)))
                        await self._llm.abort(rid)
                        return
                converted = from_vllm(
                    out,
                    first=first,
                    prepared=prepared,
                    image_token_id=self._image_token_id,
                    video_token_id=self._inputs.video_token_id,
                )
                first = False
                self._steps += 1
                if converted.finish_reason is not None:
                    self._end(rid, converted)
                    return
                stream.push(converted)
                self._step_pushed()
        except asyncio.CancelledError:
            return  # aborted: _abort answered the stream
        except Exception as exc:
            log.error("vLLM failed request %s: %s", rid, exc)
            self._end(rid, EngineOutput(finish_reason="error", error=EngineFailedError(f"vLLM failed: {exc}")))

    def _end(self, rid: str, last: EngineOutput) -> None:
        stream = self._live.pop(rid, None)
        self._tasks.pop(rid, None)
        if stream is not None:
            stream.push(last, last=True)
            self._step_pushed()

    def _step_pushed(self) -> None:
        """vLLM's output handler wakes every request's pump of a step in one loop iteration; a callback queued
        behind them runs once they all pushed: the end of the step."""
        if self.step_done is not None and not self._step_pending:
            self._step_pending = True
            self._loop.call_soon(self._end_step)

    def _end_step(self) -> None:
        self._step_pending = False
        if self.step_done is not None:
            try:
                self.step_done()
            except Exception:  # the listener's own problem (a front that went away): the engine goes on
                log.debug("step listener failed", exc_info=True)

    async def _abort(self, rid: str) -> None:
        task = self._tasks.get(rid)
        if task is None:
            if len(self._early_aborts) > 1024:  # aborts of requests that had already ended: forget them
                self._early_aborts.clear()
            self._early_aborts.add(rid)
            return
        task.cancel()
        self._cancelled += 1
        self._end(rid, EngineOutput(finish_reason="abort"))
        await self._llm.abort(rid)

    def _warm_up(self) -> None:
        req = warm_up_request(self._info.kind == "vlm")
        for out in self.generate(req):
            if out.error is not None:
                raise out.error


def _refusal(exc: Exception, structured: StructuredSpec | None) -> Exception:
    """vLLM's refusal of a request as our typed 4xx (its validation errors name the parameter)."""
    message = str(exc)[:400]
    param = getattr(exc, "parameter", None)
    if param == "input_tokens" or "maximum context length" in message:
        return ContextLengthError(message, param="messages", code="context_length_exceeded")
    if structured is not None and "grammar" in message.lower():  # llguidance could not compile the schema
        return InvalidRequestError(
            f"the schema cannot be turned into a grammar: {message}",
            param="tool_choice" if structured.kind == "tool_calls" else "response_format",
            code="invalid_schema",
        )
    if type(exc).__name__ in ("VLLMValidationError", "VLLMClientError", "ValueError"):
        return InvalidRequestError(f"vLLM refused the request: {message}", param=param)
    return EngineFailedError(f"vLLM failed to accept the request ({type(exc).__name__})")
