"""The context-window checks every backend makes once it knows a prompt's length: one wording, one rule."""

from __future__ import annotations

from vlmbridge.engine.types import GenerationRequest
from vlmbridge.errors import ContextLengthError

__all__ = ["check_prompt_fits", "new_token_budget"]


def check_prompt_fits(prompt_tokens: int, image_tokens: int, video_tokens: int | None, context_length: int) -> None:
    """A 400 when the prompt alone fills the context. `video_tokens`: None when the request has no clip."""
    if prompt_tokens < context_length:
        return
    shown = f"{image_tokens} of them image tokens" + (
        f", {video_tokens} video tokens" if video_tokens is not None else ""
    )
    raise ContextLengthError(
        f"the prompt is {prompt_tokens} tokens ({shown}), but the context is {context_length}; send "
        "fewer or smaller images (lower max_pixels or detail: low), shorter clips (lower fps or max_frames) "
        "or less text",
        param="messages",
        code="context_length_exceeded",
    )


def new_token_budget(request: GenerationRequest, prompt_tokens: int, context_length: int, default: int) -> int:
    """The tokens the answer may have: what the request asks (or `default`), capped at the room the prompt leaves;
    a 400 when the caller asked for more than fits (a silent cap would hide it)."""
    room = context_length - prompt_tokens
    wanted = request.sampling.max_new_tokens or default
    if wanted <= room:
        return wanted
    if request.max_tokens_explicit:
        raise ContextLengthError(
            f"max_tokens={wanted} plus the {prompt_tokens}-token prompt exceeds the "
            f"{context_length}-token context; ask for at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return room
