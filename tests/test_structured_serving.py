"""Structured output and forced tool calls on the real server, random-weight tiny checkpoints of every VLM family
(models that cannot write JSON on their own), with a picture in every request, through the official openai client,
on both engines: the transformers engine (llguidance in its sampling step) and the vLLM engine (the same grammar
text through vLLM's guidance backend; skipped where VLMBRIDGE_VLLM_PYTHON is not set).

A grammar is what makes these answers valid: without one, the same models answer noise (checked too).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import jsonschema
import pytest
from openai import AsyncOpenAI

from tests.conftest import VLM_FAMILIES, TinyFactory
from tests.server_utils import MODEL, Server, data_url, image_message, running
from tests.structured_cases import bounded_schemas, token_budget
from tests.test_conformance import ENGINES, engine_settings

T = TypeVar("T")
SCHEMAS = bounded_schemas(50)
PICTURE = data_url(64, 64, seed=3)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look an order up",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
                    "urgent": {"type": "boolean"},
                },
                "required": ["order_id"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "tag_product",
            "parameters": {
                "type": "object",
                "properties": {
                    "category": {"enum": ["apparel", "home", "toys"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
                },
                "required": ["category", "tags"],
            },
        },
    },
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _on(engine: str, *args: Any) -> Any:
    """A parameter that runs on `engine`, marked `vllm` for the vLLM engine."""
    marks = [pytest.mark.vllm] if engine == "vllm" else []
    return pytest.param((engine, *args), marks=marks, id="-".join((engine, *args)))


def _settings(engine: str) -> dict[str, Any]:
    if engine == "transformers":
        return {"dtype": "fp32"}
    return engine_settings(engine)  # vLLM's CPU attention needs the tiny-vllm checkpoint (32-dim heads)


@pytest.fixture(scope="module", params=[_on(e, f) for e in ENGINES for f in VLM_FAMILIES])
def server(request: pytest.FixtureRequest, tiny_model: TinyFactory) -> Iterator[Server]:
    engine, family = request.param
    folder = tiny_model(family) if engine == "transformers" else tiny_model(family, size="tiny-vllm")
    with running(folder, max_batch_size=8, **_settings(engine)) as server:
        yield server


def _schema_request(schema: dict[str, Any], seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": image_message(PICTURE, "Describe this product as JSON."),
        "max_tokens": token_budget(schema),
        "temperature": 1.0,
        "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        **extra,
    }


def _gather(server: Server, jobs: Callable[[AsyncOpenAI], list[Awaitable[T]]]) -> list[T]:
    """Run the requests `jobs` makes concurrently, on one client (the server batches them)."""

    async def main() -> list[T]:
        gate = asyncio.Semaphore(16)  # two batches' worth in flight: the queue stays within its bound

        async def gated(job: Awaitable[T]) -> T:
            async with gate:
                return await job

        async with server.async_openai() as client:
            return list(await asyncio.gather(*(gated(job) for job in jobs(client))))

    return asyncio.run(main())


async def _ask(client: AsyncOpenAI, body: dict[str, Any]) -> tuple[str, str | None]:
    """(content, finish_reason), blocking or streamed as the body says (streamed content is reassembled)."""
    if not body.get("stream"):
        r = await client.chat.completions.create(**body)
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    text, finish = [], None
    async for event in await client.chat.completions.create(**body):
        if event.choices:
            text.append(event.choices[0].delta.content or "")
            finish = event.choices[0].finish_reason or finish
    return "".join(text), finish


def _valid(schema: dict[str, Any], answer: tuple[str, str | None]) -> bool:
    """The answer validates; or (True) it ran out of tokens in the endless fraction of a number."""
    content, finish = answer
    if finish == "length" and _has_fractions(schema):
        # A fraction's digits have no bound in JSON schema, nor in any grammar library: a random model that loops
        # on a digit runs out of tokens there (and only there: the answer so far follows the schema).
        assert re.search(r"[:,\[] -?[0-9]+\.[0-9]{20,}$", content), (schema, answer)
        return True
    assert finish == "stop", (schema, answer)
    jsonschema.validate(json.loads(content), schema)
    return False


def _has_fractions(schema: dict[str, Any]) -> bool:
    return '"number"' in json.dumps(schema)


def test_fifty_schemas_validate_batched_with_free_requests_blocking_and_streamed(server: Server) -> None:
    free = {"model": MODEL, "messages": image_message(PICTURE), "max_tokens": 12, "temperature": 1.0}

    def jobs(client: AsyncOpenAI) -> list[Awaitable[tuple[str, str | None]]]:
        out = [_ask(client, _schema_request(s, i, stream=bool(i % 2))) for i, s in enumerate(SCHEMAS)]
        out += [_ask(client, _schema_request(s, 100 + i, stream=not i % 2)) for i, s in enumerate(SCHEMAS)]
        return out + [_ask(client, {**free, "seed": i, "stream": bool(i % 2)}) for i in range(6)]

    answers = _gather(server, jobs)
    endless = [_valid(schema, a) for schema, a in zip(SCHEMAS + SCHEMAS, answers[: 2 * len(SCHEMAS)], strict=True)]
    assert sum(endless) <= 2, "more than a rare answer looped in a fraction"
    # The free requests in the same batches are not JSON: the grammar applied to its own rows only.
    assert all(not _is_json(content) for content, _ in answers[2 * len(SCHEMAS) :])
    assert server.slot.engine.stats().max_batch_seen > 1


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_schemas_alone_blocking_and_streamed(server: Server) -> None:
    for i, schema in enumerate(SCHEMAS[:6]):
        for stream in (False, True):
            body = _schema_request(schema, 7 + i, stream=stream)
            [answer] = _gather(server, lambda c, body=body: [_ask(c, body)])
            _valid(schema, answer)


def test_running_out_of_tokens_mid_object_is_length(server: Server) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string", "maxLength": 200}}, "required": ["story"]}
    for stream in (False, True):
        body = _schema_request(schema, 1, max_tokens=12, stream=stream)
        [(content, finish)] = _gather(server, lambda c, body=body: [_ask(c, body)])
        assert finish == "length" and content.startswith('{"story": "') and not _is_json(content)


def test_json_object_parses_whenever_it_stops(server: Server) -> None:
    body = {"model": MODEL, "messages": image_message(PICTURE), "max_tokens": 24, "temperature": 1.0}
    fmt = {"type": "json_object"}
    answers = _gather(
        server,
        lambda c: [_ask(c, {**body, "seed": i, "response_format": fmt, "stream": bool(i % 2)}) for i in range(16)],
    )
    # A random model rarely closes a string within the budget (tests/test_grammar.py drives the same grammar with
    # logits that do): here every answer is an object so far, and any that stopped is a whole one.
    assert all(content.startswith("{") and finish in ("stop", "length") for content, finish in answers)
    assert all(isinstance(json.loads(content), dict) for content, finish in answers if finish == "stop")


def test_free_request_gives_the_same_logprobs_alone_and_batched_with_constrained_ones(server: Server) -> None:
    free = {
        "model": MODEL, "messages": image_message(data_url(96, 80, seed=9), "Tag it."), "max_tokens": 8,
        "temperature": 0, "logprobs": True, "top_logprobs": 5, "extra_body": {"ignore_eos": True},
    }  # fmt: skip

    async def once(client: AsyncOpenAI) -> Any:
        r = await client.chat.completions.create(**free)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
        return [(t.token, [a.logprob for a in t.top_logprobs]) for t in r.choices[0].logprobs.content]

    [alone] = _gather(server, lambda c: [once(c)])
    mixed = _gather(server, lambda c: [once(c), *(_ask(c, _schema_request(s, i)) for i, s in enumerate(SCHEMAS[:3]))])[
        0
    ]
    assert [t for t, _ in alone] == [t for t, _ in mixed]
    for (_, a), (_, b) in zip(alone, mixed, strict=True):
        assert a == pytest.approx(b, abs=2e-3)


def test_the_picture_reaches_the_model_under_a_schema(server: Server) -> None:
    """Every request here carries a picture; constrained or not, it must reach the model: two pictures give two
    first-step distributions under the same schema (greedy, logprobs of the grammar's allowed tokens)."""
    schema = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 8}}, "required": ["label"]}

    def first_step(url: str) -> list[float]:
        body = {
            "model": MODEL, "messages": image_message(url, "Tag it."), "max_tokens": 12, "temperature": 0,
            "logprobs": True, "top_logprobs": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "tag", "schema": schema}},
        }  # fmt: skip
        r = server.post(body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
        content = r.json()["choices"][0]["logprobs"]["content"]
        # The grammar forces `{"label": "` first (one allowed token, the rest at the -9999 floor); the first step
        # with a choice is where the picture shows.
        free = [t for t in content if sum(a["logprob"] > -9999 for a in t["top_logprobs"]) > 1]
        assert free, "no step of the answer left the grammar a choice"
        return [round(a["logprob"], 3) for a in free[0]["top_logprobs"]]

    assert first_step(data_url(96, 80, seed=21)) != first_step(data_url(96, 80, seed=22))


def _tool_body(choice: Any, seed: int, stream: bool) -> dict[str, Any]:
    # max_tokens: the longest valid answer, MAX_PARALLEL_CALLS calls of the longer tool with escaped strings.
    return {
        "model": MODEL, "messages": image_message(PICTURE, "Which order is this?"), "tools": TOOLS,
        "tool_choice": choice, "max_tokens": 700, "temperature": 1.0, "seed": seed, "stream": stream,
    }  # fmt: skip


async def _calls(client: AsyncOpenAI, body: dict[str, Any]) -> tuple[list[tuple[str, str, str]], str | None]:
    """[(id, name, arguments)], finish_reason — streamed deltas reassembled the way the openai client's users do."""
    if not body["stream"]:
        r = await client.chat.completions.create(**body)
        calls = r.choices[0].message.tool_calls or []
        return [(c.id, c.function.name, c.function.arguments) for c in calls], r.choices[0].finish_reason  # type: ignore[union-attr]
    parts: dict[int, list[str]] = {}
    finish = None
    async for event in await client.chat.completions.create(**body):
        if not event.choices:
            continue
        finish = event.choices[0].finish_reason or finish
        for delta in event.choices[0].delta.tool_calls or []:
            entry = parts.setdefault(delta.index, ["", "", ""])
            if delta.id:
                assert entry[0] == "" and delta.function is not None and delta.function.arguments == ""
                entry[0], entry[1] = delta.id, delta.function.name or ""
            else:
                assert entry[0] and delta.function is not None and delta.function.name is None
                entry[2] += delta.function.arguments or ""
    return [(a, b, c) for a, b, c in (parts[i] for i in sorted(parts))], finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_give_valid_calls(server: Server, stream: bool) -> None:
    named = {"type": "function", "function": {"name": "tag_product"}}

    def jobs(client: AsyncOpenAI) -> list[Awaitable[tuple[list[tuple[str, str, str]], str | None]]]:
        out = [_calls(client, _tool_body("required", i, stream)) for i in range(4)]
        return out + [_calls(client, _tool_body(named, i, stream)) for i in range(3)]

    results = _gather(server, jobs)
    for n, (calls, finish) in enumerate(results):
        assert finish == "tool_calls" and calls
        assert len({c[0] for c in calls}) == len(calls)
        for _, name, arguments in calls:
            jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])
        if n >= 4:
            assert [name for _, name, _ in calls] == ["tag_product"]


