"""OpenAI request → engine request: messages with checked images, pixel budgets and sampling settings.

Images arrive header-checked, not decoded: their pixels are decoded in the engine's preparation step (or never,
when the processed pixels are cached). `hold_images` reserves what that decoding may take.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from vlmbridge.engine.types import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    PixelBudget,
    SamplingParams,
    TextPart,
    ToolCall,
    VideoPart,
)
from vlmbridge.errors import ImageInputError, VideoInputError
from vlmbridge.media.decode import DecodedImage
from vlmbridge.media.framelist import FrameListVideo
from vlmbridge.media.inflight import PixelGate, PixelReservation
from vlmbridge.media.limits import in_flight_limit, request_limit
from vlmbridge.media.video import DecodedVideo, VideoSampling
from vlmbridge.server.schemas import ChatCompletionRequest, ContentPart
from vlmbridge.server.structured import response_format_spec, tool_call_spec
from vlmbridge.settings import Settings

__all__ = [
    "ImageLoader",
    "VideoLoader",
    "hold_images",
    "pixel_budget",
    "request_pixels",
    "to_generation_request",
    "video_pixels",
    "video_sampling",
]

ImageLoader = Callable[[str, str], Awaitable[DecodedImage]]  # (url, param) -> decoded image
VideoLoader = Callable[[str, str], Awaitable[DecodedVideo]]  # (url, param) -> header-checked clip


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


def video_sampling(part: ContentPart, settings: Settings, param: str) -> tuple[VideoSampling, PixelBudget]:
    """A clip's sampling and per-frame budget: the part's own fields, else the server's defaults, within its caps."""
    spec = part.video_url
    fps = spec.fps if spec is not None and spec.fps is not None else settings.video_fps
    default = min(settings.video_max_frames, settings.max_video_frames)
    frames = spec.max_frames if spec is not None and spec.max_frames is not None else default
    if frames > settings.max_video_frames:
        raise VideoInputError(
            f"max_frames {frames} is more than the {settings.max_video_frames} frames per video this server takes",
            param=f"{param}.max_frames",
            code="too_many_frames",
        )
    pixels = settings.video_max_pixels
    if spec is not None and spec.max_pixels is not None:
        pixels = min(pixels, spec.max_pixels)
    floor = min(settings.min_pixels, pixels) if settings.min_pixels is not None else None
    return VideoSampling(fps=fps, max_frames=frames, max_pixels=pixels), PixelBudget(pixels, floor)


async def _load_videos(
    req: ChatCompletionRequest, settings: Settings, load_image: ImageLoader, load_video: VideoLoader | None
) -> dict[tuple[int, int], VideoPart]:
    """Every video part, loaded (files header-checked, frame lists picture by picture), by (message, part)."""
    slots = [
        (mi, pi, part)
        for mi, message in enumerate(req.messages)
        if isinstance(message.content, list)
        for pi, part in enumerate(message.content)
        if part.video_url is not None or part.video is not None
    ]
    if len(slots) > settings.max_videos:
        raise VideoInputError(
            f"{len(slots)} videos in one request; this server accepts at most {settings.max_videos}",
            param="messages",
            code="too_many_videos",
        )

    async def one(mi: int, pi: int, part: ContentPart) -> VideoPart:
        param = f"messages[{mi}].content[{pi}]"
        sampling, budget = video_sampling(part, settings, f"{param}.video_url")
        if part.video_url is not None:
            if load_video is None:
                raise VideoInputError("this server does not take video files", param=param, code="video_url_refused")
            return VideoPart(await load_video(part.video_url.url, f"{param}.video_url"), sampling, budget)
        urls = part.video or []
        if len(urls) > settings.max_video_frames:
            raise VideoInputError(
                f"a frame list of {len(urls)} pictures is more than the {settings.max_video_frames} frames per video "
                "this server takes",
                param=f"{param}.video",
                code="too_many_frames",
            )
        images = await asyncio.gather(*(load_image(url, f"{param}.video[{i}]") for i, url in enumerate(urls)))
        return VideoPart(FrameListVideo(tuple(images), fps=sampling.fps, param=f"{param}.video"), sampling, budget)

    parts = await asyncio.gather(*(one(mi, pi, part) for mi, pi, part in slots))
    return {(mi, pi): part for (mi, pi, _), part in zip(slots, parts, strict=True)}


