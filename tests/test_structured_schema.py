"""response_format and tool_choice → StructuredSpec: bounds and unsupported keywords are 400s that name them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vlmbridge.errors import InvalidRequestError
from vlmbridge.server.schemas import ChatCompletionRequest
from vlmbridge.server.structured import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    check_schema,
    response_format_spec,
    tool_call_spec,
)

OBJ = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]}
TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": OBJ}},
    {"type": "function", "function": {"name": "g"}},
]


def test_wrapped_and_bare_schemas_give_the_same_spec() -> None:
    wrapped = response_format_spec("json_schema", {"name": "x", "schema": OBJ, "strict": True})
    bare = response_format_spec("json_schema", OBJ)  # as pasted into Dify's stock provider
    assert wrapped == bare and wrapped is not None
    assert wrapped.kind == "json_schema" and json.loads(wrapped.schema) == OBJ
    assert list(json.loads(wrapped.schema)["properties"]) == ["a"]  # key order kept: the grammar follows it


def test_json_object_and_text() -> None:
    spec = response_format_spec("json_object", None)
    assert spec is not None and spec.kind == "json_object"
    assert response_format_spec("text", None) is None


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"oneOf": [{"type": "string"}]}, "oneOf"),
        ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}]}}}, "allOf"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "integer", "multipleOf": 3}, "multipleOf"),
        ({"type": "object", "minProperties": 2}, "minProperties"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "integer", "if": {"minimum": 3}}, "if"),
        ({"type": "array", "contains": {"const": 1}}, "contains"),
        ({"type": "string", "format": "credit-card"}, "credit-card"),
        ({"$ref": "https://example.com/schema.json"}, "#/$ref"),
    ],
)
def test_unsupported_keywords_are_named(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        response_format_spec("json_schema", {"schema": schema})
    assert keyword in info.value.message
    assert info.value.param == "response_format.json_schema.schema"


def test_size_and_depth_are_capped_before_compiling() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 3} for i in range(2000)}}
    with pytest.raises(InvalidRequestError) as info:
        check_schema(big, "x")
    assert info.value.code == "schema_too_large" and str(MAX_SCHEMA_BYTES) in info.value.message
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(MAX_SCHEMA_DEPTH + 2):
        deep = {"type": "object", "properties": {"n": deep}}
    with pytest.raises(InvalidRequestError) as info:
        check_schema(deep, "x")
    assert info.value.code == "schema_too_deep"


def test_annotations_and_refs_are_fine() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "T",
        "$defs": {"p": {"type": "integer", "minimum": 0, "maximum": 9, "description": "d"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"type": ["string", "null"], "maxLength": 3}},
    }
    check_schema(schema, "x")


def test_tool_specs() -> None:
    assert tool_call_spec(TOOLS, "auto", True) is None and tool_call_spec(TOOLS, "none", True) is None
    required = tool_call_spec(TOOLS, "required", True)
    assert required is not None and required.kind == "tool_calls" and required.parallel
    alternatives = json.loads(required.schema)["anyOf"]
    assert [a["properties"]["name"]["const"] for a in alternatives] == ["f", "g"]
    assert alternatives[1]["properties"]["arguments"] == {"type": "object", "properties": {}}
    named = tool_call_spec(TOOLS, "f", True)
    assert named is not None and not named.parallel  # a named function: exactly one call
    assert json.loads(named.schema)["properties"]["arguments"] == OBJ
    single = tool_call_spec(TOOLS, "required", False)
    assert single is not None and not single.parallel
    with pytest.raises(InvalidRequestError) as info:
        tool_call_spec(TOOLS, "h", True)
    assert info.value.param == "tool_choice"
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"oneOf": []}}}]
    with pytest.raises(InvalidRequestError) as info:
        tool_call_spec(bad, "required", True)
    assert info.value.param == "tools[0].function.parameters" and "oneOf" in info.value.message


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)  # type: ignore[arg-type]


def test_request_fields() -> None:
    req = _request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "f"}})
    assert req.forced_tool == "f"
    assert _request(tools=TOOLS, tool_choice="required").forced_tool == "required"
    assert _request(tools=TOOLS).forced_tool is None
    with pytest.raises(ValueError, match="tool_choice requires tools"):
        _request(tool_choice="required")
    with pytest.raises(ValueError, match="unique"):
        _request(tools=[TOOLS[0], TOOLS[0]])
    with pytest.raises(ValueError, match="cannot be combined"):
        _request(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})


def test_history_tool_calls_need_json_object_arguments() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}}
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    ChatCompletionRequest(model="m", messages=msgs)  # type: ignore[arg-type]
    bad = {**call, "function": {"name": "f", "arguments": "[1]"}}
    with pytest.raises(ValueError, match="JSON object"):
        ChatCompletionRequest(model="m", messages=[msgs[0], {"role": "assistant", "tool_calls": [bad]}])  # type: ignore[arg-type, list-item]