async def _message(client: AsyncOpenAI, body: dict[str, Any]) -> tuple[str, str, str | None]:
    """(reasoning_content, content, finish_reason) of a blocking answer."""
    r = await client.chat.completions.create(**body)
    message = r.choices[0].message
    return getattr(message, "reasoning_content", None) or "", message.content or "", r.choices[0].finish_reason


@pytest.mark.parametrize("engine", [_on(e) for e in ENGINES])
def test_thinking_models_reason_freely_then_answer_in_the_grammar(
    engine: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The Thinking template opens <think>: reasoning tokens are the model's own (with the same seed, the same with
    a schema as without), and the grammar takes over at </think>: where a free answer closed its reasoning, the
    constrained one answers valid JSON after the very same reasoning (vLLM: its qwen3 reasoning parser)."""
    from vlmbridge.tiny.builder import build_tiny_model

    size = "tiny" if engine == "transformers" else "tiny-vllm"
    folder = build_tiny_model(tmp_path_factory.mktemp("think") / "m", "qwen3_vl", size=size, variant="thinking")
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    fmt = _schema_request(schema, 0)["response_format"]
    # Sampling from the whole vocabulary (the Thinking checkpoint's top_k of 20 never reaches this model's </think>).
    body = {
        "model": MODEL, "messages": image_message(PICTURE), "max_tokens": 128, "temperature": 1.0, "top_p": 1.0,
        "extra_body": {"top_k": -1},
    }  # fmt: skip
    with running(folder, max_batch_size=8, **_settings(engine)) as server:
        free = _gather(server, lambda c: [_message(c, {**body, "seed": i}) for i in range(32)])
        ended = [i for i, (_, content, _) in enumerate(free) if content]  # reasoning closed, an answer began
        assert ended, "no seed closed its reasoning within max_tokens: try more seeds"
        bodies = [{**body, "seed": i, "response_format": fmt} for i in ended]
        constrained = _gather(server, lambda c: [_message(c, b) for b in bodies])
        thinking = _gather(server, lambda c: [_message(c, {**body, "seed": 0, "response_format": fmt})])
    assert not _is_json(free[ended[0]][1])  # free answers are noise
    for i, (reasoning, content, finish) in zip(ended, constrained, strict=True):
        assert reasoning == free[i][0], "the grammar changed the reasoning"
        if finish == "stop":
            jsonschema.validate(json.loads(content), schema)
        else:
            assert content.startswith("{"), content
    assert any(finish == "stop" for _, _, finish in constrained)
    if 0 not in ended:  # a seed that never closed its reasoning: the same reasoning, no answer
        assert thinking[0][:2] == (free[0][0], "")
