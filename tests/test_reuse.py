"""KV-cache reuse across turns and the vision-encoder cache: same results, bounded memory, never a stale image."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import VLM_FAMILIES, TinyFactory
from tests.helpers import decoded, generate
from vlmbridge.engine.transformers.engine import EngineLimits, TransformersEngine
from vlmbridge.engine.types import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    ImagePart,
    PixelBudget,
    SamplingParams,
    TextPart,
)
from vlmbridge.loader import LoadOptions, load_model

BUDGET = PixelBudget(max_pixels=1024 * 1024)


@pytest.fixture
def engines(tiny_model: TinyFactory) -> Iterator:  # type: ignore[type-arg]
    made: list[TransformersEngine] = []

    def make(family: str, **limits: int) -> TransformersEngine:
        loaded = load_model(tiny_model(family), LoadOptions(device="cpu", dtype="fp32"))
        engine = TransformersEngine(loaded, "tiny", EngineLimits(batch_wait_s=0.0, **limits))  # type: ignore[arg-type]
        engine.start(warm_up=False)
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.shutdown()


def ask(engine: TransformersEngine, messages: tuple[ChatMessage, ...], tokens: int = 6) -> list[GenerationChunk]:
    sampling = SamplingParams(max_new_tokens=tokens, temperature=0.0, logprobs=True, top_logprobs=10, ignore_eos=True)
    # The last chunk comes after the worker filed the request's KV: the next turn can rely on it at once.
    return list(generate(engine, GenerationRequest(messages=messages, sampling=sampling)))


def steps(chunks: list[GenerationChunk]) -> list[tuple[int, list[float]]]:
    return [(c.token_ids[0], [t[1] for t in c.logprobs[0].top]) for c in chunks if c.token_ids]


def same(a: list[GenerationChunk], b: list[GenerationChunk]) -> None:
    sa, sb = steps(a), steps(b)
    assert [t for t, _ in sa] == [t for t, _ in sb]
    for (_, x), (_, y) in zip(sa, sb, strict=True):
        assert x == pytest.approx(y, abs=2e-3)


def conversation(picture, turns: int, answers: list[str]) -> tuple[ChatMessage, ...]:  # type: ignore[no-untyped-def]
    messages: list[ChatMessage] = [ChatMessage("user", (ImagePart(picture, BUDGET), TextPart("What is this?")))]
    for turn in range(1, turns):
        messages.append(ChatMessage("assistant", answers[turn - 1]))
        messages.append(ChatMessage("user", f"And detail number {turn}?"))
    return tuple(messages)


def run_turns(engine: TransformersEngine, picture, turns: int) -> list[list[GenerationChunk]]:  # type: ignore[no-untyped-def]
    answers: list[str] = []
    results = []
    for turn in range(1, turns + 1):
        chunks = ask(engine, conversation(picture, turn, answers))
        answers.append("".join(c.text for c in chunks))
        results.append(chunks)
    return results


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_reuse_gives_the_same_logits_as_no_reuse(engines, family: str) -> None:  # type: ignore[no-untyped-def]
    picture = decoded(320, 240, seed=1)
    reused = run_turns(engines(family), picture, 3)
    fresh = run_turns(engines(family, prefix_cache_bytes=0, encoder_cache_bytes=0), picture, 3)
    for a, b in zip(reused, fresh, strict=True):
        same(a, b)
    assert fresh[2][-1].usage.cached_tokens == 0  # type: ignore[union-attr]
    turn1 = reused[0][-1].usage
    assert turn1 is not None and turn1.cached_tokens == 0
    for later in (reused[1][-1].usage, reused[2][-1].usage):
        # The whole first turn, picture included, came from the cache.
        assert later is not None and later.cached_tokens >= turn1.prompt_tokens


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_vl"])
def test_a_changed_picture_is_never_served_from_the_cache(engines, family: str) -> None:  # type: ignore[no-untyped-def]
    engine = engines(family)
    first, second = decoded(320, 240, seed=1), decoded(320, 240, seed=2)  # same size, other pixels
    turns = run_turns(engine, first, 2)
    answer = "".join(c.text for c in turns[0])
    swapped = conversation(second, 2, [answer])
    got = ask(engine, swapped)
    inputs = engine.prompts.build(swapped)
    image_start = inputs.image_spans[0][0]
    assert got[-1].usage is not None and got[-1].usage.cached_tokens <= image_start
    same(got, ask(engines(family, prefix_cache_bytes=0, encoder_cache_bytes=0), swapped))


def test_caches_stay_within_budget_and_evictions_keep_results_right(engines) -> None:  # type: ignore[no-untyped-def]
    probe = engines("qwen3_vl")
    run_turns(probe, decoded(320, 240, seed=7), 1)
    entry = probe.prefix_cache.stats.bytes  # type: ignore[union-attr]
    features = probe.encoder_cache.stats.bytes  # type: ignore[union-attr]
    assert entry > 0 and features > 0
    # Room for about one conversation and one picture: every new one evicts the last.
    engine = engines("qwen3_vl", prefix_cache_bytes=int(entry * 1.5), encoder_cache_bytes=int(features * 1.5))
    plain = engines("qwen3_vl", prefix_cache_bytes=0, encoder_cache_bytes=0)
    for seed in (11, 12, 13, 11):
        picture = decoded(320, 240, seed=seed)
        for a, b in zip(run_turns(engine, picture, 2), run_turns(plain, picture, 2), strict=True):
            same(a, b)
        assert engine.prefix_cache.stats.bytes <= engine.prefix_cache.budget  # type: ignore[union-attr]
        assert engine.encoder_cache.stats.bytes <= engine.encoder_cache.budget  # type: ignore[union-attr]
    assert engine.prefix_cache.stats.evictions >= 2  # type: ignore[union-attr]
    assert engine.encoder_cache.stats.evictions >= 2  # type: ignore[union-attr]


def test_encoder_cache_serves_the_same_picture_in_another_conversation(engines) -> None:  # type: ignore[no-untyped-def]
    engine = engines("qwen3_vl", prefix_cache_bytes=0)
    picture = decoded(320, 240, seed=3)
    one = ask(engine, (ChatMessage("user", (ImagePart(picture, BUDGET), TextPart("Tag it."))),))
    stats = engine.encoder_cache.stats  # type: ignore[union-attr]
    assert (stats.hits, stats.misses) == (0, 1)
    two = ask(engine, (ChatMessage("user", (ImagePart(decoded(320, 240, seed=3), BUDGET), TextPart("Tag it."))),))
    assert (stats.hits, stats.misses) == (1, 1)
    same(one, two)
    smaller = PixelBudget(max_pixels=128 * 128 * 4)  # the same picture at another budget is another entry
    ask(engine, (ChatMessage("user", (ImagePart(picture, smaller), TextPart("Tag it."))),))
    assert stats.misses == 2
