"""GET /v1/models, /health and /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from vlmbridge.server.auth import require_api_key
from vlmbridge.server.errors import envelope
from vlmbridge.server.metrics import CONTENT_TYPE_LATEST
from vlmbridge.server.state import AppState

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
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
            "dtype": info.dtype,
            "device": info.device,
            "max_images": vlm.settings.max_images,
            "max_pixels": vlm.settings.max_pixels,
            "state": vlm.slot.state,
        }
    return JSONResponse({"object": "list", "data": [entry]})


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    vlm: AppState = request.app.state.vlm
    if vlm.slot.state == "ready":
        return JSONResponse(
            {"status": "ok", "model": vlm.slot.name, "uptime_s": round(time.time() - request.app.state.started_at, 1)}
        )
    body = envelope(
        f"model {vlm.slot.name!r} is not ready: {vlm.slot.reason}", "service_unavailable", code="model_not_ready"
    )
    body["status"] = vlm.slot.state
    return JSONResponse(body, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    vlm: AppState = request.app.state.vlm
    return Response(vlm.metrics.render(), media_type=CONTENT_TYPE_LATEST)
