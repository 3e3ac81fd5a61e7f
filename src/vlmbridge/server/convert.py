"""OpenAI request → engine request: messages with decoded images, pixel budgets and sampling settings."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from vlmbridge.engine.types import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    PixelBudget,
    SamplingParams,
    TextPart,
)
from vlmbridge.errors import ImageInputError
from vlmbridge.media.decode import DecodedImage
from vlmbridge.server.schemas import ChatCompletionRequest
from vlmbridge.settings import Settings

__all__ = ["ImageLoader", "pixel_budget", "to_generation_request"]

ImageLoader = Callable[[str, str], Awaitable[DecodedImage]]  # (url, param) -> decoded image


def pixel_budget(req: ChatCompletionRequest, detail: str, settings: Settings) -> PixelBudget:
    """OpenAI `detail` and the max/min_pixels extension, both capped by the server's limits."""
    cap = settings.max_pixels
    if detail == "low":
        cap = min(cap, settings.low_detail_pixels)
    if req.max_pixels is not None:
        cap = min(cap, req.max_pixels)
    floor = req.min_pixels if req.min_pixels is not None else settings.min_pixels
    if floor is not None:
        floor = min(floor, cap)
    return PixelBudget(max_pixels=cap, min_pixels=floor)


async def to_generation_request(
    req: ChatCompletionRequest, settings: Settings, load_image: ImageLoader
) -> GenerationRequest:
    image_slots: list[tuple[int, int, str, str, PixelBudget]] = []  # (message, part, url, param, budget)
    for mi, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for pi, part in enumerate(message.content):
                if part.image_url is not None:
                    param = f"messages[{mi}].content[{pi}].image_url"
                    budget = pixel_budget(req, part.image_url.detail, settings)
                    image_slots.append((mi, pi, part.image_url.url, param, budget))
    if len(image_slots) > settings.max_images:
        raise ImageInputError(
            f"{len(image_slots)} images in one request; this server accepts at most {settings.max_images}",
            param="messages",
            code="too_many_images",
        )
    decoded = await asyncio.gather(*(load_image(url, param) for _, _, url, param, _ in image_slots))
    images = {
        (mi, pi): ImagePart(img, budget) for (mi, pi, _, _, budget), img in zip(image_slots, decoded, strict=True)
    }

    messages: list[ChatMessage] = []
    for mi, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None:
            content: str | tuple[TextPart | ImagePart, ...] = ""
        elif isinstance(message.content, str):
            content = message.content
        else:
            parts: list[TextPart | ImagePart] = []
            for pi, part in enumerate(message.content):
                parts.append(images[(mi, pi)] if part.image_url is not None else TextPart(part.text or ""))
            content = tuple(parts)
        messages.append(ChatMessage(role=role, content=content, reasoning_content=message.reasoning_content))

    max_tokens = req.requested_max_tokens
    seed = req.seed % (2**63) if req.seed is not None else None
    top_k = None if req.top_k is None else max(req.top_k, 0)
    return GenerationRequest(
        messages=tuple(messages),
        sampling=SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=top_k,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=seed,
            stop=req.stop_list,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs or 0,
            ignore_eos=req.ignore_eos,
        ),
        chat_template_kwargs=req.template_kwargs,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        deadline=time.monotonic() + settings.request_timeout,
        max_tokens_explicit=max_tokens is not None,
    )
