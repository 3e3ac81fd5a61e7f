"""Strict JSON request bodies: no NaN/Infinity (not JSON, and they poison sampling), bounded nesting depth.

FastAPI parses bodies with `request.json()`; routes built with `StrictJSONRoute` get a request whose `json()` is
this parser. Its errors are `json.JSONDecodeError`s, which FastAPI turns into a validation error (our 400).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

__all__ = ["MAX_JSON_DEPTH", "StrictJSONRoute", "parse_json"]

# Chat requests nest about six levels; JSON schemas for tools and structured output rarely pass twenty.
MAX_JSON_DEPTH = 64


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes | str) -> Any:
    """json.loads without NaN/Infinity and with nesting at most MAX_JSON_DEPTH (raises json.JSONDecodeError)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise json.JSONDecodeError("the body is not UTF-8", "", 0) from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        raise json.JSONDecodeError(str(exc), text[:64], 0) from None
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", text[:64], 0) from None
    _check_depth(value, text)
    return value


def _check_depth(value: Any, text: str) -> None:
    # Iterative: a recursive walk is what a deeply nested body would use to crash us.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", text[:64], 0)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


class _StrictRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictRequest(request.scope, request.receive))

        return strict
