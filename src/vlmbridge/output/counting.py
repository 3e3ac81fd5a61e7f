"""Counting a prompt's tokens in the front, without the backend and without the image processor.

The tokenizer renders the model's own chat template with one placeholder per image; each placeholder then
stands for as many tokens as the one image-token rule (`geometry.tokens_for_image`) gives for that image's size
(read from its header, never decoded) and pixel budget. `/v1/tokenize` answers from here, so counting a prompt
costs no decoding, no processor run and no engine time — for any backend. Clips are not counted here: how many
frames a clip gives (and Qwen3-VL's timestamp text) is known only once it is decoded, so /v1/tokenize asks the
backend for prompts with video.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmbridge.engine.base import PromptStats
from vlmbridge.engine.types import ChatMessage, ImagePart, TextPart
from vlmbridge.errors import InvalidRequestError
from vlmbridge.geometry import VisionGeometry, geometry_from_config, tokens_for_image

__all__ = ["PromptCounter"]

_IMAGE_TOKEN = "<|image_pad|>"


@dataclass
class PromptCounter:
    tokenizer: Any
    template: str | None  # the folder's chat template, when the tokenizer does not carry it
    vision: VisionGeometry | None  # None: a text model

    @classmethod
    def for_folder(cls, path: Path, tokenizer: Any) -> PromptCounter:
        from vlmbridge.folder import ModelFolder
        from vlmbridge.plan import processor_settings

        folder = ModelFolder.open(path)
        try:
            vision = geometry_from_config(folder.config, processor_settings(folder)).vision
        except ValueError:
            vision = None
        # A VLM's prompt is the processor's template (the one the backend renders), a text model's the tokenizer's.
        return cls(tokenizer, _folder_template(path) if vision is not None else None, vision)

    def count(self, messages: tuple[ChatMessage, ...], template_kwargs: Mapping[str, Any] | None = None) -> PromptStats:
        conv: list[dict[str, Any]] = []
        images: list[ImagePart] = []
        for msg in messages:
            content: Any = msg.content
            if not isinstance(content, str):
                content = [
                    {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in content
                ]
                images.extend(p for p in msg.content if isinstance(p, ImagePart))
            entry: dict[str, Any] = {"role": msg.role, "content": content}
            if msg.reasoning_content:
                entry["reasoning_content"] = msg.reasoning_content
            conv.append(entry)
        if images and self.vision is None:
            raise InvalidRequestError(
                "this model is text-only and cannot take image input",
                param="messages",
                code="image_input_not_supported",
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                conv, chat_template=self.template, tokenize=True, add_generation_prompt=True, return_dict=True,
                sanitize_control_tokens=True, **dict(template_kwargs or {}),
            )["input_ids"]  # fmt: skip
        except Exception as exc:  # a template's raise_exception, a bad role order: the caller's input
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
        image_tokens = sum(self._image_tokens(part) for part in images)
        # Each image rendered as one placeholder token; it stands for image_tokens of them.
        return PromptStats(prompt_tokens=len(ids) - len(images) + image_tokens, image_tokens=image_tokens)

    def _image_tokens(self, part: ImagePart) -> int:
        assert self.vision is not None
        width, height = part.image.size
        v = self.vision
        try:
            return tokens_for_image(
                width, height, patch_size=v.patch_size, merge_size=v.merge_size,
                min_pixels=part.budget.min_pixels or v.min_pixels, max_pixels=part.budget.max_pixels,
            )  # fmt: skip
        except ValueError as exc:  # an aspect ratio the processor refuses too
            raise InvalidRequestError(str(exc), param="messages", code="invalid_image") from None


def _folder_template(path: Path) -> str | None:
    """The official repos keep the template in chat_template.json (for the processor); newer saves in .jinja."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    data = path / "chat_template.json"
    if data.is_file():
        template = json.loads(data.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
