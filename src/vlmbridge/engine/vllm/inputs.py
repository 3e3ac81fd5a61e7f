"""Our side of a vLLM request, on the caller's thread: the prompt's token ids from the model's chat template (control
tokens typed by users kept as text, one placeholder per image for vLLM to expand), the expanded token count and the
context check, and the pictures decoded within their pixel budgets (vLLM gets PIL images, never URLs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmbridge.engine.base import PromptStats
from vlmbridge.engine.transformers.prompt import PromptBuilder
from vlmbridge.engine.types import ChatMessage, GenerationRequest, ImagePart, PixelBudget
from vlmbridge.engine.vllm.mapping import PreparedPrompt
from vlmbridge.errors import ContextLengthError, ImageInputError, InvalidRequestError, NotSupportedError

__all__ = ["VllmInputs", "budget_kwargs", "generation_config"]


class VllmInputs:
    """Thread-safe: requests are prepared on the callers' threads, several at once."""

    def __init__(self, path: Path, *, vlm: bool, context_length: int, default_max_new_tokens: int) -> None:
        self.prompts = _prompt_builder(path, vlm, context_length)
        self.context_length = context_length
        self.default_max_new_tokens = default_max_new_tokens
        self.image_token_id = self.prompts.image_token_id if vlm else None

    def count(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        ids, extra = self._placeholders(messages, None)
        images = sum(len(m.images) for m in messages)
        return PromptStats(prompt_tokens=len(ids) + extra, image_tokens=extra + images)

    def _placeholders(
        self, messages: tuple[ChatMessage, ...], template_kwargs: Any, tools: tuple[Any, ...] = ()
    ) -> tuple[list[int], int]:
        """(prompt ids with one placeholder per image, the tokens the placeholders expand by)."""
        if any(m.videos for m in messages):  # before any work: vLLM would get placeholders without their frames
            raise NotSupportedError(
                "video input is not supported with engine: vllm yet (the transformers engine takes it)",
                param="messages",
            )
        ids = self.prompts.placeholder_ids(messages, template_kwargs, tools=tools)
        parts = [p for m in messages for p in m.images]
        extra = sum(self.prompts.image_tokens_for(*p.image.size, p.budget) - 1 for p in parts)
        if parts and sum(1 for t in ids if t == self.image_token_id) != len(parts):
            raise InvalidRequestError(  # the template dropped or repeated an image
                f"{len(parts)} images but a different number of image placeholders in the prompt", param="messages"
            )
        return ids, extra

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        ids, extra = self._placeholders(request.messages, request.chat_template_kwargs, request.tools)
        parts = [p for m in request.messages for p in m.images]
        prompt_tokens = len(ids) + extra
        image_tokens = extra + len(parts)
        if prompt_tokens >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens ({image_tokens} of them image tokens), but the context is "
                f"{self.context_length}; send fewer or smaller images (lower max_pixels or detail: low) or less text",
                param="messages",
                code="context_length_exceeded",
            )
        room = self.context_length - prompt_tokens
        wanted = request.sampling.max_new_tokens or self.default_max_new_tokens
        if wanted > room:
            if request.max_tokens_explicit:
                raise ContextLengthError(
                    f"max_tokens={wanted} plus the {prompt_tokens}-token prompt exceeds the "
                    f"{self.context_length}-token context; ask for at most {room}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            wanted = room
        images, kwargs = self._images(parts)
        tail = self.prompts.tokenizer.decode(ids[-4:])
        return PreparedPrompt(
            request=request,
            token_ids=ids,
            images=images,
            processor_kwargs=kwargs,
            prompt_tokens=prompt_tokens,
            image_tokens=image_tokens,
            max_new_tokens=wanted,
            reasoning_open=tail.rstrip().endswith("<think>"),
        )

    def _images(self, parts: list[ImagePart]) -> tuple[list[Any], dict[str, Any]]:
        """Decoded pictures for vLLM, and the request's pixel budget as its processor kwargs. One budget for all:
        vLLM's processor resizes them exactly as the transformers engine's does. Mixed budgets (detail: low beside
        high): each picture is resized to its own budget here, and the processor leaves aligned sizes alone."""
        budgets = {p.budget for p in parts}
        images = []
        for part in parts:
            picture = part.image.decode(part.budget.max_pixels)
            try:
                if len(budgets) > 1:
                    w, h = part.image.size
                    new_h, new_w = self.prompts.resized(w, h, part.budget)
                    if (new_w, new_h) != picture.size:
                        picture = picture.resize((new_w, new_h), resample=3)  # bicubic, as the processor
            except (ValueError, OSError) as exc:
                raise ImageInputError(f"image could not be resized: {exc}", param=part.image.param) from None
            finally:
                part.image.release()
            images.append(picture)
        if len(budgets) != 1:
            return images, {}
        (budget,) = budgets
        return images, budget_kwargs(budget)


def budget_kwargs(budget: PixelBudget) -> dict[str, Any]:
    """A pixel budget as vLLM's Qwen-VL processor kwargs (it maps them onto the HF processor's size edges)."""
    kwargs: dict[str, Any] = {"max_pixels": budget.max_pixels}
    if budget.min_pixels is not None:
        kwargs["min_pixels"] = budget.min_pixels
    return kwargs


def _prompt_builder(path: Path, is_vlm: bool, context_length: int) -> PromptBuilder:
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(str(path)) if is_vlm else None  # type: ignore[no-untyped-call]
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(str(path))
    return PromptBuilder(processor, tokenizer, context_length, pixel_cache_bytes=0)


def generation_config(path: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json: transformers' defaults
        return GenerationConfig()  # type: ignore[no-untyped-call]
