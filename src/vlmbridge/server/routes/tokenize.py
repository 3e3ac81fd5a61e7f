"""POST /v1/tokenize (also /tokenize, vLLM's path): count a chat prompt's tokens, images included, without generating.

Request (vLLM's chat form): {"model"?, "messages", "max_pixels"?, "min_pixels"?}; response: {"count",
"max_model_len", "image_tokens", "model"}. vLLM also returns the token ids; token counters (Dify's plugin) need only
the count, so we leave them out.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlmbridge.engine.base import PromptStats
from vlmbridge.errors import ContextLengthError
from vlmbridge.pool import Copy, EngineSlot
from vlmbridge.server.convert import hold_images, to_generation_request
from vlmbridge.server.jsonbody import StrictJSONRoute
from vlmbridge.server.routes.chat import check_text_length
from vlmbridge.server.schemas import ChatCompletionRequest, Message
from vlmbridge.server.state import AppState

__all__ = ["TokenizeRequest", "router"]

router = APIRouter(route_class=StrictJSONRoute)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, min_length=1, max_length=512)
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_pixels: int | None = Field(None, ge=1, description="extension: per-request pixel budget per image")
    min_pixels: int | None = Field(None, ge=1, description="extension: per-request minimum pixels per image")

    @model_validator(mode="after")
    def _consistent(self) -> TokenizeRequest:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self


@router.post("/v1/tokenize")
@router.post("/tokenize", include_in_schema=False)
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    vlm: AppState = request.app.state.vlm
    slot = vlm.pool.resolve(body.model)
    name = slot.name
    copy = await vlm.pool.acquire(slot)
    try:
        stats, context = await _count(vlm, slot, copy, body)
    finally:
        slot.release(copy)
    if stats.prompt_tokens >= context:  # what generating would answer, so a counter can trust a 200
        raise ContextLengthError(
            f"the prompt is {stats.prompt_tokens} tokens ({stats.image_tokens} of them image tokens), but the context "
            f"is {context}; send fewer or smaller images (lower max_pixels or detail: low) or less text",
            param="messages",
            code="context_length_exceeded",
        )
    return JSONResponse(
        {
            "model": name,
            "count": stats.prompt_tokens,
            "image_tokens": stats.image_tokens,
            "video_tokens": stats.video_tokens,
            "max_model_len": context,
        }
    )


async def _count(vlm: AppState, slot: EngineSlot, copy: Copy, body: TokenizeRequest) -> tuple[PromptStats, int]:
    name = slot.name
    engine = copy.engine
    life = vlm.lifecycle
    life.admit(vlm.settings, engine.queue_depth())  # images are fetched and their headers read: admit first
    tools = copy.client_or_refuse(name).tools
    check_text_length(body.messages, engine.info.context_length, tools.max_token_chars)
    # The chat route's own conversion: the same image loading, limits and pixel budgets, so the count matches.
    chat = ChatCompletionRequest.model_construct(
        model=name, messages=body.messages, max_pixels=body.max_pixels, min_pixels=body.min_pixels
    )
    life.waiting += 1
    try:
        gen_request = await to_generation_request(chat, vlm.settings_for(slot), vlm.load_image, vlm.load_video)
        has_video = any(m.videos for m in gen_request.messages)
        async with vlm.prepare_slots:
            # The front's own count: no decoding, no processor, no engine time. Not for clips: how many frames a
            # clip gives (and Qwen3-VL's timestamp text) is only known once decoded, so the backend counts them.
            if tools.counter is not None and not has_video:
                stats = await asyncio.to_thread(tools.counter.count, gen_request.messages)
            else:
                async with hold_images(vlm.pixel_gate, gen_request):
                    stats = await asyncio.to_thread(engine.count_prompt, gen_request.messages)
    finally:
        life.waiting -= 1
    return stats, engine.info.context_length
