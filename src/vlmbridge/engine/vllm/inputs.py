"""Our side of a vLLM request, on the caller's thread: the prompt's token ids from the model's chat template (control
tokens typed by users kept as text, one placeholder per image and clip for vLLM to expand), the expanded token count
and the context check, the pictures decoded within their pixel budgets and the clips decoded and sampled by us
(vLLM gets PIL images and frames with their metadata, never URLs or bytes), and the structured-output grammar's text
(the transformers backend's own, `engine/grammar_text.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmbridge.engine.base import PromptStats
from vlmbridge.engine.clips import ClipInput, budget_per_clip, clip_input, clip_tokens, resized_size
from vlmbridge.engine.context import check_prompt_fits, new_token_budget
from vlmbridge.engine.grammar_text import grammar_text, single_token_id
from vlmbridge.engine.transformers.prompt import PromptBuilder
from vlmbridge.engine.types import ChatMessage, GenerationRequest, ImagePart, PixelBudget, StructuredSpec, VideoPart
from vlmbridge.engine.vllm.compat import accepts_bare_video_placeholders, allow_bare_video_placeholders
from vlmbridge.engine.vllm.mapping import PreparedPrompt
from vlmbridge.errors import (
    ImageInputError,
    InvalidRequestError,
    NotSupportedError,
    VideoInputError,
)

__all__ = ["VllmInputs", "budget_kwargs", "generation_config"]


class VllmInputs:
    """Thread-safe: requests are prepared on the callers' threads, several at once."""

    def __init__(self, path: Path, *, vlm: bool, context_length: int, default_max_new_tokens: int) -> None:
        self.prompts = _prompt_builder(path, vlm, context_length)
        self.context_length = context_length
        self.default_max_new_tokens = default_max_new_tokens
        self.image_token_id = self.prompts.image_token_id if vlm else None
        self.video_token_id = self.prompts.video_token_id if vlm else None
        self.video_processor = getattr(self.prompts.processor, "video_processor", None)
        self.video_refusal, self.video_bridged = (
            _video_refusal(self.prompts.processor, self.video_processor) if vlm else (None, False)
        )
        self._video_target = _video_target(self.prompts.processor)
        # The template opens a <think> block for the answer (a Thinking checkpoint): vLLM needs a reasoning parser
        # to keep the grammar off the reasoning.
        self.opens_thinking = self._ends_in_think(self.prompts.placeholder_ids((ChatMessage("user", "Hi"),), None))

    def count(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        ids, extra = self._placeholders(messages, None)
        clips = self._clips([p for m in messages for p in m.videos])
        images = sum(len(m.images) for m in messages)
        video_extra, video_tokens = self._video_counts(clips)
        return PromptStats(
            prompt_tokens=len(ids) + extra + video_extra, image_tokens=extra + images, video_tokens=video_tokens
        )

    def _placeholders(
        self, messages: tuple[ChatMessage, ...], template_kwargs: Any, tools: tuple[Any, ...] = ()
    ) -> tuple[list[int], int]:
        """(prompt ids with one placeholder per image and clip, the tokens the image placeholders expand by)."""
        ids = self.prompts.placeholder_ids(messages, template_kwargs, tools=tools)
        parts = [p for m in messages for p in m.images]
        extra = sum(self.prompts.image_tokens_for(*p.image.size, p.budget) - 1 for p in parts)
        if parts and sum(1 for t in ids if t == self.image_token_id) != len(parts):
            raise InvalidRequestError(  # the template dropped or repeated an image
                f"{len(parts)} images but a different number of image placeholders in the prompt", param="messages"
            )
        clips = sum(len(m.videos) for m in messages)
        if clips and self.video_refusal is not None:  # before any decoding
            raise NotSupportedError(self.video_refusal, param="messages")
        if clips and sum(1 for t in ids if t == self.video_token_id) != clips:
            raise InvalidRequestError(  # vLLM would get frames without their placeholder, or the reverse
                f"{clips} videos but a different number of video placeholders in the prompt", param="messages"
            )
        return ids, extra

    def _clips(self, parts: list[VideoPart]) -> list[ClipInput]:
        """Each clip decoded and sampled here, in the worker (bad clips are a 400 before vLLM sees them)."""
        return [clip_input(part, self.video_processor) for part in parts]

    def _video_counts(self, clips: list[ClipInput]) -> tuple[int, int]:
        """(tokens the clips' placeholders expand by, video placeholder tokens), as vLLM's processor will expand
        them: Qwen2/2.5-VL one run per clip; Qwen3-VL per frame pair `<t seconds>`, vision start, run, end."""
        extra = tokens = 0
        for clip in clips:
            groups, per_group = clip_tokens(clip, self.video_processor)
            tokens += groups * per_group
            if not budget_per_clip(self.video_processor):
                extra += groups * per_group - 1
                continue
            stamps = sum(len(self.prompts.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False))
                         for t in _group_times(clip, self.video_processor))  # fmt: skip
            extra += stamps + groups * (per_group + 2) - self._video_target
        return extra, tokens

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        ids, extra = self._placeholders(request.messages, request.chat_template_kwargs, request.tools)
        parts = [p for m in request.messages for p in m.images]
        clips = self._clips([p for m in request.messages for p in m.videos])
        video_extra, video_tokens = self._video_counts(clips)
        prompt_tokens = len(ids) + extra + video_extra
        image_tokens = extra + len(parts)
        check_prompt_fits(prompt_tokens, image_tokens, video_tokens if clips else None, self.context_length)
        wanted = new_token_budget(request, prompt_tokens, self.context_length, self.default_max_new_tokens)
        images, kwargs = self._images(parts)
        videos, video_kwargs = self._videos(clips)
        if video_kwargs:  # each modality's budget in its own scope (a flat one would reach both processors)
            kwargs = {"videos_kwargs": video_kwargs, **({"images_kwargs": kwargs} if kwargs else {})}
        return PreparedPrompt(
            request=request,
            token_ids=ids,
            images=images,
            processor_kwargs=kwargs,
            prompt_tokens=prompt_tokens,
            image_tokens=image_tokens,
            max_new_tokens=wanted,
            reasoning_open=self._ends_in_think(ids),
            videos=videos,
            video_tokens=video_tokens,
            grammar=self.grammar(request.structured) if request.structured is not None else None,
        )

    def _videos(self, clips: list[ClipInput]) -> tuple[list[Any], dict[str, Any]]:
        """(frames, metadata) per clip for vLLM, and their budget as its videos_kwargs (one for all clips of a
        request). Clips whose budgets differ (Qwen3-VL's grows with the frame count): each clip's frames are resized
        here to the size the processor would give it alone, and the processor's range covers them all, so it
        leaves each as it is."""
        if not clips:
            return [], {}
        kwargs = [c.processor_kwargs for c in clips]
        if any(k != kwargs[0] for k in kwargs):
            clips, size = _presized(clips, self.video_processor)
            kwargs = [{**kwargs[0], "size": size}]
        videos = [(c.frames, {**c.metadata, "do_sample_frames": False}) for c in clips]
        return videos, kwargs[0]

    def grammar(self, spec: StructuredSpec) -> str:
        return grammar_text(spec, self._token_id)

    def _token_id(self, text: str) -> int | None:
        """`text`'s id when the vocabulary has it as one token (vLLM's llguidance covers the whole tokenizer)."""
        return single_token_id(self.prompts.tokenizer, text)

    def _ends_in_think(self, ids: list[int]) -> bool:
        return bool(self.prompts.tokenizer.decode(ids[-4:]).rstrip().endswith("<think>"))

    def _images(self, parts: list[ImagePart]) -> tuple[list[Any], dict[str, Any]]:
        """Decoded pictures for vLLM, and the request's pixel budget as its processor kwargs. One budget for all:
        vLLM's processor resizes them exactly as the transformers engine's does. Mixed budgets (detail: low beside
        high): each picture is resized to its own budget here, and the processor leaves aligned sizes alone."""
        budgets = {p.budget for p in parts}
        images = []
        for part in parts:
            picture = part.image.decode(part.budget.max_pixels)
            try:
                if len(budgets) > 1:
                    w, h = part.image.size
                    new_h, new_w = self.prompts.resized(w, h, part.budget)
                    if (new_w, new_h) != picture.size:
                        picture = picture.resize((new_w, new_h), resample=3)  # bicubic, as the processor
            except (ValueError, OSError) as exc:
                raise ImageInputError(f"image could not be resized: {exc}", param=part.image.param) from None
            finally:
                part.image.release()
            images.append(picture)
        if len(budgets) != 1:
            return images, {}
        (budget,) = budgets
        return images, budget_kwargs(budget)


