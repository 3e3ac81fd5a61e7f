"""The `<tool_call>` parser of the output pipeline: Qwen's formats, several calls, malformed blocks, text around."""

from __future__ import annotations

import json

import pytest

from vlmbridge.output.toolcalls import ToolCallParser, parse_tool_calls

NAMES = ("get_weather", "lookup_order")
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ORDER = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "AB1234"}}\n</tool_call>'


def calls_of(text: str) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    content, calls = parse_tool_calls(text, NAMES)
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_one_call_as_qwen_writes_it() -> None:
    assert calls_of(WEATHER) == ("", [("get_weather", {"city": "Paris"})])


def test_compact_and_alternative_forms() -> None:
    compact = '<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>'
    assert calls_of(compact) == ("", [("get_weather", {"city": "Oslo"})])
    as_string = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'
    assert calls_of(as_string) == ("", [("get_weather", {"city": "Rome"})])
    parameters = '<tool_call>{"name": "lookup_order", "parameters": {"order_id": "X"}}</tool_call>'
    assert calls_of(parameters) == ("", [("lookup_order", {"order_id": "X"})])
    no_args = '<tool_call>{"name": "lookup_order"}</tool_call>'
    assert calls_of(no_args) == ("", [("lookup_order", {})])


def test_several_calls_keep_their_order() -> None:
    content, calls = calls_of(f"{WEATHER}\n{ORDER}\n{WEATHER}")
    assert content == "" and [n for n, _ in calls] == ["get_weather", "lookup_order", "get_weather"]


def test_text_around_calls_is_content() -> None:
    content, calls = calls_of(f"Let me check.\n{WEATHER}\nDone here.")
    assert content == "Let me check.Done here." and calls == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": "not json"}\n</tool_call>',
        '<tool_call>\n["get_weather"]\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # never closed
    ],
)
def test_malformed_blocks_fall_back_to_text(block: str) -> None:
    content, calls = calls_of(f"Before {block}")
    assert calls == [] and content == f"Before {block}"


def test_malformed_block_next_to_a_good_one() -> None:
    content, calls = calls_of(f"<tool_call>oops</tool_call>{WEATHER}")
    assert content == "<tool_call>oops</tool_call>" and calls == [("get_weather", {"city": "Paris"})]


def test_plain_text_passes_through_untouched() -> None:
    for text in ("Hello there", "a < b and <tool is not a tag", "trailing space  ", "<tool_cal", ""):
        assert calls_of(text) == (text, [])


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_in_any_pieces_gives_the_same_answer(size: int) -> None:
    text = f"Checking. {WEATHER}\n{ORDER} ok"
    parser = ToolCallParser(NAMES)
    shown, calls = [], []
    for i in range(0, len(text), size):
        piece, done = parser.feed(text[i : i + size])
        shown.append(piece)
        calls.extend(done)
    shown.append(parser.flush())
    assert "".join(shown) == "Checking.ok"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("lookup_order", {"order_id": "AB1234"}),
    ]


def test_text_before_a_call_streams_before_the_call_closes() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Sure, checking") == ("Sure, checking", [])
    assert parser.feed(' <tool_call>\n{"name": "get_') == ("", [])  # held: inside a block
    piece, calls = parser.feed('weather", "arguments": {}}\n</tool_call>')
    assert piece == "" and [c.name for c in calls] == ["get_weather"] and calls[0].arguments == "{}"