async def to_generation_request(
    req: ChatCompletionRequest, settings: Settings, load_image: ImageLoader, load_video: VideoLoader | None = None
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
    _check_request_pixels(list(images.values()), settings)
    videos = await _load_videos(req, settings, load_image, load_video)

    messages: list[ChatMessage] = []
    for mi, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None:
            content: str | tuple[TextPart | ImagePart | VideoPart, ...] = ""
        elif isinstance(message.content, str):
            content = message.content
        else:
            parts: list[TextPart | ImagePart | VideoPart] = []
            for pi, part in enumerate(message.content):
                media = images.get((mi, pi)) or videos.get((mi, pi))
                parts.append(media if media is not None else TextPart(part.text or ""))
            content = tuple(parts)
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
        messages.append(
            ChatMessage(
                role=role,
                content=content,
                reasoning_content=message.reasoning_content,
                tool_calls=calls,
                tool_call_id=message.tool_call_id,
            )
        )

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
        **_structured_fields(req),
    )


def _structured_fields(req: ChatCompletionRequest) -> dict[str, Any]:
    """response_format and tools: the grammar spec, the tools for the template, whether to parse calls."""
    tools = tuple(t.model_dump(exclude_none=True) for t in req.tools or ())
    spec = tool_call_spec(tools, req.forced_tool, req.parallel_tool_calls) if tools else None
    if spec is None and req.response_format is not None:
        spec = response_format_spec(req.response_format.type, req.response_format.json_schema)
    # tool_choice none: the tools stay in the prompt (as OpenAI and vLLM do) but the answer is text.
    return {"structured": spec, "tools": tools, "parse_tool_calls": bool(tools) and req.tool_choice != "none"}


def _parts(messages: tuple[ChatMessage, ...]) -> list[ImagePart]:
    return [p for m in messages for p in m.images]


def _decoded_pixels(parts: list[ImagePart]) -> int:
    return sum(p.image.decoded_pixels(p.budget.max_pixels) for p in parts)


def request_pixels(request: GenerationRequest) -> int:
    """Pixels decoding this request's images may take at once (from their headers; JPEGs decode reduced)."""
    return _decoded_pixels(_parts(request.messages))


def _check_request_pixels(parts: list[ImagePart], settings: Settings) -> None:
    total = _decoded_pixels(parts)
    limit = min(request_limit(settings.max_pixels), in_flight_limit(settings))
    if total > limit:
        raise ImageInputError(
            f"the request's {len(parts)} images decode to {total} pixels together, more than the {limit} allowed "
            "per request; send fewer or smaller images",
            param="messages",
            code="image_too_large",
        )


def hold_images(gate: PixelGate, request: GenerationRequest) -> PixelReservation:
    """Reserve the decoded pixels of the request's images on the server-wide gate (429 QueueFullError when over
    it). Hold it across the engine's preparation; leaving it drops the decoded pixels and gives the room back.
    Images the backend has cached processed are never decoded: reserving them too errs on the safe side.
    Clips reserve what their sampled frames may hold at once (`video_pixels`)."""
    parts = _parts(request.messages)
    return gate.hold(_decoded_pixels(parts) + video_pixels(request), [p.image for p in parts])


def video_pixels(request: GenerationRequest) -> int:
    """Pixels the request's clips may hold decoded at once: every sampled frame, kept at up to 2× its budget."""
    clips = [p for m in request.messages for p in m.videos]
    return sum(p.sampling.max_frames * 2 * p.budget.max_pixels for p in clips)
