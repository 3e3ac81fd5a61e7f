"""The requests every system in a benchmark gets: same picture, same prompt, same output length."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

__all__ = ["Workload"]


@dataclass(frozen=True)
class Workload:
    width: int = 320
    height: int = 240
    prompt: str = "Describe this picture."
    new_tokens: int = 32

    def png(self) -> bytes:
        from vlmbridge.tiny.images import demo_picture

        buf = io.BytesIO()
        demo_picture(self.width, self.height).save(buf, format="PNG")
        return buf.getvalue()

    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png()).decode()

    def messages(self) -> list[dict[str, Any]]:
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": self.data_url(), "detail": "high"}},
                    {"type": "text", "text": self.prompt},
                ],
            }
        ]

    def vlmbridge_body(self, model: str) -> dict[str, Any]:
        # ignore_eos: every request generates exactly new_tokens (vLLM's extension, which vlmbridge has too).
        return {
            "model": model, "messages": self.messages(), "max_tokens": self.new_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True,
        }  # fmt: skip

    def transformers_serve_body(self, model: str) -> dict[str, Any]:
        # transformers serve takes a whole generation_config instead: min = max forces the length.
        import json

        gen = {"max_new_tokens": self.new_tokens, "min_new_tokens": self.new_tokens, "do_sample": False}
        return {"model": model, "messages": self.messages(), "stream": True, "generation_config": json.dumps(gen)}
