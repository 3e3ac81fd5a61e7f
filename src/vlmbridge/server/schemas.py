"""The OpenAI chat-completions request, validated strictly: unknown fields are a 400 that names them.

A few fields Dify or the openai client send routinely are accepted and ignored (see IGNORED_FIELDS); features we
plan but do not have yet (legacy `functions`) are refused by name with "not supported yet".
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlmbridge.errors import NotSupportedError

__all__ = ["ChatCompletionRequest", "ContentPart", "ImageURL", "Message", "MessageToolCall", "Tool", "VideoURL"]

# Sent by clients as a matter of course; they do not change what we generate.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})
_NOT_YET = {
    "functions": "the legacy `functions` field is not supported; send `tools`",
    "function_call": "the legacy `function_call` field is not supported; send `tool_choice`",
    "logit_bias": "logit_bias is not supported yet",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
}
MAX_STOP = 16
MAX_STOP_LEN = 512
MAX_TOOLS = 128
MAX_TOOLS_BYTES = 64 << 10


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] = "auto"


class VideoURL(_Strict):
    """A clip (vLLM's `video_url` part); the sampling fields are extensions, capped by the server's settings."""

    url: str = Field(min_length=1)
    fps: float | None = Field(None, gt=0, le=30, description="frames sampled per second of video")
    max_frames: int | None = Field(None, ge=1, le=4096, description="most frames sampled from the clip")
    max_pixels: int | None = Field(None, ge=1, description="pixel budget per frame (H×W after resizing)")


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None
    video: list[str] | None = Field(None, min_length=1, max_length=4096, description="a video as a frame list")

    @model_validator(mode="before")
    @classmethod
    def _known_types(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        kind = value.get("type")
        if kind == "input_video":
            raise NotSupportedError("send video as a 'video_url' part", param="content.type")
        if kind in ("input_audio", "audio_url", "file"):
            raise NotSupportedError(f"content parts of type {kind!r} are not supported", param="content.type")
        if kind == "image_url" and isinstance(value.get("image_url"), str):
            value = {**value, "image_url": {"url": value["image_url"]}}  # vLLM-style shorthand
        if kind == "video_url" and isinstance(value.get("video_url"), str):
            value = {**value, "video_url": {"url": value["video_url"]}}
        return value

    @model_validator(mode="after")
    def _fields_match_type(self) -> ContentPart:
        given = {name for name in ("text", "image_url", "video_url", "video") if getattr(self, name) is not None}
        if self.type not in ("text", "image_url", "video_url", "video"):
            raise ValueError(f"unknown content part type {self.type!r} (use 'text', 'image_url' or 'video_url')")
        if given != {self.type}:
            article = "an" if self.type[0] in "aeiou" else "a"
            raise ValueError(f"{article} {self.type} part needs '{self.type}' and nothing else")
        return self


class FunctionCall(_Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=1 << 20)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value or "{}")
        except ValueError:
            raise ValueError("function.arguments must be a JSON object as a string") from None
        if not isinstance(parsed, dict):
            raise ValueError("function.arguments must be a JSON object as a string")
        return value or "{}"


class MessageToolCall(_Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    reasoning_content: str | None = None
    tool_call_id: str | None = Field(None, max_length=256)
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=MAX_TOOLS)

    @model_validator(mode="after")
    def _supported(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry tool_call_id")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role != "user" and isinstance(self.content, list) and any(p.type != "text" for p in self.content):
            raise ValueError(f"images and videos are only allowed in user messages, not in {self.role} messages")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Strict):
    model: str = Field(min_length=1, max_length=512)
    messages: list[Message] = Field(min_length=1, max_length=4096)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Sampling bounds (README "Sampling"): within them sampling cannot over- or underflow into an error.
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="below 1e-5 = greedy (as in vLLM)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1 = off, else >= 1")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # Dify's OpenAI-compatible provider in "extended" mode sends these next to chat_template_kwargs.
    enable_thinking: bool | None = None
    thinking: bool | dict[str, Any] | None = None
    ignore_eos: bool = Field(False, description="extension (as in vLLM): generate until max_tokens")
    max_pixels: int | None = Field(None, ge=1, description="extension: per-request pixel budget per image")
    min_pixels: int | None = Field(None, ge=1, description="extension: per-request minimum pixels per image")

    @model_validator(mode="before")
    @classmethod
    def _screen_fields(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name, reason in _NOT_YET.items():
            present = value.get(name)
            if present not in (None, [], {}, "none", "auto"):
                raise NotSupportedError(reason, param=name)
        return {k: v for k, v in value.items() if k not in IGNORED_FIELDS and k not in _NOT_YET}

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("top_k must be -1 (off) or at least 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_LEN} characters")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs_bounds(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and (len(value) > 32 or len(repr(value)) > 16384):
            raise ValueError("chat_template_kwargs is too large")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.tools is not None:
            if len(json.dumps([t.model_dump(exclude_none=True) for t in self.tools])) > MAX_TOOLS_BYTES:
                raise ValueError(f"the tools take more than {MAX_TOOLS_BYTES} bytes as JSON")
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tool function names must be unique")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice requires tools")
        if self.forced_tool is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format cannot be combined with tool_choice required or a named function")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """chat_template_kwargs, with the top-level thinking switches folded in (explicit kwargs win)."""
        kwargs = dict(self.chat_template_kwargs or {})
        switch = self.enable_thinking
        if switch is None and isinstance(self.thinking, bool):
            switch = self.thinking
        elif (
            switch is None and isinstance(self.thinking, dict) and self.thinking.get("type") in ("enabled", "disabled")
        ):
            switch = self.thinking["type"] == "enabled"
        if switch is not None:
            kwargs.setdefault("enable_thinking", switch)
        return kwargs

    @property
    def forced_tool(self) -> str | None:
        """`required`, a function name, or None (auto/none: the model decides, nothing is enforced)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "required" if self.tool_choice == "required" else None

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
