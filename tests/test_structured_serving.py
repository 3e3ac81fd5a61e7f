"""Structured output and forced tool calls on the real server, random-weight tiny checkpoints of every VLM family
(models that cannot write JSON on their own), with a picture in every request, through the official openai client.

A grammar is what makes these answers valid: without one, the same models answer noise (checked too).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import jsonschema
import pytest
from openai import AsyncOpenAI

from tests.conftest import VLM_FAMILIES, TinyFactory
from tests.server_utils import MODEL, Server, data_url, image_message, running
from tests.structured_cases import bounded_schemas, token_budget

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


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def server(request: pytest.FixtureRequest, tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model(request.param), dtype="fp32", max_batch_size=8) as server:
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


def _valid(schema: dict[str, Any], answer: tuple[str, str | None]) -> None:
    content, finish = answer
    assert finish == "stop", (schema, answer)
    jsonschema.validate(json.loads(content), schema)


def test_fifty_schemas_validate_batched_with_free_requests_blocking_and_streamed(server: Server) -> None:
    free = {"model": MODEL, "messages": image_message(PICTURE), "max_tokens": 12, "temperature": 1.0}

    def jobs(client: AsyncOpenAI) -> list[Awaitable[tuple[str, str | None]]]:
        out = [_ask(client, _schema_request(s, i, stream=bool(i % 2))) for i, s in enumerate(SCHEMAS)]
        out += [_ask(client, _schema_request(s, 100 + i, stream=not i % 2)) for i, s in enumerate(SCHEMAS)]
        return out + [_ask(client, {**free, "seed": i, "stream": bool(i % 2)}) for i in range(6)]

    answers = _gather(server, jobs)
    for schema, answer in zip(SCHEMAS + SCHEMAS, answers[: 2 * len(SCHEMAS)], strict=True):
        _valid(schema, answer)
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


def test_thinking_models_reason_freely_before_the_constrained_answer(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The Thinking template opens <think>: reasoning tokens are the model's own (the same with a schema as
    without), and the grammar only takes over at </think> (tests/test_grammar.py checks that switch)."""
    from vlmbridge.tiny.builder import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("think") / "m", "qwen3_vl", variant="thinking")
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}
    body = {
        "model": MODEL, "messages": image_message(PICTURE), "max_tokens": 8, "temperature": 0, "ignore_eos": True,
    }  # fmt: skip
    with running(folder) as server:
        free = server.post(body).json()["choices"][0]["message"]
        constrained = server.post({**body, "response_format": _schema_request(schema, 0)["response_format"]}).json()
    message = constrained["choices"][0]["message"]
    assert free["reasoning_content"] and message["reasoning_content"] == free["reasoning_content"]
    assert message["content"] == free["content"] == ""
