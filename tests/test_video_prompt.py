"""Clips in the prompt, with the model's own processor: Qwen3-VL gets our frames' timestamps as text, Qwen2.5-VL
its temporal positions from our sampling rate, and the cache keys change with the sampling and budget."""

from __future__ import annotations

import pytest

from tests.conftest import TinyFactory
from tests.video_clips import clip_bytes
from vlmbridge.engine.transformers.prompt import PromptBuilder
from vlmbridge.engine.types import ChatMessage, PixelBudget, TextPart, VideoPart
from vlmbridge.errors import InvalidRequestError
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.media.video import VideoSampling, probe_video


def builder(folder: object) -> PromptBuilder:
    loaded = load_model(folder, LoadOptions(device="cpu"))  # type: ignore[arg-type]
    return PromptBuilder(loaded.processor, loaded.tokenizer, context_length=32768)


def clip_part(fps: float, max_frames: int = 32, seconds: int = 2) -> VideoPart:
    video = probe_video(clip_bytes(seed=1, frames=10 * seconds, fps=10))
    return VideoPart(video, VideoSampling(fps, max_frames, 64 * 64), PixelBudget(64 * 64))


def ask(part: VideoPart) -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", (part, TextPart("What happens?"))),)


def test_qwen3_vl_prompt_carries_the_sampled_timestamps(tiny_model: TinyFactory) -> None:
    b = builder(tiny_model("qwen3_vl"))
    inputs = b.build(ask(clip_part(fps=2)))  # frames at 0, 0.5, 1.0, 1.5 s: pairs average to 0.25 and 1.25
    text = b.tokenizer.decode(inputs.input_ids[0])
    assert f"<{0.25:.1f} seconds>" in text and f"<{1.25:.1f} seconds>" in text and "<2." not in text
    start, end = inputs.video_spans[0]
    assert inputs.video_tokens == 8 and end - start > inputs.video_tokens  # 2 pairs of 2×2; timestamps inside
    slower = b.build(ask(clip_part(fps=1)))  # frames at 0 and 1 s: one pair at 0.5
    assert "<0.5 seconds>" in b.tokenizer.decode(slower.input_ids[0])
    assert inputs.video_keys != slower.video_keys


def test_qwen2_5_vl_temporal_positions_follow_the_sampling_rate(tiny_model: TinyFactory) -> None:
    b = builder(tiny_model("qwen2_5_vl"))
    assert b.build(ask(clip_part(fps=2))).tensors["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per patch
    assert b.build(ask(clip_part(fps=1, seconds=4))).tensors["second_per_grid_ts"].tolist() == [2.0]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_max_frames_bounds_the_tokens(tiny_model: TinyFactory, family: str) -> None:
    b = builder(tiny_model(family))
    short = b.build(ask(clip_part(fps=2, max_frames=4, seconds=2)))
    long = b.build(ask(clip_part(fps=2, max_frames=4, seconds=8)))
    assert short.video_tokens == long.video_tokens > 0


def test_text_only_model_refuses_video(tiny_model: TinyFactory) -> None:
    b = builder(tiny_model("qwen2"))
    with pytest.raises(InvalidRequestError) as err:
        b.build(ask(clip_part(fps=2)))
    assert err.value.code == "video_input_not_supported"
