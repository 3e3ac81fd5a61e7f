"""Typed errors raised by vlmbridge.

Every failure a user can cause or meet has a class here, with a one-line message and, where there is one, the
exact fix. Edges (the CLI, the HTTP server) map these classes once; nothing below them knows about exit codes
or status codes.

    VlmbridgeError
    ├── ModelFolderError        path missing, not a folder, empty, config.json missing/invalid
    ├── UnsupportedModelError   model_type unknown to the installed transformers, or not a generative model
    ├── RemoteCodeRefusedError  config has auto_map and the folder is not allowlisted with matching pins
    ├── UnsafeWeightsError      only pickle (.bin) weights and they were not explicitly allowed
    ├── DeviceError             device or dtype not available here
    ├── QuantizationError       quantization package missing, device without its kernels, refused dequantization
    ├── ModelLoadError          transformers failed while loading; carries the classified cause
    ├── ModelsFileError         the models file (or a NAME=PATH argument) has an unknown key or a bad value
    ├── InvalidRequestError     bad input from a caller (carries `param`)
    │   ├── ImageInputError     undecodable image, refused URL, over a size/pixel/count limit
    │   ├── VideoInputError     undecodable video, codec/container not allowed, over a duration/frame/size limit
    │   └── ContextLengthError  prompt (image tokens included) longer than the context
    ├── NotSupportedError       a feature that is planned but not implemented (carries `param`)
    ├── ModelNotFoundError      a request named a model this server does not serve
    ├── AuthenticationError     missing or wrong API key
    ├── PayloadTooLargeError    the request body is over the limit
    ├── QueueFullError          the server is at capacity (queue full, too many pixels in flight); retry later
    ├── RequestTimeoutError     a request ran past its deadline
    ├── EngineNotReadyError     the engine is loading, failed to load or is shutting down
    │   ├── ShuttingDownError   the server is draining before it stops
    │   ├── MemoryBudgetError   a model does not fit the memory budget and no idle model can be unloaded
    │   └── WorkerDiedError     the model's worker process died (or was stuck) while the request waited or ran
    └── EngineFailedError       the engine failed while working on the request (not the caller's fault)
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ContextLengthError",
    "DeviceError",
    "EngineFailedError",
    "EngineNotReadyError",
    "ImageInputError",
    "InvalidRequestError",
    "MemoryBudgetError",
    "ModelFolderError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelsFileError",
    "NotSupportedError",
    "PayloadTooLargeError",
    "QuantizationError",
    "QueueFullError",
    "RemoteCodeRefusedError",
    "RequestTimeoutError",
    "ShuttingDownError",
    "UnsafeWeightsError",
    "UnsupportedModelError",
    "VideoInputError",
    "VlmbridgeError",
    "WorkerDiedError",
]


class VlmbridgeError(Exception):
    """Base class: `message` is one line for humans, `fix` the exact remedy when we know one."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message


class ModelFolderError(VlmbridgeError):
    """The model path is missing, not a folder, empty, or lacks a readable config.json."""


class UnsupportedModelError(VlmbridgeError):
    """The installed transformers cannot build this architecture (or it is not a text generator)."""


class RemoteCodeRefusedError(VlmbridgeError):
    """The folder needs remote code (`auto_map`) that is not allowlisted and pinned."""


class UnsafeWeightsError(VlmbridgeError):
    """Only pickle `.bin` weights are present and loading them was not explicitly allowed."""


class DeviceError(VlmbridgeError):
    """The requested device or dtype does not exist or is not usable here."""


class QuantizationError(VlmbridgeError):
    """A quantized load cannot happen as asked: a package is missing, the device has no kernels for the format
    (and dequantizing it, ~2× the memory, was not allowed), or the checkpoint cannot be (re-)quantized."""


class ModelLoadError(VlmbridgeError):
    """transformers raised while loading; `cause` is the classified reason (see `vlmbridge explain`)."""

    def __init__(self, message: str, *, fix: str | None = None, cause: str = "unknown") -> None:
        super().__init__(message, fix=fix)
        self.cause = cause


class ModelsFileError(VlmbridgeError):
    """The models file or a NAME=PATH argument is wrong; the message names the entry and the key."""


class InvalidRequestError(VlmbridgeError):
    """The caller sent something we cannot use; `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ImageInputError(InvalidRequestError):
    """An image could not be fetched, decoded or fitted within the limits."""


class VideoInputError(InvalidRequestError):
    """A video (file or frame list) could not be fetched, decoded or fitted within the limits."""


class ContextLengthError(InvalidRequestError):
    """The prompt, image tokens included, does not fit the context window."""


class NotSupportedError(VlmbridgeError):
    """A planned feature that this version does not implement yet."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(VlmbridgeError):
    """The request names a model this server does not serve."""


class AuthenticationError(VlmbridgeError):
    """The request lacks a valid API key."""


class PayloadTooLargeError(VlmbridgeError):
    """The request body is larger than the server accepts."""


class QueueFullError(VlmbridgeError):
    """The server is at capacity; the caller should retry after `retry_after` seconds (the Retry-After header)."""

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


class RequestTimeoutError(VlmbridgeError):
    """The request did not finish within its deadline."""


class EngineNotReadyError(VlmbridgeError):
    """The engine is not (or no longer) able to take requests."""

    def __init__(self, message: str, *, fix: str | None = None, code: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.code = code


class ShuttingDownError(EngineNotReadyError):
    """The server received SIGTERM/SIGINT and is draining: no new requests."""


class MemoryBudgetError(EngineNotReadyError):
    """Loading a model would pass --memory-budget and every loaded model is busy, pinned or loading."""


class WorkerDiedError(EngineNotReadyError):
    """The model's worker process ended (out of memory, a native crash, kill -9) or stopped answering; it restarts
    with backoff. Only the requests it held fail."""


class EngineFailedError(VlmbridgeError):
    """A step (prefill, decode, sampling) failed for this request; the engine goes on serving the others.

    `code` classifies the failure (e.g. `sampling_failed`, `decode_failed`); the message is short and bounded."""

    def __init__(self, message: str, *, code: str = "engine_error") -> None:
        super().__init__(message)
        self.code = code
