"""Turn chat messages into model inputs with the model's own processor and chat template.

Images reach the image processor as decoded PIL images only, one at a time at their own pixel budget, and their
processed pixels are kept per content and budget (`PixelCache`): a follow-up turn that resends a picture neither
decodes nor processes it again (see `pixels`). Control tokens typed by users (`<|image_pad|>`, `<|im_end|>`, …)
are encoded as plain text (transformers' `sanitize_control_tokens`), so a prompt cannot forge image placeholders
or end a turn early.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.context import check_prompt_fits
from vlmbridge.engine.transformers.caches import PixelCache
from vlmbridge.engine.transformers.pixels import ImagePixels, image_key
from vlmbridge.engine.transformers.videos import VideoPixels, video_key
from vlmbridge.engine.types import ChatMessage, GenerationRequest, PixelBudget, TextPart, ToolCall, VideoPart
from vlmbridge.errors import InvalidRequestError
from vlmbridge.geometry import smart_resize, tokens_for_image

__all__ = ["DEFAULT_PIXEL_CACHE_BYTES", "RESERVED_TEMPLATE_KWARGS", "ModelInputs", "PreparedRequest", "PromptBuilder"]

DEFAULT_PIXEL_CACHE_BYTES = 256 << 20  # the serve default (--pixel-cache-mb 256)

# apply_chat_template's own parameters: a client's chat_template_kwargs must not override them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "chat_template", "tools", "documents", "add_generation_prompt", "continue_final_message",
        "return_assistant_tokens_mask", "tokenize", "return_tensors", "return_dict", "processor_kwargs",
        "sanitize_control_tokens", "load_audio_from_video", "messages", "padding", "truncation", "max_length",
    }
)  # fmt: skip


@dataclass
class ModelInputs:
    """Tensors for one prompt (batch of 1) plus the counts the API reports."""

    tensors: dict[str, Any]  # input_ids, attention_mask, and for VLMs mm_token_type_ids/pixel_values/image_grid_thw
    prompt_tokens: int
    image_tokens: int
    image_keys: tuple[str, ...]  # digest@budget per image, in prompt order (for encoder caches)
    image_spans: tuple[tuple[int, int], ...]  # [start, end) of each image's placeholder run in input_ids
    ends_in_think_block: bool  # the template opened a <think> block for the answer
    video_tokens: int = 0
    video_keys: tuple[str, ...] = ()  # digest@sampling@budget per clip, in prompt order
    # [start, end) from each clip's first placeholder to its last (Qwen3-VL puts timestamps between frames)
    video_spans: tuple[tuple[int, int], ...] = ()

    @property
    def media_spans(self) -> tuple[tuple[int, int], ...]:
        return self.image_spans + self.video_spans

    @property
    def input_ids(self) -> Any:
        return self.tensors["input_ids"]


@dataclass
class PreparedRequest:
    """A request with its model inputs built and its completion length settled."""

    request: GenerationRequest
    inputs: ModelInputs
    max_new_tokens: int
    grammar: Any = None  # request.structured's matcher (grammar.Constraint), None for free text


class PromptBuilder:
    """Thread-safe: prompts are built on the callers' threads, several at once.

    `pixel_cache_bytes` bounds the processed-pixel cache (0 = off); `pixel_cache` is None when off or text-only.
    """

    def __init__(
        self,
        processor: Any | None,
        tokenizer: Any,
        context_length: int,
        *,
        pixel_cache_bytes: int = DEFAULT_PIXEL_CACHE_BYTES,
        image_token: str = "<|image_pad|>",
    ) -> None:
        self.processor = processor
        self.tokenizer = tokenizer
        self.context_length = context_length
        image_processor = getattr(processor, "image_processor", None)
        self._patch = int(getattr(image_processor, "patch_size", 14) or 14)
        self._merge = int(getattr(image_processor, "merge_size", 2) or 2)
        size = getattr(image_processor, "size", None)
        self.default_min_pixels = int(getattr(size, "shortest_edge", None) or 3136)
        self.image_token_id = self._token_id(image_token)  # the family's placeholder (see family.py)
        self.think_end_id = self._token_id("</think>")  # where a thinking model's answer begins
        self.pixel_cache = PixelCache(pixel_cache_bytes) if processor is not None and pixel_cache_bytes > 0 else None
        self._pixels = ImagePixels(processor, self.pixel_cache, self.default_min_pixels)
        self._videos = VideoPixels(processor, self.pixel_cache)
        self.video_token_id = self._token_id("<|video_pad|>")
        self._template_vars = _template_variables(processor if processor is not None else tokenizer)

    @property
    def is_vlm(self) -> bool:
        return self.processor is not None

    @property
    def image_factor(self) -> int:
        return self._patch * self._merge

    def _token_id(self, token: str) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return int(tid) if isinstance(tid, int) and tid != unk else None

    def image_tokens_for(self, width: int, height: int, budget: PixelBudget) -> int:
        """`<|image_pad|>` tokens an image of this size takes under `budget` (geometry's one rule)."""
        return tokens_for_image(
            width, height, patch_size=self._patch, merge_size=self._merge,
            min_pixels=budget.min_pixels or self.default_min_pixels, max_pixels=budget.max_pixels,
        )  # fmt: skip

    def resized(self, width: int, height: int, budget: PixelBudget) -> tuple[int, int]:
        min_px = budget.min_pixels or self.default_min_pixels
        return smart_resize(height, width, self.image_factor, min_px, budget.max_pixels)

    # --- building ---------------------------------------------------------------------------------------
    def template_messages(self, messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
        """Our messages in the chat-template format (each image a placeholder: its pixels come processed)."""
        out: list[dict[str, Any]] = []
        for i, msg in enumerate(messages):
            if isinstance(msg.content, str):
                content: Any = msg.content
            elif not self.is_vlm:
                if msg.images:
                    raise InvalidRequestError(
                        "this model is text-only and cannot take image input",
                        param=f"messages[{i}].content",
                        code="image_input_not_supported",
                    )
                if msg.videos:
                    raise InvalidRequestError(
                        "this model is text-only and cannot take video input",
                        param=f"messages[{i}].content",
                        code="video_input_not_supported",
                    )
                content = "".join(p.text for p in msg.content if isinstance(p, TextPart))
            else:
                if msg.videos and not self._videos.supported:
                    raise InvalidRequestError(
                        "this model's processor has no video processor and cannot take video input",
                        param=f"messages[{i}].content",
                        code="video_input_not_supported",
                    )
                content = [
                    {"type": "text", "text": part.text}
                    if isinstance(part, TextPart)
                    else {"type": "video", "video": self._videos.placeholder}
                    if isinstance(part, VideoPart)
                    else {"type": "image", "image": self._pixels.placeholder}
                    for part in msg.content
                ]
            entry: dict[str, Any] = {"role": msg.role, "content": content}
            if msg.reasoning_content:
                entry["reasoning_content"] = msg.reasoning_content
            if msg.tool_calls:
                entry["tool_calls"] = [_template_call(call) for call in msg.tool_calls]
            if msg.tool_call_id is not None:
                entry["tool_call_id"] = msg.tool_call_id
            out.append(entry)
        return out

    def template_kwargs(self, template_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        """A client's chat_template_kwargs, checked: none of apply_chat_template's own, only what it reads."""
        kwargs = dict(template_kwargs or {})
        bad = sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs"
            )
        # Only what the template reads (as vLLM does): other keys would reach the processor as its own options,
        # and its warnings would write client-chosen text into the log.
        if self._template_vars is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._template_vars}
        return kwargs

    def placeholder_ids(
        self,
        messages: tuple[ChatMessage, ...],
        template_kwargs: Mapping[str, Any] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> list[int]:
        """The prompt's token ids with ONE image placeholder per image, unexpanded (what an engine that runs the
        processor itself, like vLLM, takes); control tokens typed by users are encoded as text."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        conv = self.template_messages(messages)
        owner = self.processor if self.processor is not None else self.tokenizer
        with _template_errors():
            ids = self.tokenizer.apply_chat_template(
                conv,
                chat_template=getattr(owner, "chat_template", None),
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
                sanitize_control_tokens=True,
                **({"tools": [dict(tool) for tool in tools]} if tools else {}),
                **self.template_kwargs(template_kwargs),
            )
        return [int(t) for t in ids]

    def build(
        self,
        messages: tuple[ChatMessage, ...],
        template_kwargs: Mapping[str, Any] | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> ModelInputs:
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        kwargs = self.template_kwargs(template_kwargs)
        conv = self.template_messages(messages)
        parts = [p for m in messages for p in m.images]
        processed = self._pixels.process(parts) if self.processor is not None else []
        clips = [p for m in messages for p in m.videos]
        videos = self._videos.outputs(self._videos.process(clips)) if clips else None
        common: dict[str, Any] = dict(
            tokenize=True,
            add_generation_prompt=True,  # as vLLM: a trailing assistant message is history, a new turn follows
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=True,
            **kwargs,
        )
        if tools:  # the template renders them its own way (Qwen: a # Tools block in the system turn)
            common["tools"] = [dict(tool) for tool in tools]
        with _template_errors():
            if self.processor is not None:
                enc = self._pixels.processor_for(processed, videos).apply_chat_template(conv, **common)
            else:
                enc = self.tokenizer.apply_chat_template(conv, **common)
        tensors = dict(enc)
        ids = tensors["input_ids"]
        prompt_tokens = int(ids.shape[-1])
        image_tokens = int((ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        video_tokens = int((ids == self.video_token_id).sum()) if clips and self.video_token_id is not None else 0
        check_prompt_fits(prompt_tokens, image_tokens, video_tokens if clips else None, self.context_length)
        tail = self.tokenizer.decode(ids[0, -4:].tolist())
        spans = _runs(ids[0].tolist(), self.image_token_id)
        if len(spans) != len(parts):
            raise InvalidRequestError(  # an image cut by the template would fail inside the model
                f"{len(parts)} images but {len(spans)} image placeholder runs in the prompt", param="messages"
            )
        video_spans = self._video_spans(ids[0].tolist(), tensors.get("video_grid_thw"), len(clips))
        return ModelInputs(
            tensors=tensors,
            prompt_tokens=prompt_tokens,
            image_tokens=image_tokens,
            image_keys=tuple(image_key(p) for p in parts),
            image_spans=tuple(spans),
            ends_in_think_block=tail.rstrip().endswith("<think>"),
            video_tokens=video_tokens,
            video_keys=tuple(video_key(p) for p in clips),
            video_spans=video_spans,
        )

    def _video_spans(self, ids: list[int], grids: Any, count: int) -> tuple[tuple[int, int], ...]:
        """[first, last] placeholder of each clip: its runs of video tokens add up to its grid's token count."""
        if not count:
            return ()
        merge = int(getattr(self._videos.video_processor, "merge_size", self._merge) or self._merge)
        runs = iter(_runs(ids, self.video_token_id))
        spans: list[tuple[int, int]] = []
        for i in range(count):
            want = int(grids[i].prod()) // merge**2
            first = run = next(runs, None)
            got = 0
            while run is not None:
                got += run[1] - run[0]
                if got >= want:
                    break
                run = next(runs, None)
            if first is None or run is None or got != want:
                raise InvalidRequestError(  # a clip cut by the template would fail inside the model
                    f"{count} videos but their placeholders in the prompt do not match", param="messages"
                )
            spans.append((first[0], run[1]))
        return tuple(spans)


def _template_call(call: ToolCall) -> dict[str, Any]:
    """A history tool call as chat templates take it: arguments as an object (as vLLM passes them; the Qwen
    templates write `arguments | tojson`, which would quote a string again)."""
    try:
        arguments: Any = json.loads(call.arguments)
    except ValueError:
        arguments = call.arguments  # the front checked it; a template that wants text still gets it
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


@contextlib.contextmanager
def _template_errors() -> Iterator[None]:
    """Template errors (e.g. raise_exception for an unsupported role order) are the caller's input: a 400."""
    try:
        yield
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
    except Exception as exc:  # jinja2.TemplateError and friends
        if type(exc).__module__.startswith("jinja2"):
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
        raise


def _runs(ids: list[int], token: int | None) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of `token` in ids."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*ids, None]):
        if t == token and token is not None:
            if start is None:
                start = i
        elif start is not None:
            runs.append((start, i))
            start = None
    return runs


def _template_variables(owner: Any) -> frozenset[str] | None:
    """The variables the chat template reads (None: unknown, pass everything)."""
    template = getattr(owner, "chat_template", None)
    if not isinstance(template, str):
        return None
    try:
        from jinja2 import Environment, meta

        return frozenset(meta.find_undeclared_variables(Environment().parse(template)))
    except Exception:  # a template jinja2 cannot parse here fails later, with the caller's messages
        return None
