"""What goes into an engine and what comes out: plain Python types, no HTTP, no torch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmbridge.media.decode import DecodedImage
from vlmbridge.media.framelist import FrameListVideo
from vlmbridge.media.video import DecodedVideo, VideoFrames, VideoSampling

__all__ = [
    "LOGPROB_FLOOR",
    "CacheCounters",
    "ChatMessage",
    "EngineFinish",
    "EngineOutput",
    "EngineStats",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "ImagePart",
    "PixelBudget",
    "PromptInfo",
    "SamplingParams",
    "StructuredSpec",
    "TextPart",
    "TokenChoice",
    "TokenLogprob",
    "ToolCall",
    "Usage",
    "VideoPart",
    "reportable_logprob",
    "warm_up_request",
]

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]
Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class PixelBudget:
    """Bounds on H×W after resizing; None means the processor's own default."""

    max_pixels: int
    min_pixels: int | None = None


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    image: DecodedImage
    budget: PixelBudget


@dataclass(frozen=True)
class VideoPart:
    """A clip (a checked file, or a list of pictures) and how to sample it: frames at `sampling.fps`, at most
    `sampling.max_frames`, each within `budget` pixels. Backend-neutral: `frames()` gives the decoded RGB frames
    with their timestamps and the source rate, what any engine (transformers, vLLM) passes on with its metadata."""

    video: DecodedVideo | FrameListVideo
    sampling: VideoSampling
    budget: PixelBudget

    def frames(self) -> VideoFrames:
        return self.video.frames(self.sampling)


Content = str | tuple[TextPart | ImagePart | VideoPart, ...]


@dataclass(frozen=True)
class ToolCall:
    """A function call: from the model (parsed by the front) or in an assistant message of the history."""

    id: str
    name: str
    arguments: str  # a JSON object, as text (as OpenAI sends and expects it)


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: Content
    reasoning_content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages that called tools
    tool_call_id: str | None = None  # a tool message: which call it answers

    @property
    def images(self) -> tuple[ImagePart, ...]:
        if isinstance(self.content, str):
            return ()
        return tuple(p for p in self.content if isinstance(p, ImagePart))

    @property
    def videos(self) -> tuple[VideoPart, ...]:
        if isinstance(self.content, str):
            return ()
        return tuple(p for p in self.content if isinstance(p, VideoPart))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. None = take the model's generation_config.json default."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # Keep generating past end-of-sequence until max_new_tokens (benchmarks; vLLM has the same extension).
    ignore_eos: bool = False


@dataclass(frozen=True)
class StructuredSpec:
    """What the answer must look like, backend-neutral: a JSON schema as text, never a library's object (each
    backend compiles it its own way: the transformers backend with llguidance, vLLM with its structured outputs).

    - json_object: any JSON object.
    - json_schema: an instance of `schema`.
    - tool_calls: one or more `<tool_call>\\n{call}\\n</tool_call>` blocks, each `{call}` an instance of `schema`
      (an anyOf over the tools' {"name": const, "arguments": parameters}); only one block unless `parallel`.
    """

    kind: Literal["json_object", "json_schema", "tool_calls"]
    schema: str = ""  # canonical JSON (sorted keys, no spaces): its hash is the compiled grammar's cache key
    parallel: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""
    # Absolute time.monotonic() deadline; the engine stops the request (finish "error") once it passes.
    deadline: float | None = None
    # Whether max_new_tokens came from the caller (then a context overflow is an error, not a silent cap).
    max_tokens_explicit: bool = False
    # Constrained decoding (response_format, or tool_choice required/named); None = free text.
    structured: StructuredSpec | None = None
    # OpenAI function tools, as the chat template takes them ({"type": "function", "function": {...}}).
    tools: tuple[Mapping[str, Any], ...] = ()
    # Whether the front turns `<tool_call>` blocks in the answer into tool calls (tools given, tool_choice not none).
    parse_tool_calls: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    token_bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    cached_tokens: int = 0
    video_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationChunk:
    """One step's worth of output. The last chunk of a request has finish_reason and usage set."""

    text: str = ""
    reasoning: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: Exception | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # calls completed in this chunk, in order (their index is their position)


# --- what a backend answers ------------------------------------------------------------------------------------------
EngineFinish = Literal["stop", "length", "abort", "error"]


# The lowest logprob reported: JSON cannot carry -inf or NaN, and OpenAI (and vLLM) report -9999.0 instead.
LOGPROB_FLOOR = -9999.0


def reportable_logprob(logprob: float) -> float:
    """`logprob` as a backend reports it in a `TokenChoice`: finite, at least LOGPROB_FLOOR (a token a grammar or
    top-k masked is -inf; isfinite also catches NaN, which no JSON encoder accepts)."""
    return logprob if math.isfinite(logprob) and logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


@dataclass(frozen=True)
class TokenChoice:
    """One generated token's log-probability and the most likely alternatives, as ids (the front names them)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptInfo:
    """What the backend learned preparing the prompt, sent with a request's first output."""

    prompt_tokens: int
    image_tokens: int = 0
    cached_tokens: int = 0
    reasoning_open: bool = False  # the template opened a <think> block that the answer starts inside
    video_tokens: int = 0


@dataclass(frozen=True)
class EngineOutput:
    """Token-level output of one request step. `finish_reason` "stop" means end-of-sequence (stop strings are
    the front's business), "abort" that the front asked to stop, "error" that `error` says why."""

    token_ids: tuple[int, ...] = ()
    choices: tuple[TokenChoice, ...] = ()
    finish_reason: EngineFinish | None = None
    prompt: PromptInfo | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of a backend's counters, exported to Prometheus the same way for every backend."""

    queue_depth: int = 0
    running: int = 0
    decode_steps: int = 0
    prefill_batches: int = 0
    cancelled: int = 0
    # Decode steps requests took part in after they were aborted: at most one each when aborts are prompt.
    steps_after_cancel: int = 0
    max_batch_seen: int = 0
    caches: Mapping[str, CacheCounters] = field(default_factory=dict)
    worker_pid: int | None = None  # the engine's worker process, when it has one
    shared_input_bytes: int = 0  # media bytes handed to the worker process in shared memory (not the socket)
    # What the engine holds on its accelerator (the CUDA allocator's reserved bytes); None on the CPU. The pool
    # counts it against the memory budget there, and the worker's PSS on the CPU.
    device_memory_bytes: int | None = None


def warm_up_request(vlm: bool) -> GenerationRequest:
    """The two-token request every engine runs before it says ready (with a small picture for a VLM)."""
    import io

    from vlmbridge.media.decode import decode_image
    from vlmbridge.tiny.images import demo_picture

    parts: list[TextPart | ImagePart] = [TextPart("Hi")]
    if vlm:
        buf = io.BytesIO()
        demo_picture(64, 64).save(buf, format="PNG")
        parts.insert(0, ImagePart(decode_image(buf.getvalue()), PixelBudget(max_pixels=64 * 64 * 4)))
    return GenerationRequest(
        messages=(ChatMessage("user", tuple(parts)),),
        sampling=SamplingParams(max_new_tokens=2, temperature=0.0),
        request_id="warm-up",
    )
