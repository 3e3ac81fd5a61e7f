"""Turn chat messages into model inputs with the model's own processor and chat template.

Images reach the processor as decoded PIL images only. Control tokens typed by users (`<|image_pad|>`,
`<|im_end|>`, …) are encoded as plain text (transformers' `sanitize_control_tokens`), so a prompt cannot forge
image placeholders or end a turn early.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.types import ChatMessage, ImagePart, PixelBudget, TextPart
from vlmbridge.errors import ContextLengthError, InvalidRequestError

__all__ = ["RESERVED_TEMPLATE_KWARGS", "ModelInputs", "PromptBuilder"]

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

    @property
    def input_ids(self) -> Any:
        return self.tensors["input_ids"]


class PromptBuilder:
    def __init__(self, processor: Any | None, tokenizer: Any, context_length: int) -> None:
        self.processor = processor
        self.tokenizer = tokenizer
        self.context_length = context_length
        image_processor = getattr(processor, "image_processor", None)
        self._patch = int(getattr(image_processor, "patch_size", 14) or 14)
        self._merge = int(getattr(image_processor, "merge_size", 2) or 2)
        size = getattr(image_processor, "size", None)
        self.default_min_pixels = int(getattr(size, "shortest_edge", None) or 3136)
        self.image_token_id = self._token_id("<|image_pad|>")

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
        """`<|image_pad|>` tokens an image of this size takes under `budget` (the processor's own resize rule)."""
        h, w = self.resized(width, height, budget)
        return (h // self._patch) * (w // self._patch) // (self._merge**2)

    def resized(self, width: int, height: int, budget: PixelBudget) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        min_px = budget.min_pixels or self.default_min_pixels
        h, w = smart_resize(height, width, factor=self.image_factor, min_pixels=min_px, max_pixels=budget.max_pixels)
        return int(h), int(w)

    # --- building ---------------------------------------------------------------------------------------
    def template_messages(self, messages: tuple[ChatMessage, ...], images: list[Any]) -> list[dict[str, Any]]:
        """Our messages in the chat-template format; appends each image (resized if needed) to `images`."""
        budgets = [p.budget for m in messages for p in m.images]
        uniform = len(set(budgets)) <= 1
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
                content = "".join(p.text for p in msg.content if isinstance(p, TextPart))
            else:
                content = []
                for part in msg.content:
                    if isinstance(part, TextPart):
                        content.append({"type": "text", "text": part.text})
                    else:
                        pil = part.image.image if uniform else self._pre_resize(part)
                        images.append(pil)
                        content.append({"type": "image", "image": pil})
            entry: dict[str, Any] = {"role": msg.role, "content": content}
            if msg.reasoning_content:
                entry["reasoning_content"] = msg.reasoning_content
            out.append(entry)
        return out

    def _pre_resize(self, part: ImagePart) -> Any:
        # Mixed budgets in one request: the processor takes one size per call, so fit each image to its own
        # budget first; the processor's resize then keeps it as it is.
        w, h = part.image.size
        th, tw = self.resized(w, h, part.budget)
        return part.image.image if (tw, th) == (w, h) else part.image.image.resize((tw, th), resample=3)

    def build(self, messages: tuple[ChatMessage, ...], template_kwargs: Mapping[str, Any] | None = None) -> ModelInputs:
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        kwargs = dict(template_kwargs or {})
        bad = sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs"
            )
        images: list[Any] = []
        conv = self.template_messages(messages, images)
        parts = [p for m in messages for p in m.images]
        common: dict[str, Any] = dict(
            tokenize=True,
            add_generation_prompt=True,  # as vLLM: a trailing assistant message is history, a new turn follows
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=True,
            **kwargs,
        )
        try:
            if self.processor is not None:
                size = self._size_kwargs(parts, images)
                enc = self.processor.apply_chat_template(conv, processor_kwargs=size, **common)
            else:
                enc = self.tokenizer.apply_chat_template(conv, **common)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            # Template errors (e.g. raise_exception for an unsupported role order) are the caller's input.
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
        except Exception as exc:  # jinja2.TemplateError and friends
            if type(exc).__module__.startswith("jinja2"):
                raise InvalidRequestError(
                    f"the chat template rejected these messages: {exc}", param="messages"
                ) from None
            raise
        tensors = dict(enc)
        ids = tensors["input_ids"]
        prompt_tokens = int(ids.shape[-1])
        image_tokens = int((ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        if prompt_tokens >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens ({image_tokens} of them image tokens), but the context is "
                f"{self.context_length}; send fewer or smaller images (lower max_pixels or detail: low) or less text",
                param="messages",
                code="context_length_exceeded",
            )
        tail = self.tokenizer.decode(ids[0, -4:].tolist())
        spans = _runs(ids[0].tolist(), self.image_token_id)
        if len(spans) != len(parts):
            raise InvalidRequestError(  # an image cut by the template would fail inside the model
                f"{len(parts)} images but {len(spans)} image placeholder runs in the prompt", param="messages"
            )
        return ModelInputs(
            tensors=tensors,
            prompt_tokens=prompt_tokens,
            image_tokens=image_tokens,
            image_keys=tuple(f"{p.image.digest}@{p.budget.min_pixels}-{p.budget.max_pixels}" for p in parts),
            image_spans=tuple(spans),
            ends_in_think_block=tail.rstrip().endswith("<think>"),
        )

    def _size_kwargs(self, parts: list[ImagePart], images: list[Any]) -> dict[str, Any]:
        if not parts:
            return {}
        if len({p.budget for p in parts}) == 1:
            b = parts[0].budget
            return {
                "size": {
                    "shortest_edge": b.min_pixels or self.default_min_pixels,
                    "longest_edge": b.max_pixels,
                }
            }
        areas = [im.size[0] * im.size[1] for im in images]
        return {"size": {"shortest_edge": min(areas), "longest_edge": max(areas)}}


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
