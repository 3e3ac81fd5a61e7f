"""POST /v1/chat/completions — stream and non-stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from vlmbridge.engine.types import GenerationChunk
from vlmbridge.errors import ContextLengthError, InvalidRequestError, RequestTimeoutError, VlmbridgeError
from vlmbridge.output.client import ChunkStream
from vlmbridge.pool import Copy, EngineSlot, wait_for_load
from vlmbridge.server.convert import hold_images, to_generation_request
from vlmbridge.server.errors import bounded_traceback, error_body
from vlmbridge.server.jsonbody import StrictJSONRoute
from vlmbridge.server.payloads import DONE, KEEPALIVE, Completion, sse
from vlmbridge.server.schemas import ChatCompletionRequest, Message
from vlmbridge.server.state import AppState

__all__ = ["check_text_length", "router"]

log = logging.getLogger(__name__)
router = APIRouter(route_class=StrictJSONRoute)
_DISCONNECT_POLL = 0.5


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    vlm: AppState = request.app.state.vlm
    arrived = time.monotonic()
    deadline = arrived + vlm.settings.request_timeout
    slot = vlm.pool.resolve(body.model)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options is only allowed with stream: true", param="stream_options")
    if body.stream and (loading := vlm.pool.pending_load(slot)) is not None:
        # The model loads first: the stream starts now and keeps the connection alive until it can generate.
        ends: list[Callable[[], None]] = []
        late = _after_load(vlm, slot, loading, body, arrived, deadline, ends)

        def end_all() -> None:
            for end in ends:
                end()

        return _EventStream(late, end_all)
    copy = await _acquire(vlm, slot, deadline)
    stream, completion, done = await _start(vlm, slot, copy, body)
    if body.stream:
        return _EventStream(_events(vlm, slot.name, stream, completion, arrived, deadline), done)
    try:
        await _collect(vlm, slot.name, request, stream, completion, arrived, deadline)
    finally:
        done()
    return JSONResponse(completion.response())


async def _acquire(vlm: AppState, slot: EngineSlot, deadline: float) -> Copy:
    """Lease the model, waiting for it to load if it must, within the request's deadline (the load goes on)."""
    try:
        return await asyncio.wait_for(vlm.pool.acquire(slot), timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise RequestTimeoutError(f"the request ran past its timeout while model {slot.name!r} loaded") from None


async def _start(
    vlm: AppState, slot: EngineSlot, copy: Copy, body: ChatCompletionRequest
) -> tuple[ChunkStream, Completion, Callable[[], None]]:
    """Admit, convert and hand the request to the leased copy of the model; `done` ends it (and the lease)."""
    life = vlm.lifecycle
    try:
        engine = copy.engine
        # Cheap checks first: a refused request must cost about what a 404 costs, not an image decode.
        life.admit(vlm.settings, engine.queue_depth())
        client = copy.client_or_refuse(slot.name)
        check_text_length(body.messages, engine.info.context_length, client.tools.max_token_chars)
    except BaseException:
        slot.release(copy)
        raise
    life.in_flight += 1
    try:
        life.waiting += 1
        try:
            gen_request = await to_generation_request(body, vlm.settings_for(slot), vlm.load_image, vlm.load_video)
            # Decoded pixels are reserved from the image headers before waiting for a preparation slot (only for
            # work in this process: a worker bounds its own, and holding a slot through its round trip would admit
            # a burst of requests two at a time).
            slots = vlm.prepare_slots if engine.prepares_in_process else contextlib.nullcontext()
            async with hold_images(vlm.pixel_gate, gen_request), slots:
                stream = await asyncio.to_thread(client.generate, gen_request)
        finally:
            life.waiting -= 1
    except BaseException:
        life.in_flight -= 1
        slot.release(copy)
        raise
    life.streams.add(stream)

    def done() -> None:  # however the request ends: a stream's response runs it, even if the client left early
        life.streams.discard(stream)
        stream.close()  # no-op when finished; stops generation when the client went away
        life.in_flight -= 1
        slot.release(copy)

    completion = Completion(
        id=gen_request.request_id,
        model=slot.name,
        created=int(time.time()),
        want_logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        usage_on_finish=vlm.settings.stream_usage == "always",
    )
    return stream, completion, done


async def _after_load(
    vlm: AppState,
    slot: EngineSlot,
    loading: Future[None],
    body: ChatCompletionRequest,
    arrived: float,
    deadline: float,
    ends: list[Callable[[], None]],
) -> AsyncIterator[str]:
    """A stream whose model is still loading: SSE keep-alive comments until it is ready, then the answer; a load
    that fails (or a request refused after it) ends the stream with the error event."""
    waiting = asyncio.ensure_future(wait_for_load(slot, loading))
    try:
        while not waiting.done():
            if time.monotonic() >= deadline:
                raise RequestTimeoutError("the request ran past its timeout while its model loaded")
            await asyncio.wait({waiting}, timeout=min(vlm.settings.keepalive_interval, deadline - time.monotonic()))
            if not waiting.done():
                yield KEEPALIVE
        waiting.result()
        copy = await _acquire(vlm, slot, deadline)
        stream, completion, done = await _start(vlm, slot, copy, body)
    except VlmbridgeError as exc:
        yield sse(error_body(exc))
        yield DONE
        return
    finally:
        waiting.cancel()  # no-op when done; the load itself is shielded from it
    ends.append(done)
    async for event in _events(vlm, slot.name, stream, completion, arrived, deadline):
        yield event


class _EventStream(StreamingResponse):
    """An SSE response that runs `done` when it ends, even if the client left before the first event."""

    def __init__(self, events: AsyncIterator[str], done: Callable[[], None]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._done()


def check_text_length(messages: list[Message], context_length: int, max_token_chars: int) -> None:
    """Refuse text that cannot fit the context whatever it tokenizes to, before tokenizing any of it."""
    if not max_token_chars:
        return
    limit = context_length * max_token_chars
    total = 0
    for message in messages:
        total += len(message.reasoning_content or "")
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text or "") for part in message.content)
    if total > limit:
        raise ContextLengthError(
            f"the messages hold {total} characters of text; no tokenization of that fits the "
            f"{context_length}-token context (at most {max_token_chars} characters per token)",
            param="messages",
            code="context_length_exceeded",
        )


