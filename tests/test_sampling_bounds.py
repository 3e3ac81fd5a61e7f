"""Sampling at the edges of what the API allows, and on logits that over- or underflow: never an exception,
never an invalid distribution for multinomial, never a NaN logprob."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.conftest import TinyFactory
from tests.helpers import decoded, generate, image_question
from vlmbridge.engine.transformers.engine import EngineLimits, TransformersEngine
from vlmbridge.engine.transformers.sampling import (
    LOGPROB_FLOOR,
    MIN_TEMPERATURE,
    ResolvedSampling,
    Sampler,
    resolve_sampling,
)
from vlmbridge.engine.types import ChatMessage, GenerationRequest, SamplingParams
from vlmbridge.errors import EngineFailedError
from vlmbridge.loader import LoadOptions, load_model

INF, NAN = float("inf"), float("nan")


def sampler(prompt: list[int] | None = None, **overrides: Any) -> Sampler:
    cfg: dict[str, Any] = {
        "greedy": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 4,
        **overrides,
    }
    ids = torch.tensor([prompt or [0, 1, 2, 3, 4, 5]])
    return Sampler(ResolvedSampling(**cfg), ids, 8, "cpu")


def assert_reportable(values: list[float]) -> None:
    assert all(math.isfinite(v) and LOGPROB_FLOOR <= v <= 0.0 for v in values), values


@pytest.mark.parametrize(
    "row",
    [
        [NAN, 1.0, 2.0, NAN, 0.5, -1.0, 3.0, 0.0],
        [INF, 1.0, 2.0, -INF, 0.5, -1.0, INF, 0.0],
        [-INF, -INF, -INF, -INF, -INF, -INF, 7.0, -INF],
        [3e38, -3e38, 3e38, 0.0, 1.0, -1.0, 2.0, 0.0],
        [-3e38] * 8,
    ],
)
@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"greedy": True},
        {"repetition_penalty": 0.01, "temperature": 2.0},
        {"repetition_penalty": 10.0, "temperature": MIN_TEMPERATURE},
        {"repetition_penalty": 1e-39},  # the finding: overflowed every seen score to inf
        {"presence_penalty": -2.0, "frequency_penalty": -2.0, "top_p": 1e-9, "top_k": 1},
    ],
)
def test_choose_survives_overflowing_logits(row: list[float], cfg: dict[str, Any]) -> None:
    s = sampler(**cfg)
    for _ in range(3):
        token, logprob = s.choose(torch.tensor(row))
        s.observe(token)
        assert 0 <= token < 8 and not math.isnan(row[token]) and row[token] != -INF
        assert logprob is not None
        assert_reportable([logprob.logprob, *(t[1] for t in logprob.top)])


def test_plus_inf_is_the_certain_token_and_nan_is_never_chosen() -> None:
    for seed in range(20):
        assert sampler(seed=seed).choose(torch.tensor([NAN, 0.0, INF, 1.0, NAN, 0.0, 0.0, 0.0]))[0] == 2
    picks = {sampler(seed=seed).choose(torch.tensor([NAN, 0.0, 0.0, NAN, NAN, NAN, NAN, NAN]))[0] for seed in range(40)}
    assert picks == {1, 2}


def test_penalties_that_leave_nothing_finite_fall_back_to_the_models_best() -> None:
    # 10× a score this negative overflows to -inf for every candidate; the model's own favourite is what is left.
    s = sampler(repetition_penalty=10.0, prompt=list(range(8)))
    token, _ = s.choose(torch.tensor([-1e38, -2e38, -5e37, -3e38, -1e38, -2e38, -3e38, -3e38]))
    assert token == 2


def test_logits_with_nothing_usable_fail_the_request_with_a_classified_error() -> None:
    with pytest.raises(EngineFailedError) as caught:
        sampler().choose(torch.full((8,), NAN))
    assert caught.value.code == "sampling_failed"


def test_underflowing_logprobs_are_reported_at_the_floor() -> None:
    _, logprob = sampler(greedy=True).choose(torch.tensor([0.0, -INF, -1e30, 1.0, 2.0, 3.0, 4.0, 5.0]))
    assert logprob is not None
    assert_reportable([logprob.logprob, *(t[1] for t in logprob.top)])
    full = sampler(greedy=True, top_logprobs=8).choose(torch.tensor([0.0, -INF, -1e30, 1.0, 2.0, 3.0, 4.0, 5.0]))[1]
    assert full is not None and sorted(t[1] for t in full.top)[:2] == [LOGPROB_FLOOR, LOGPROB_FLOOR]


@pytest.mark.parametrize(("temperature", "greedy"), [(0.0, True), (1e-6, True), (MIN_TEMPERATURE, False), (2.0, False)])
def test_temperatures_below_the_threshold_are_greedy(temperature: float, greedy: bool) -> None:
    resolved = resolve_sampling(SamplingParams(temperature=temperature, top_k=-1), None)
    assert resolved.greedy is greedy
    assert resolved.top_k == 0  # -1 means off


# --- through the engine, on a tiny checkpoint ------------------------------------------------------------------

EXTREMES: list[dict[str, Any]] = [
    {"repetition_penalty": 0.01, "temperature": 1.0},
    {"repetition_penalty": 0.01, "temperature": 2.0},
    {"repetition_penalty": 10.0, "temperature": 1.0},
    {"repetition_penalty": 10.0, "temperature": 2.0},
    {"presence_penalty": 2.0, "frequency_penalty": 2.0, "temperature": 1.0},
    {"presence_penalty": -2.0, "frequency_penalty": -2.0, "temperature": 2.0},
    {"top_p": 1e-9, "temperature": 1.0},
    {"top_k": 1, "temperature": 2.0},
    {"top_k": -1, "top_p": 1.0, "temperature": 2.0},
    {"temperature": 1e-6},
    {"repetition_penalty": 0.01, "presence_penalty": -2.0, "frequency_penalty": -2.0, "temperature": 2.0},
    {"repetition_penalty": 1e-39, "temperature": 1.0},  # the finding (the API now refuses it; the engine copes)
]


@pytest.fixture(params=["qwen2", "qwen3_vl"])
def engine(request: pytest.FixtureRequest, tiny_model: TinyFactory) -> Iterator[TransformersEngine]:
    loaded = load_model(tiny_model(request.param), LoadOptions(device="cpu", dtype="fp32"))
    engine = TransformersEngine(loaded, "tiny", EngineLimits(max_batch_size=len(EXTREMES), prefix_cache_bytes=0))
    engine.start()
    yield engine
    engine.shutdown()


def messages(engine: TransformersEngine) -> tuple[ChatMessage, ...]:
    if engine.info.kind == "text":
        return (ChatMessage("user", "Tell me about the picture of a cat."),)
    return image_question(decoded(96, 120, seed=4))


def sample(engine: TransformersEngine, **sampling: Any) -> list[Any]:
    params = {"max_new_tokens": 12, "ignore_eos": True, "logprobs": True, "top_logprobs": 5, "seed": 1, **sampling}
    request = GenerationRequest(messages=messages(engine), sampling=SamplingParams(**params))
    return list(generate(engine, request))


def test_extreme_sampling_settings_all_finish_and_the_engine_stays_ready(engine: TransformersEngine) -> None:
    params = {"max_new_tokens": 12, "ignore_eos": True, "logprobs": True, "top_logprobs": 5, "seed": 1}
    streams = [
        generate(engine, GenerationRequest(messages=messages(engine), sampling=SamplingParams(**{**params, **x})))
        for x in EXTREMES
    ]  # submitted together: they share batches as well
    for settings, stream in zip(EXTREMES, streams, strict=True):
        chunks = list(stream)
        last = chunks[-1]
        assert last.error is None and last.finish_reason == "length", (settings, last)
        values = [v for c in chunks for lp in c.logprobs for v in (lp.logprob, *(t[1] for t in lp.top))]
        assert len(values) == 12 * 6
        assert_reportable(values)
    assert engine.state == "ready"


def test_near_zero_temperature_tiny_top_p_and_top_k_1_are_greedy(engine: TransformersEngine) -> None:
    greedy = sample(engine, temperature=0.0, repetition_penalty=1.0)
    ids = [t for c in greedy for t in c.token_ids]
    for settings in ({"temperature": 1e-6}, {"temperature": 2.0, "top_p": 1e-9}, {"temperature": 2.0, "top_k": 1}):
        chunks = sample(engine, **{"repetition_penalty": 1.0, "top_k": 0, "top_p": 1.0, **settings})
        assert [t for c in chunks for t in c.token_ids] == ids, settings
