"""GET /v1/models, /health and /metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vlmbridge.engine.base import EngineInfo
from vlmbridge.pool import EngineSlot
from vlmbridge.server.errors import envelope
from vlmbridge.server.metrics import CONTENT_TYPE_LATEST
from vlmbridge.server.state import AppState

__all__ = ["router"]

router = APIRouter()


def _loaded(info: EngineInfo) -> dict[str, object]:
    """How the model was loaded — what a Dify admin checks when answers are slow or odd."""
    return {
        "dtype": info.dtype,
        "quantization": info.quantization,
        "quantization_reason": info.quantization_reason,
        "device": info.device,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """Every configured model, loaded or not; what is known from the config is there even when it is not."""
    vlm: AppState = request.app.state.vlm
    created = int(request.app.state.started_at)
    data = await asyncio.to_thread(lambda: [_model_entry(vlm, slot, created) for slot in vlm.pool.slots.values()])
    return JSONResponse({"object": "list", "data": data})


def _model_entry(vlm: AppState, slot: EngineSlot, created: int) -> dict[str, object]:
    entry: dict[str, object] = {"id": slot.name, "object": "model", "created": created, "owned_by": "vlmbridge"}
    settings = slot.spec.settings if slot.spec is not None else vlm.settings
    engine = slot.peek()
    ours: dict[str, object]
    if engine is not None and engine.state == "ready":
        info = engine.info
        entry["max_model_len"] = info.context_length
        ours = {
            "kind": info.kind,
            "vision": info.kind == "vlm",
            "model_type": info.model_type,
            "model_class": info.model_class,
            **_loaded(info),
        }
    else:
        facts = vlm.pool.facts(slot)
        if facts.max_model_len is not None:
            entry["max_model_len"] = facts.max_model_len
        ours = {
            "kind": None if facts.vision is None else ("vlm" if facts.vision else "text"),
            "vision": facts.vision,
            "quantization": facts.quantization,
        }
    vision = ours["vision"]
    ours.update(
        modalities=None if vision is None else (["text", "image"] if vision else ["text"]),
        max_images=settings.max_images,
        max_pixels=settings.max_pixels,
        state=slot.state,
        aliases=list(slot.names[1:]),
    )
    entry["vlmbridge"] = ours
    return entry


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 once every `load: startup` model is ready (on-demand ones need not be loaded); each model's state in
    `models`. With one model, its load details too."""
    vlm: AppState = request.app.state.vlm
    pool = vlm.pool
    states = {name: slot.state for name, slot in pool.slots.items()}
    single = pool.default if len(pool.slots) == 1 else None
    loaded: dict[str, object] = {}
    engine = single.peek() if single is not None else None
    if engine is not None:
        loaded = {**(_loaded(engine.info) if engine.state == "ready" else {}), "worker_pid": engine.stats().worker_pid}
    name = single.name if single is not None else None
    if vlm.lifecycle.draining:
        body = envelope("the server is shutting down", "service_unavailable", code="shutting_down")
        body.update(status="draining", model=name, in_flight=vlm.lifecycle.in_flight, models=states)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    if pool.startup_ready:
        uptime = round(time.time() - request.app.state.started_at, 1)
        return JSONResponse({"status": "ok", "model": name, "uptime_s": uptime, **loaded, "models": states})
    waiting = next(s for s in pool.slots.values() if not s.on_demand and s.state != "ready")
    body = envelope(
        f"model {waiting.name!r} is not ready: {waiting.reason}", "service_unavailable", code="model_not_ready"
    )
    body.update(status=waiting.state, **loaded, models=states)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    vlm: AppState = request.app.state.vlm
    return Response(vlm.metrics.render(), media_type=CONTENT_TYPE_LATEST)
