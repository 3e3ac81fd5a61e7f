"""Our request ↔ vLLM's: the one place the backend-neutral `GenerationRequest` becomes vLLM inputs and vLLM's
`RequestOutput` becomes our `EngineOutput`.

Fields added to `GenerationRequest` later (videos → `multi_modal_data["video"]`) are mapped in `to_vllm`, and nowhere
else. Structured output goes to vLLM as the grammar text the transformers backend compiles too
(`engine/grammar_text.py`), for vLLM's `guidance` backend (the engine's only one, see engine.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlmbridge.engine.transformers.sampling import resolve_sampling
from vlmbridge.engine.types import (
    EngineFinish,
    EngineOutput,
    GenerationRequest,
    PromptInfo,
    TokenChoice,
    reportable_logprob,
)

__all__ = ["PreparedPrompt", "from_vllm", "to_vllm"]


@dataclass(frozen=True)
class PreparedPrompt:
    """A request made ready for vLLM: its prompt ids (one placeholder per image), decoded images and counts."""

    request: GenerationRequest
    token_ids: list[int]
    images: list[Any]  # PIL images, already bounded by their pixel budgets
    processor_kwargs: Mapping[str, Any]  # the request's pixel budget, for vLLM's HF processor
    prompt_tokens: int  # with every placeholder expanded (what vLLM will count)
    image_tokens: int
    max_new_tokens: int
    reasoning_open: bool
    videos: list[Any] = field(default_factory=list)  # (frames T×H×W×3, metadata) per clip, sampled by us
    video_tokens: int = 0
    grammar: str | None = None  # the structured-output grammar (Lark text for llguidance), None for free text


def to_vllm(prepared: PreparedPrompt, generation_config: Any) -> tuple[dict[str, Any], Any]:
    """(vLLM prompt, vLLM SamplingParams) for a prepared request. Unset fields come from the model's
    generation_config by the transformers engine's own rule (`resolve_sampling`: an explicit temperature decides
    alone, generation_config's do_sample otherwise), so both engines sample the same way."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = prepared.request.sampling
    r = resolve_sampling(s, generation_config)
    params = SamplingParams(
        max_tokens=prepared.max_new_tokens,
        temperature=0.0 if r.greedy else r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        repetition_penalty=r.repetition_penalty,
        presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty,
        seed=s.seed,  # None: vLLM's own randomness
        ignore_eos=s.ignore_eos,
        logprobs=s.top_logprobs if s.logprobs else None,
        # Token ids only: the front detokenizes and matches stop strings (then aborts), for every engine alike.
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=_structured(prepared.grammar),
    )
    prompt: dict[str, Any] = {"prompt_token_ids": prepared.token_ids}
    media: dict[str, Any] = {}
    if prepared.images:
        media["image"] = prepared.images
    if prepared.videos:  # frames with their metadata: vLLM's own frame sampling stays off (do_sample_frames)
        media["video"] = prepared.videos
    if media:
        prompt["multi_modal_data"] = media
        if prepared.processor_kwargs:
            prompt["mm_processor_kwargs"] = dict(prepared.processor_kwargs)
    return prompt, params


def _structured(grammar: str | None) -> Any:
    if grammar is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(grammar=grammar)


_FINISH: dict[str, EngineFinish] = {"stop": "stop", "length": "length", "abort": "abort"}


def from_vllm(
    out: Any, *, first: bool, prepared: PreparedPrompt, image_token_id: int | None, video_token_id: int | None = None
) -> EngineOutput:
    """One delta `RequestOutput` as our `EngineOutput`; the first carries what vLLM made of the prompt."""
    completion = out.outputs[0]
    ids = tuple(int(t) for t in completion.token_ids)
    choices: tuple[TokenChoice, ...] = ()
    if completion.logprobs:
        top_n = prepared.request.sampling.top_logprobs
        picked = []
        for tid, entry in zip(ids, completion.logprobs, strict=False):
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            # vLLM reports a token its grammar masked as -inf: JSON cannot carry it (OpenAI's floor instead).
            top = tuple((int(k), reportable_logprob(float(v.logprob))) for k, v in ranked[:top_n]) if top_n else ()
            picked.append(TokenChoice(token_id=tid, logprob=reportable_logprob(float(entry[tid].logprob)), top=top))
        choices = tuple(picked)
    prompt = None
    if first:
        prompt_ids = out.prompt_token_ids or []
        images = sum(1 for t in prompt_ids if t == image_token_id) if image_token_id is not None else 0
        videos = sum(1 for t in prompt_ids if t == video_token_id) if video_token_id is not None else 0
        prompt = PromptInfo(
            prompt_tokens=len(prompt_ids),
            image_tokens=images,
            video_tokens=videos,
            cached_tokens=int(out.num_cached_tokens or 0),
            reasoning_open=prepared.reasoning_open,
        )
    finish: EngineFinish | None = None
    if out.finished:
        finish = _FINISH.get(str(completion.finish_reason), "stop")
    return EngineOutput(token_ids=ids, choices=choices, finish_reason=finish, prompt=prompt)
