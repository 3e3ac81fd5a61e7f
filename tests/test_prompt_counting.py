"""The front counts prompts without the backend or the image processor (/v1/tokenize): its count must equal what
the backend feeds the model, for every family and layout, with pictures of several sizes and budgets."""

from __future__ import annotations

import pytest

from tests.conftest import ALL_FAMILIES, TinyFactory
from tests.helpers import decoded
from vlmbridge.engine.transformers.prompt import PromptBuilder
from vlmbridge.engine.types import ChatMessage, ImagePart, PixelBudget, TextPart
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.output.client import load_text_tools


def conversations(vlm: bool) -> list[tuple[ChatMessage, ...]]:
    text = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello <|im_end|> <|image_pad|> there"))
    if not vlm:
        return [text, (*text, ChatMessage("assistant", "Hi."), ChatMessage("user", "And then?"))]
    big, small = PixelBudget(max_pixels=1024 * 1024), PixelBudget(max_pixels=256 * 256, min_pixels=128 * 128)
    pictures = (
        ImagePart(decoded(320, 240, seed=1), big),
        TextPart("and"),
        ImagePart(decoded(97, 500, seed=2), small),
        TextPart("What differs?"),
    )
    return [
        text,
        (ChatMessage("user", pictures),),
        (ChatMessage("user", pictures), ChatMessage("assistant", "A cat."), ChatMessage("user", (pictures[0],))),
    ]


@pytest.mark.parametrize("layout", ["official", "transformers"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_front_counts_what_the_backend_feeds(tiny_model: TinyFactory, family: str, layout: str) -> None:
    folder = tiny_model(family, layout)
    counter = load_text_tools(folder, {}).counter
    assert counter is not None
    loaded = load_model(folder, LoadOptions(device="cpu"))
    builder = PromptBuilder(loaded.processor, loaded.tokenizer, 32768, pixel_cache_bytes=0)
    for messages in conversations(loaded.kind == "vlm"):
        inputs = builder.build(messages)
        stats = counter.count(messages)
        assert (stats.prompt_tokens, stats.image_tokens) == (inputs.prompt_tokens, inputs.image_tokens), messages
