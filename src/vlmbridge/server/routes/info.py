"""GET /v1/models, /health and /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vlmbridge.engine.base import EngineInfo
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
    vlm: AppState = request.app.state.vlm
    entry: dict[str, object] = {
        "id": vlm.slot.name,
        "object": "model",
        "created": int(request.app.state.started_at),
        "owned_by": "vlmbridge",
    }
    engine = vlm.slot.peek()
    if engine is not None:
        info = engine.info
        entry["max_model_len"] = info.context_length
        entry["vlmbridge"] = {
            "kind": info.kind,
            "vision": info.kind == "vlm",
            "model_type": info.model_type,
            "model_class": info.model_class,
            **_loaded(info),
            "max_images": vlm.settings.max_images,
            "max_pixels": vlm.settings.max_pixels,
            "state": vlm.slot.state,
        }
    return JSONResponse({"object": "list", "data": [entry]})


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    vlm: AppState = request.app.state.vlm
    engine = vlm.slot.peek()
    loaded: dict[str, object] = {}
    if engine is not None:
        loaded = {**(_loaded(engine.info) if engine.state == "ready" else {}), "worker_pid": engine.stats().worker_pid}
    if vlm.lifecycle.draining:
        body = envelope("the server is shutting down", "service_unavailable", code="shutting_down")
        body.update(status="draining", model=vlm.slot.name, in_flight=vlm.lifecycle.in_flight)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    if vlm.slot.state == "ready":
        uptime = round(time.time() - request.app.state.started_at, 1)
        return JSONResponse({"status": "ok", "model": vlm.slot.name, "uptime_s": uptime, **loaded})
    body = envelope(
        f"model {vlm.slot.name!r} is not ready: {vlm.slot.reason}", "service_unavailable", code="model_not_ready"
    )
    body.update(status=vlm.slot.state, **loaded)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    vlm: AppState = request.app.state.vlm
    return Response(vlm.metrics.render(), media_type=CONTENT_TYPE_LATEST)
