"""The admin API (only with --admin-key, and only with that key — a client API key does not open it):

    GET  /admin/models                        every configured model: state, memory, in flight, load progress
    POST /admin/models/{name}/load            load it now (a failed model is tried again)
    POST /admin/models/{name}/unload          stop new requests to it, let those running finish, stop it
    POST /admin/models/{name}/reload          hot swap; optional body {"path": "..."} for weights elsewhere

Actions answer when they are done, or with the failure in the error envelope.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vlmbridge.errors import (
    AuthenticationError,
    EngineNotReadyError,
    InvalidRequestError,
    ModelNotFoundError,
    VlmbridgeError,
)
from vlmbridge.pool import EngineSlot, ModelPool
from vlmbridge.server.state import AppState

__all__ = ["model_row", "router"]

router = APIRouter(include_in_schema=False)  # an operator's API on its own key, documented in docs/models.md
_MAX_BODY = 4096


def _check_admin(request: Request) -> AppState:
    vlm: AppState = request.app.state.vlm
    key = vlm.settings.admin_key
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if key is None or scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("the admin routes need the admin key: send 'Authorization: Bearer <admin key>'")
    if not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise AuthenticationError("invalid admin key (a client API key does not open the admin routes)")
    return vlm


def model_row(pool: ModelPool, slot: EngineSlot) -> dict[str, Any]:
    state = slot.state
    copy = slot.current
    return {
        "name": slot.name,
        "aliases": list(slot.names[1:]),
        "path": str(copy.path if copy is not None and copy.path is not None else slot.path or ""),
        "state": state,
        "reason": slot.last_failure if slot.last_failure is not None else slot.reason,
        "code": slot.code,
        "memory_bytes": slot.memory_bytes(),
        "last_used": round(slot.last_used, 3) if slot.last_used is not None else None,
        "in_flight": slot.in_flight,
        "progress": slot.progress if slot.loading is not None else None,
        "pinned": slot.pinned,
        "keep_alive": slot.spec.keep_alive if slot.spec is not None else None,
    }


@router.get("/admin/models")
async def list_models(request: Request) -> JSONResponse:
    vlm = _check_admin(request)
    pool = vlm.pool
    rows = await asyncio.to_thread(lambda: [model_row(pool, slot) for slot in pool.slots.values()])
    return JSONResponse({"object": "list", "data": rows, "memory_budget": pool.budget})


async def _path_of(request: Request) -> Path | None:
    raw = await request.body()
    if not raw.strip():
        return None
    if len(raw) > _MAX_BODY:
        raise InvalidRequestError('the body is too large; send {"path": "..."}', param="path")
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequestError('the body is not JSON; send {"path": "..."} or nothing') from None
    if not isinstance(body, dict) or set(body) - {"path"}:
        raise InvalidRequestError("the body takes one field, path", param="path")
    path = body.get("path")
    if path is None:
        return None
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidRequestError("path must be a model folder's path", param="path")
    return Path(path)


async def _act(slot: EngineSlot, action: Callable[[], None]) -> None:
    """Run a blocking pool action; a model that fails to load answers 503 with the cause's code."""
    try:
        await asyncio.to_thread(action)
    except (EngineNotReadyError, ModelNotFoundError, InvalidRequestError):
        raise
    except VlmbridgeError as exc:
        code = getattr(exc, "code", None) or slot.code or "load_failed"
        raise EngineNotReadyError(
            f"model {slot.name!r} failed to load: {exc.message}", fix=exc.fix, code=code
        ) from None


@router.post("/admin/models/{name}/load")
async def load(name: str, request: Request) -> JSONResponse:
    vlm = _check_admin(request)
    slot = vlm.pool.resolve(name)
    await _act(slot, lambda: vlm.pool.load(slot.name))
    return JSONResponse(model_row(vlm.pool, slot))


@router.post("/admin/models/{name}/unload")
async def unload(name: str, request: Request) -> JSONResponse:
    vlm = _check_admin(request)
    slot = vlm.pool.resolve(name)
    await _act(slot, lambda: vlm.pool.unload(slot.name, vlm.settings.shutdown_grace))
    return JSONResponse(model_row(vlm.pool, slot))


@router.post("/admin/models/{name}/reload")
async def reload(name: str, request: Request) -> JSONResponse:
    vlm = _check_admin(request)
    slot = vlm.pool.resolve(name)
    path = await _path_of(request)
    await _act(slot, lambda: vlm.pool.reload(slot.name, path))
    return JSONResponse(model_row(vlm.pool, slot))
