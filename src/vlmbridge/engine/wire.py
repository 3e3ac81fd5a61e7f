"""What crosses the boundary between the front and an engine's worker process: messages and errors.

Messages are plain tuples (pickled by multiprocessing), first element the kind:

    front → worker   ("generate", request) ("abort", request_id) ("count", call_id, messages) ("shutdown",)
    worker → front   ("ready", info) ("failed", error) ("accepted", request_id) ("rejected", request_id, error)
                     ("out", request_id, output, last) ("outs", [(request_id, output, last), ...])
                     ("counted", call_id, stats | error)
                     ("beat", state, reason, stats)

Exceptions do not pickle reliably (keyword-only arguments, classes that carry tensors), so errors travel as
dicts and become our typed errors again on the other side; anything else becomes an EngineFailedError.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vlmbridge import errors
from vlmbridge.engine.types import EngineOutput

__all__ = ["decode_error", "encode_error", "encode_output"]

_KEYWORDS = ("param", "code", "retry_after", "fix", "cause")


def encode_error(exc: BaseException) -> dict[str, Any]:
    name = type(exc).__name__
    if not isinstance(exc, errors.VlmbridgeError) or getattr(errors, name, None) is not type(exc):
        return {"type": "EngineFailedError", "message": f"the engine failed ({name})", "code": "engine_error"}
    data: dict[str, Any] = {"type": name, "message": exc.message}
    data.update({k: getattr(exc, k) for k in _KEYWORDS if getattr(exc, k, None) is not None})
    return data


def decode_error(data: dict[str, Any]) -> Exception:
    cls = getattr(errors, str(data.get("type")), None)
    message = str(data.get("message", "the engine failed"))
    if not (isinstance(cls, type) and issubclass(cls, errors.VlmbridgeError)):
        return errors.EngineFailedError(message, code="engine_error")
    exc = cls.__new__(cls)
    errors.VlmbridgeError.__init__(exc, message, fix=data.get("fix"))
    for key in _KEYWORDS:
        if key in data and key != "fix":
            setattr(exc, key, data[key])
    for key in ("param", "code"):  # classes that read them unconditionally
        if not hasattr(exc, key):
            setattr(exc, key, None)
    return exc


def encode_output(out: EngineOutput) -> EngineOutput | tuple[str, dict[str, Any], EngineOutput]:
    """An output with its error made safe to pickle (the error rides beside it)."""
    if out.error is None:
        return out
    return ("error", encode_error(out.error), replace(out, error=None))


def decode_output(item: EngineOutput | tuple[str, dict[str, Any], EngineOutput]) -> EngineOutput:
    if isinstance(item, EngineOutput):
        return item
    _, error, out = item
    return replace(out, error=decode_error(error))
