"""The transformers backend's grammars (llguidance) on a real tokenizer: masks, caching, timeouts, thinking, tools.

Logits here are drawn at random with a bias toward JSON's closing tokens, so answers finish within a few dozen
tokens (a random-weight model rarely closes a string): what is checked is that whatever the grammar lets
through, and ends, parses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch

from vlmbridge.engine.transformers.grammar import MAX_PARALLEL_CALLS, Constraint, GrammarBook
from vlmbridge.engine.types import StructuredSpec
from vlmbridge.errors import InvalidRequestError
from vlmbridge.output.toolcalls import parse_tool_calls
from vlmbridge.tiny.builder import _DIMS
from vlmbridge.tiny.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer(_DIMS["tiny"].vocab).tokenizer


@pytest.fixture(scope="module")
def book(tok: Any) -> Iterator[GrammarBook]:
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    book = GrammarBook(tok, len(tok) + 12, eos)  # logits wider than the vocabulary, as real checkpoints pad them
    yield book
    book.close()


def _run(
    book: GrammarBook, constraint: Constraint, tok: Any, seed: int, steps: int = 120, bias: str = '"}]'
) -> tuple[str, bool]:
    """Sample with `constraint` until it ends at end-of-sequence: (text, ended)."""
    gen = torch.Generator().manual_seed(seed)
    favoured = [i for i in range(len(tok)) if tok.decode([i]) and set(tok.decode([i])) <= set(bias)]
    eos = min(book.stop_ids)
    ids: list[int] = []
    for _ in range(steps):
        logits = torch.randn(book.vocab_size, generator=gen)
        logits[favoured] += 4.0
        scores = constraint.apply(logits.clone())
        token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))
        assert token < len(tok) and (token == eos or token not in tok.all_special_ids)
        constraint.accept(token)
        if token == eos:
            return tok.decode(ids, skip_special_tokens=True), True
        ids.append(token)
    return tok.decode(ids, skip_special_tokens=True), False


def test_json_object_parses_whenever_it_ends(book: GrammarBook, tok: Any) -> None:
    ended = 0
    for seed in range(30):
        text, done = _run(book, book.constraint(StructuredSpec(kind="json_object")), tok, seed)
        assert text.startswith("{")
        if done:
            ended += 1
            assert isinstance(json.loads(text), dict)
    assert ended >= 10


def test_schema_answers_validate(book: GrammarBook, tok: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "verdict": {"enum": ["approve", "reject"]},
            "reason": {"type": "string", "maxLength": 10},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["verdict", "reason", "score"],
        "additionalProperties": False,
    }
    spec = StructuredSpec(kind="json_schema", schema=json.dumps(schema))
    for seed in range(10):
        text, done = _run(book, book.constraint(spec), tok, seed, steps=200)
        assert done
        jsonschema.validate(json.loads(text), schema)
        assert ", " in text and ": " in text and "\n" not in text  # compact: no room to pad


def test_grammars_are_cached_by_spec(book: GrammarBook) -> None:
    spec = StructuredSpec(kind="json_schema", schema='{"type":"integer","minimum":0,"maximum":7}')
    hits = book.hits
    first = book.grammar(spec)
    assert book.grammar(spec) is first and book.hits == hits + 1
    other = StructuredSpec(kind="json_schema", schema='{"type":"integer","minimum":0,"maximum":8}')
    assert book.grammar(other) != first


def test_objects_are_closed_unless_the_schema_opens_them(book: GrammarBook, tok: Any) -> None:
    """Extra properties would make an answer unbounded: only the listed ones come (vLLM's backends do the same)."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
    for seed in range(5):
        text, done = _run(book, book.constraint(StructuredSpec("json_schema", json.dumps(schema))), tok, seed)
        assert done and set(json.loads(text)) == {"a"}


@pytest.mark.parametrize(
    "fmt", ["date", "time", "date-time", "duration", "uuid", "email", "ipv4", "ipv6", "hostname", "uri"]
)
def test_every_format_the_front_accepts_is_enforced(book: GrammarBook, tok: Any, fmt: str) -> None:
    spec = StructuredSpec("json_schema", json.dumps({"type": "string", "format": fmt}))
    book.constraint(spec)  # builds without error


def test_slow_compiles_are_a_400_and_do_not_block(tok: Any) -> None:
    book = GrammarBook(tok, len(tok), frozenset(), compile_timeout_s=1e-4)
    try:
        props = {f"p{i}": {"type": "string", "pattern": "^[a-z]{1,30}(-[0-9]{1,9}){0,9}$"} for i in range(60)}
        spec = StructuredSpec(kind="json_schema", schema=json.dumps({"type": "object", "properties": props}))
        with pytest.raises(InvalidRequestError) as info:
            book.constraint(spec)
        assert info.value.code == "schema_too_complex" and info.value.param == "response_format"
    finally:
        book.close()


def test_thinking_is_free_until_its_end_token(book: GrammarBook, tok: Any) -> None:
    think_end = tok.convert_tokens_to_ids("</think>")
    constraint = book.constraint(StructuredSpec(kind="json_object"), dormant_until=think_end)
    logits = torch.zeros(book.vocab_size)
    assert bool(torch.isfinite(constraint.apply(logits.clone())).all())  # reasoning: nothing masked
    word = tok.encode("Hmm", add_special_tokens=False)[0]
    constraint.accept(word)
    constraint.accept(think_end)
    allowed = torch.isfinite(constraint.apply(logits.clone()))
    assert 0 < int(allowed.sum()) < 10 and all(tok.decode([i]).startswith("{") for i in allowed.nonzero().flatten())


def _tool_spec(parallel: bool) -> tuple[StructuredSpec, dict[str, Any]]:
    params = {
        "type": "object",
        "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}},
        "required": ["order_id"],
        "additionalProperties": False,
    }
    call = {
        "type": "object",
        "properties": {"name": {"const": "lookup_order"}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return StructuredSpec(kind="tool_calls", schema=json.dumps(call), parallel=parallel), params


@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_grammar_gives_calls_the_parser_reads(book: GrammarBook, tok: Any, parallel: bool) -> None:
    spec, params = _tool_spec(parallel)
    counts = set()
    for seed in range(12):
        text, done = _run(book, book.constraint(spec), tok, seed, steps=300, bias="\n<")
        assert done and re.fullmatch(r"(<tool_call>\n\{.*?\}\n</tool_call>\n?)+", text, flags=re.S), text
        content, calls = parse_tool_calls(text, ["lookup_order"])
        assert content == "" and 1 <= len(calls) <= (MAX_PARALLEL_CALLS if parallel else 1)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), params)
        counts.add(len(calls))
    if parallel:
        assert max(counts) > 1  # the bias toward "\n<" opens further calls