def budget_kwargs(budget: PixelBudget) -> dict[str, Any]:
    """A pixel budget as vLLM's Qwen-VL processor kwargs (it maps them onto the HF processor's size edges)."""
    kwargs: dict[str, Any] = {"max_pixels": budget.max_pixels}
    if budget.min_pixels is not None:
        kwargs["min_pixels"] = budget.min_pixels
    return kwargs


def _prompt_builder(path: Path, is_vlm: bool, context_length: int) -> PromptBuilder:
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(str(path)) if is_vlm else None  # type: ignore[no-untyped-call]
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(str(path))
    return PromptBuilder(processor, tokenizer, context_length, pixel_cache_bytes=0)


def generation_config(path: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json: transformers' defaults
        return GenerationConfig()  # type: ignore[no-untyped-call]


def _group_times(clip: ClipInput, video_processor: Any) -> list[float]:
    """Qwen3-VL's timestamp of each frame pair (vLLM's and transformers' rule: the mean time of the pair)."""
    temporal = int(getattr(video_processor, "temporal_patch_size", 2) or 2)
    fps = float(clip.metadata["fps"])
    indices = list(clip.metadata["frames_indices"])
    if len(indices) % temporal:
        indices += [indices[-1]] * (temporal - len(indices) % temporal)
    times = [i / fps for i in indices]
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def _presized(clips: list[ClipInput], video_processor: Any) -> tuple[list[ClipInput], dict[str, int]]:
    """Clips resized to the size the processor gives each alone, and a size range containing every one of them
    (the processor's rule leaves an aligned size inside its range as it is)."""
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    temporal = int(getattr(video_processor, "temporal_patch_size", 2) or 2)
    per_clip = budget_per_clip(video_processor)
    out, areas = [], []
    for clip in clips:
        h, w = resized_size(clip, video_processor)
        try:
            frames = np.stack([np.asarray(Image.fromarray(f).resize((w, h), resample=3)) for f in clip.frames])
        except (ValueError, OSError) as exc:
            raise VideoInputError(f"video could not be resized: {exc}", param=clip.param) from None
        out.append(replace(clip, frames=frames))
        count = int(clip.frames.shape[0])
        areas.append((round(count / temporal) * temporal if per_clip else 1) * h * w)
    return out, {"shortest_edge": min(areas), "longest_edge": max(areas)}


def _video_refusal(processor: Any, video_processor: Any) -> tuple[str | None, bool]:
    """(why this model's clips cannot go through vLLM here, or None; whether compat bridged a mismatch to let
    them). Qwen3-VL clips need the processor to take placeholders without frames (engine/vllm/compat.py)."""
    if video_processor is None:
        return None, False  # the template step says the model takes no video
    if not budget_per_clip(video_processor):
        return None, False  # Qwen2/2.5-VL: vLLM calls the processor once, with the text and the frames together
    if accepts_bare_video_placeholders(processor):
        return None, False
    if allow_bare_video_placeholders(processor):
        return None, True
    return (
        "video input is not supported for Qwen3-VL models with engine: vllm and this transformers (vLLM 0.32 "
        "calls its processor on video placeholders without their frames, which this transformers refuses); "
        "serve this model with engine: transformers for video"
    ), False


def _video_target(processor: Any) -> int:
    """Prompt tokens a Qwen3-VL clip's expansion replaces, by vLLM's rule: transformers processors that override
    `replace_video_token` (5.10 on) keep the outer <|vision_start|>/<|vision_end|> and replace only <|video_pad|>."""
    try:
        from transformers.processing_utils import ProcessorMixin
    except ImportError:
        return 3
    own = getattr(type(processor), "replace_video_token", None)
    return 1 if own is not None and own is not getattr(ProcessorMixin, "replace_video_token", None) else 3