async def _next(stream: ChunkStream, wait: float, deadline: float) -> GenerationChunk | None:
    """The next chunk within `wait` seconds (TimeoutError if none); the request's deadline is enforced here too,
    so a request times out even if the engine that should have enforced it is stuck."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        stream.close()
        raise RequestTimeoutError("the request ran past its timeout")
    return await stream.next(timeout=min(wait, remaining))


def _record(vlm: AppState, model: str, chunk: GenerationChunk, arrived: float, first: bool) -> None:
    metrics = vlm.metrics
    if first:
        metrics.ttft.labels(model).observe(time.monotonic() - arrived)
    if chunk.finish_reason is not None and chunk.usage is not None:
        metrics.prompt_tokens.labels(model).inc(chunk.usage.prompt_tokens)
        metrics.image_tokens.labels(model).inc(chunk.usage.image_tokens)
        metrics.video_tokens.labels(model).inc(chunk.usage.video_tokens)
        metrics.completion_tokens.labels(model).inc(chunk.usage.completion_tokens)


async def _collect(
    vlm: AppState,
    model: str,
    request: Request,
    stream: ChunkStream,
    completion: Completion,
    arrived: float,
    deadline: float,
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
            chunk = await _next(stream, _DISCONNECT_POLL, deadline)
        except TimeoutError:
            continue
        if chunk is None:
            return
        if chunk.error is not None:
            raise chunk.error
        _record(vlm, model, chunk, arrived, first)
        first = False
        completion.add(chunk)


async def _events(
    vlm: AppState, model: str, stream: ChunkStream, completion: Completion, arrived: float, deadline: float
) -> AsyncIterator[str]:
    keepalive = vlm.settings.keepalive_interval
    first = True
    try:
        yield completion.role_event()
        while True:
            try:
                chunk = await _next(stream, keepalive, deadline)
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
            _record(vlm, model, chunk, arrived, first)
            first = False
            for event in completion.delta_events(chunk):
                yield event
        yield DONE
    except RequestTimeoutError as exc:
        yield sse(error_body(exc))
        yield DONE
    except Exception as exc:  # a bug mid-stream: the client still gets the envelope, the log one bounded entry
        log.error("%s: internal error mid-stream: %s", completion.id, bounded_traceback(exc))
        yield sse(error_body(exc))
        yield DONE
