"""The real server (uvicorn on a free port) driven by the official openai client, for every family."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import torch

from tests.conftest import ALL_FAMILIES, VLM_FAMILIES, TinyFactory
from tests.helpers import decoded, image_question
from tests.server_utils import MODEL, Server, data_url, image_message, running
from vlmbridge.engine.transformers.prompt import PromptBuilder
from vlmbridge.engine.types import PixelBudget
from vlmbridge.loader import LoadOptions, load_model


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family_server(request: pytest.FixtureRequest, tiny_model: TinyFactory) -> Iterator[tuple[str, Server]]:
    with running(tiny_model(request.param), dtype="fp32") as server:
        yield request.param, server


def messages_for(family: str) -> list[dict]:  # type: ignore[type-arg]
    if family == "qwen2":
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    return image_message(data_url(320, 240, seed=1))


def test_sync_non_stream(family_server: tuple[str, Server]) -> None:
    family, server = family_server
    r = server.openai().chat.completions.create(
        model=MODEL,
        messages=messages_for(family),
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    )
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    image_tokens = r.usage.prompt_tokens_details.image_tokens  # type: ignore[union-attr]
    assert (image_tokens > 0) == (family != "qwen2")


def test_streaming_with_usage(family_server: tuple[str, Server]) -> None:
    family, server = family_server
    stream = server.openai().chat.completions.create(
        model=MODEL, messages=messages_for(family), max_tokens=6, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    finishes = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert events[-1].choices == [] and events[-1].usage is not None
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    # Same request without streaming gives the same text (greedy).
    again = server.openai().chat.completions.create(
        model=MODEL,
        messages=messages_for(family),
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    )
    assert again.choices[0].message.content == text
    assert again.usage is not None and again.usage.completion_tokens == events[-1].usage.completion_tokens


def test_async_client_concurrent_requests(family_server: tuple[str, Server]) -> None:
    family, server = family_server

    async def main() -> list[str]:
        client = server.async_openai()
        calls = [
            client.chat.completions.create(
                model=MODEL,
                messages=messages_for(family),
                max_tokens=4,
                temperature=0,  # type: ignore[arg-type]
            )
            for _ in range(3)
        ]
        results = await asyncio.gather(*calls)
        await client.close()
        return [r.choices[0].message.content or "" for r in results]

    texts = asyncio.run(main())
    assert len(set(texts)) == 1  # greedy: identical answers, none lost


def test_models_endpoint(family_server: tuple[str, Server]) -> None:
    family, server = family_server
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL]
    extra = models.data[0].model_extra or {}
    assert extra["vlmbridge"]["vision"] == (family != "qwen2")


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_image_reaches_the_model_through_the_api(tiny_model: TinyFactory, family: str) -> None:
    """Same prompt, greedy: two same-size pictures give different first-token logprobs, the same one identical,
    and they equal the in-process logits for the same input."""
    folder = tiny_model(family)
    # Without the prefix cache the repeated request recomputes everything, so "identical" can be exact.
    with running(folder, dtype="fp32", prefix_cache_mb=0) as server:
        client = server.openai()

        def first_logprobs(seed: int) -> list[float]:
            r = client.chat.completions.create(
                model=MODEL, messages=image_message(data_url(320, 240, seed=seed)),  # type: ignore[arg-type]
                max_tokens=1, temperature=0, logprobs=True, top_logprobs=5,
            )  # fmt: skip
            assert r.choices[0].logprobs and r.choices[0].logprobs.content
            return [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]

        a, b, a_again = first_logprobs(1), first_logprobs(2), first_logprobs(1)
    assert a != b, "two different pictures gave the same logprobs: the image did not reach the model"
    assert a == a_again

    loaded = load_model(folder, LoadOptions(device="cpu", dtype="fp32"))
    builder = PromptBuilder(loaded.processor, loaded.tokenizer, context_length=32768)
    inputs = builder.build(image_question(decoded(320, 240, seed=1)))
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(**inputs.tensors).logits[0, -1].float(), dim=-1)
    expected = sorted(logp.topk(5).values.tolist(), reverse=True)
    assert a == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("detail", "expected_tokens"), [("high", 1024), ("low", 256)])
def test_usage_counts_image_tokens(tiny_model: TinyFactory, detail: str, expected_tokens: int) -> None:
    # Qwen3-VL: 1024×1024 → 1024 tokens at the default 1 MP budget; detail=low caps at 512×512 → 256 tokens.
    with running(tiny_model("qwen3_vl")) as server:
        r = server.openai().chat.completions.create(
            model=MODEL, messages=image_message(data_url(1024, 1024), detail=detail),  # type: ignore[arg-type]
            max_tokens=1,
        )  # fmt: skip
    assert r.usage is not None
    assert r.usage.prompt_tokens_details.image_tokens == expected_tokens  # type: ignore[union-attr]
    budget = PixelBudget(max_pixels=1024 * 1024 if detail == "high" else 512 * 512)
    loaded = load_model(tiny_model("qwen3_vl"), LoadOptions(device="cpu"))
    assert (
        PromptBuilder(loaded.processor, loaded.tokenizer, 32768).image_tokens_for(1024, 1024, budget) == expected_tokens
    )


def test_per_request_max_pixels_extension(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen3_vl")) as server:
        body = {
            "model": MODEL,
            "messages": image_message(data_url(1024, 1024)),
            "max_tokens": 1,
            "max_pixels": 128 * 128 * 4,
        }
        r = server.post(body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 64  # 256×256 → 8×8 merged patches


def test_thinking_output_goes_to_reasoning_content(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The Thinking template opens <think> for the answer: until </think> the text is reasoning, not content."""
    from vlmbridge.tiny.builder import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("think") / "m", "qwen3_vl", variant="thinking")
    with running(folder) as server:
        body = {"model": MODEL, "messages": image_message(data_url()), "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        r = server.post(body).json()
        message = r["choices"][0]["message"]
        assert message["content"] == "" and message["reasoning_content"]
        events = server.openai().chat.completions.create(
            model=MODEL, messages=image_message(data_url()), max_tokens=6, temperature=0, stream=True,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        streamed = "".join(
            (e.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for e in events if e.choices
        )
    assert streamed == message["reasoning_content"]


def test_follow_up_turn_reports_cached_tokens_and_metrics(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen3_vl")) as server:
        client = server.openai()
        first = client.chat.completions.create(
            model=MODEL,
            messages=image_message(data_url(320, 240, seed=5)),
            max_tokens=4,
            temperature=0,  # type: ignore[arg-type]
        )
        follow_up = [
            *image_message(data_url(320, 240, seed=5)),
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "And the colours?"},
        ]
        second = client.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=4, temperature=0)  # type: ignore[arg-type]
        metrics = httpx.get(f"{server.base_url}/metrics").text
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens  # type: ignore[union-attr]
    assert 'vlmbridge_cache{cache="prefix",model="tiny",stat="hits"} 1.0' in metrics
    assert 'vlmbridge_cache{cache="encoder",model="tiny",stat="misses"} 1.0' in metrics
