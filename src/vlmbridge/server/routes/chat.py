"""POST /v1/chat/completions — stream and non-stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vlmbridge.engine.base import RequestStream
from vlmbridge.engine.types import GenerationChunk
from vlmbridge.errors import InvalidRequestError, ModelNotFoundError
from vlmbridge.server.auth import require_api_key
from vlmbridge.server.convert import to_generation_request
from vlmbridge.server.errors import error_body
from vlmbridge.server.payloads import DONE, KEEPALIVE, Completion, sse
from vlmbridge.server.schemas import ChatCompletionRequest
from vlmbridge.server.state import AppState

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter()
_DISCONNECT_POLL = 0.5


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)], response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    vlm: AppState = request.app.state.vlm
    arrived = time.monotonic()
    if body.model != vlm.slot.name:
        raise ModelNotFoundError(f"model {body.model!r} is not served here; this server serves {vlm.slot.name!r}")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options is only allowed with stream: true", param="stream_options")
    engine = vlm.slot.engine
    gen_request = await to_generation_request(body, vlm.settings, vlm.load_image)
    async with vlm.prepare_slots:
        prepared = await asyncio.to_thread(engine.prepare, gen_request)
    stream = engine.submit(prepared)
    completion = Completion(
        id=gen_request.request_id,
        model=vlm.slot.name,
        created=int(time.time()),
        want_logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    vlm.metrics.in_flight.inc()
    if body.stream:
        return StreamingResponse(
            _events(vlm, stream, completion, arrived),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        await _collect(vlm, request, stream, completion, arrived)
    finally:
        stream.cancel()
        vlm.metrics.in_flight.dec()
    return JSONResponse(completion.response())


def _record(vlm: AppState, chunk: GenerationChunk, arrived: float, first: bool) -> None:
    if first:
        vlm.metrics.ttft.observe(time.monotonic() - arrived)
    if chunk.finish_reason is not None and chunk.usage is not None:
        vlm.metrics.prompt_tokens.inc(chunk.usage.prompt_tokens)
        vlm.metrics.image_tokens.inc(chunk.usage.image_tokens)
        vlm.metrics.completion_tokens.inc(chunk.usage.completion_tokens)


async def _collect(
    vlm: AppState, request: Request, stream: RequestStream, completion: Completion, arrived: float
) -> None:
    first = True
    next_check = time.monotonic() + _DISCONNECT_POLL
    while True:
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + _DISCONNECT_POLL
            if await request.is_disconnected():  # nobody to answer: free the engine now
                log.info("%s: client went away; cancelling", completion.id)
                return
        try:
            chunk = await stream.next(timeout=_DISCONNECT_POLL)
        except TimeoutError:
            continue
        if chunk is None:
            return
        if chunk.error is not None:
            raise chunk.error
        _record(vlm, chunk, arrived, first)
        first = False
        completion.add(chunk)


async def _events(vlm: AppState, stream: RequestStream, completion: Completion, arrived: float) -> AsyncIterator[str]:
    keepalive = vlm.settings.keepalive_interval
    first = True
    try:
        yield completion.role_event()
        while True:
            try:
                chunk = await stream.next(timeout=keepalive)
            except TimeoutError:
                yield KEEPALIVE  # a long prefill must not look like a dead connection (Dify times out at ~300 s)
                continue
            if chunk is None:
                break
            if chunk.error is not None:
                log.warning("%s failed mid-stream: %s", completion.id, chunk.error)
                # An `error` chunk without `choices`: Dify raises on it, the openai client raises APIError.
                yield sse(error_body(chunk.error))
                break
            _record(vlm, chunk, arrived, first)
            first = False
            for event in completion.delta_events(chunk):
                yield event
        yield DONE
    finally:
        stream.cancel()  # no-op when finished; stops generation when the client disconnected
        vlm.metrics.in_flight.dec()
