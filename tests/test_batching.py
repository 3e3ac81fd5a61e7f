"""Batching: a request gives the same logits and tokens alone or in a batch with others, for every family."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ALL_FAMILIES, VLM_FAMILIES, TinyFactory
from tests.helpers import decoded, generate, image_question
from vlmbridge.engine.transformers.engine import EngineLimits, TransformersEngine
from vlmbridge.engine.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.output.client import ChunkStream


@pytest.fixture
def make_engine(tiny_model: TinyFactory) -> Iterator:  # type: ignore[type-arg]
    engines: list[TransformersEngine] = []

    def make(family: str, **limits: float) -> TransformersEngine:
        loaded = load_model(tiny_model(family), LoadOptions(device="cpu", dtype="fp32"))
        # A long idle wait makes requests submitted together land in one prefill batch.
        # No prefix cache: a repeated prompt would otherwise reuse its earlier KV instead of batching its prefill.
        settings = {"batch_wait_s": 0.3, "prefix_cache_bytes": 0, **limits}
        engine = TransformersEngine(loaded, "tiny", EngineLimits(**settings))  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.shutdown()


def request(messages: tuple[ChatMessage, ...], tokens: int = 8, **sampling: object) -> GenerationRequest:
    params = {"max_new_tokens": tokens, "temperature": 0.0, "logprobs": True, "top_logprobs": 20, "ignore_eos": True}
    return GenerationRequest(messages=messages, sampling=SamplingParams(**{**params, **sampling}))  # type: ignore[arg-type]


def mixed_requests(family: str) -> list[GenerationRequest]:
    """Different prompt lengths and, for VLMs, images of different sizes (and one text-only prompt)."""
    if family == "qwen2":
        texts = ["Hi", "Describe a sunny beach with palm trees and children playing", "Solve 3x + 5 = 20"]
        return [request((ChatMessage("user", t),)) for t in texts]
    return [
        request(image_question(decoded(320, 240, seed=1), "What is this?")),
        request(image_question(decoded(96, 200, seed=2), "Describe every detail of this picture, please")),
        request((ChatMessage("user", "No picture in this one, just text."),)),
        request(image_question(decoded(640, 480, seed=None), "Tag it.")),
    ]


def collect(stream: ChunkStream) -> list[GenerationChunk]:
    return list(stream)


def steps(chunks: list[GenerationChunk]) -> list[tuple[int, list[float]]]:
    return [(c.token_ids[0], [t[1] for t in c.logprobs[0].top]) for c in chunks if c.token_ids]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_per_step_logits_equal_alone_and_batched(make_engine, family: str) -> None:  # type: ignore[no-untyped-def]
    engine: TransformersEngine = make_engine(family)
    requests = mixed_requests(family)
    alone = [steps(collect(generate(engine, r))) for r in requests]
    assert engine.stats().max_batch_seen == 1

    streams = [generate(engine, r) for r in requests]  # submitted together: prefilled and decoded as one batch
    together = [steps(collect(s)) for s in streams]
    assert engine.stats().max_batch_seen == len(requests)
    for solo, batched in zip(alone, together, strict=True):
        assert_same_steps(solo, batched)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_joining_mid_decode_keeps_positions_right(make_engine, family: str) -> None:  # type: ignore[no-untyped-def]
    """Continuous batching: a request that joins while others decode gets its own M-RoPE positions."""
    engine: TransformersEngine = make_engine(family, batch_wait_s=0.0)
    first, late = mixed_requests(family)[:2]
    late_alone = steps(collect(generate(engine, late)))
    long_first = request(first.messages, tokens=40)
    s1 = generate(engine, long_first)
    it = iter(s1)
    for _ in range(5):
        next(it)  # the first request is decoding now
    s2 = generate(engine, late)
    late_joined = steps(collect(s2))
    rest = list(it)
    assert rest[-1].finish_reason == "length"
    assert engine.stats().max_batch_seen >= 2
    assert_same_steps(late_alone, late_joined)


def test_cancel_mid_batch_leaves_the_others_correct(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine: TransformersEngine = make_engine("qwen3_vl")
    requests = mixed_requests("qwen3_vl")
    alone = [steps(collect(generate(engine, r))) for r in requests]
    streams = [generate(engine, r) for r in requests]
    victim = iter(streams[1])
    next(victim)
    streams[1].close()
    assert list(victim)[-1].finish_reason == "cancelled"
    for i in (0, 2, 3):
        assert_same_steps(alone[i], steps(collect(streams[i])))


def assert_same_steps(a: list[tuple[int, list[float]]], b: list[tuple[int, list[float]]]) -> None:
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=2e-3)


def test_stop_strings_and_max_tokens_per_request_in_a_batch(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine: TransformersEngine = make_engine("qwen2")
    messages = (ChatMessage("user", "Tell me a story about a cat"),)
    free = collect(generate(engine, request(messages, tokens=16, logprobs=False, top_logprobs=0)))
    text = "".join(c.text for c in free)
    stop = text[3:5]
    batch = [
        generate(engine, request(messages, tokens=16, logprobs=False, top_logprobs=0, stop=(stop,))),
        generate(engine, request(messages, tokens=4, logprobs=False, top_logprobs=0)),
        generate(engine, request(messages, tokens=11, logprobs=False, top_logprobs=0)),
    ]
    stopped, four, eleven = (collect(s) for s in batch)
    assert stopped[-1].finish_reason == "stop" and "".join(c.text for c in stopped) == text[: text.index(stop)]
    assert four[-1].finish_reason == "length" and four[-1].usage.completion_tokens == 4  # type: ignore[union-attr]
    assert eleven[-1].usage.completion_tokens == 11  # type: ignore[union-attr]
    assert [t for c in eleven for t in c.token_ids] == [t for c in free[:11] for t in c.token_ids]


def test_prefill_token_budget_splits_big_bursts(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine: TransformersEngine = make_engine("qwen3_vl", max_prefill_tokens=200)
    requests = mixed_requests("qwen3_vl")
    streams = [generate(engine, r) for r in requests]
    for s in streams:
        assert collect(s)[-1].finish_reason == "length"
    assert engine.stats().prefill_batches >= 2  # 640×480 alone is 300+ tokens: it cannot share a prefill
