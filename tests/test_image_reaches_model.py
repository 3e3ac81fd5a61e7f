"""For every VLM family, the image really reaches the model (the field report's worst bug is silent image loss)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import VLM_FAMILIES, TinyFactory
from tests.helpers import decoded, image_question
from vlmbridge.engine.transformers.prompt import PromptBuilder
from vlmbridge.engine.types import PixelBudget
from vlmbridge.loader import LoadOptions, load_model


def _next_token_logits(loaded, builder: PromptBuilder, image) -> tuple[torch.Tensor, dict]:  # type: ignore[no-untyped-def]
    inputs = builder.build(image_question(image))
    with torch.no_grad():
        logits = loaded.model(**inputs.tensors).logits[0, -1].float()
    return logits, inputs.tensors


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_image_changes_the_next_token_logits(tiny_model: TinyFactory, family: str) -> None:
    loaded = load_model(tiny_model(family), LoadOptions(device="cpu", dtype="fp32"))
    builder = PromptBuilder(loaded.processor, loaded.tokenizer, context_length=32768)
    first, second = decoded(320, 240, seed=1), decoded(320, 240, seed=2)
    assert first.size == second.size and first.digest != second.digest

    a, tensors = _next_token_logits(loaded, builder, first)
    b, _ = _next_token_logits(loaded, builder, second)
    a_again, _ = _next_token_logits(loaded, builder, decoded(320, 240, seed=1))
    assert not torch.allclose(a, b), "two different pictures gave the same logits: the image is not used"
    assert torch.equal(a, a_again), "the same picture gave different logits"

    # <|image_pad|> count in the fed input_ids == the processor's grid for this size == our token math.
    grid = tensors["image_grid_thw"][0]
    merge = loaded.processor.image_processor.merge_size
    pads = int((tensors["input_ids"] == loaded.model.config.image_token_id).sum())
    assert pads == int(grid.prod()) // merge**2
    assert pads == builder.image_tokens_for(320, 240, PixelBudget(max_pixels=1024 * 1024))
    assert int(tensors["pixel_values"].shape[0]) == int(grid.prod())


@pytest.mark.parametrize(("family", "width", "height", "budget", "tokens"), [
    ("qwen3_vl", 1920, 1080, 16777216, 2040),   # facts file: 1920×1080 → 2040 tokens (Qwen3-VL defaults)
    ("qwen3_vl", 640, 480, 16777216, 300),
    ("qwen3_vl", 1024, 1024, 16777216, 1024),
    ("qwen2_5_vl", 1920, 1080, 12845056, 2691),  # facts file: Qwen2/2.5-VL 1920×1080 → 2691 tokens
])  # fmt: skip
def test_image_token_math_matches_the_facts(
    tiny_model: TinyFactory, family: str, width: int, height: int, budget: int, tokens: int
) -> None:
    loaded = load_model(tiny_model(family), LoadOptions(device="cpu"))
    builder = PromptBuilder(loaded.processor, loaded.tokenizer, context_length=32768)
    assert builder.image_tokens_for(width, height, PixelBudget(max_pixels=budget)) == tokens
    inputs = builder.build(image_question(decoded(width, height, seed=3), max_pixels=budget))
    assert inputs.image_tokens == tokens
