"""`response_format` and `tool_choice` → the backend-neutral `StructuredSpec` (a JSON schema as text).

Schemas are checked here, cheaply and before any backend compiles them: bounded in size and depth, and made
only of keywords a grammar can enforce (llguidance, xgrammar and vLLM treat the others loosely or not at all:
an answer that "follows the schema" must validate against it). A keyword outside that set is a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vlmbridge.engine.types import StructuredSpec
from vlmbridge.errors import InvalidRequestError

__all__ = [
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "check_schema",
    "response_format_spec",
    "schema_of",
    "tool_call_spec",
]

MAX_SCHEMA_BYTES = 32 << 10  # one schema as compact JSON (a tool-call spec: all its tools' parameters together)
MAX_SCHEMA_DEPTH = 12  # nested subschemas

# Keywords a grammar enforces exactly; annotations change nothing.
_ENFORCED = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
        "enum", "const", "anyOf", "$ref", "$defs", "definitions", "pattern", "minLength", "maxLength",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format", "patternProperties",
    }
)  # fmt: skip
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
     "writeOnly", "nullable"}
)  # fmt: skip
# What to use instead, where there is something.
_HINTS = {
    "oneOf": "use anyOf (a grammar cannot check that exactly one alternative matches)",
    "allOf": "merge the subschemas into one",
    "uniqueItems": "drop it, or use an enum per position",
    "multipleOf": "drop it, or use an enum",
    "minProperties": "list the properties and make them required",
    "maxProperties": "list the properties with additionalProperties: false",
}
_FORMATS = frozenset({"date", "time", "date-time", "duration", "uuid", "email", "ipv4", "ipv6", "hostname", "uri"})
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def check_schema(schema: Any, param: str) -> None:
    """A 400 naming the first keyword (and where) that no grammar can enforce, or a schema over the bounds."""
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError("a JSON schema must be an object", param=param, code="invalid_schema")
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(
            f"the schema is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES} are accepted",
            param=param,
            code="schema_too_large",
        )
    _walk(schema, param, "#", 0)


def _walk(node: Any, param: str, where: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise InvalidRequestError(f"{where} must be a schema object", param=param, code="invalid_schema")
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels (at {where})", param=param, code="schema_too_deep"
        )
    for key, value in node.items():
        if key in _ANNOTATIONS:
            continue
        if key not in _ENFORCED:
            hint = _HINTS.get(key, "it cannot be enforced while generating")
            raise InvalidRequestError(
                f"the schema keyword {key!r} (at {where}) is not supported: {hint}",
                param=param,
                code="unsupported_schema_keyword",
            )
        _check_value(key, value, param, f"{where}/{key}", depth)


def _check_value(key: str, value: Any, param: str, where: str, depth: int) -> None:
    if key in ("properties", "$defs", "definitions", "patternProperties"):
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{where} must be an object", param=param, code="invalid_schema")
        for name, sub in value.items():
            _walk(sub, param, f"{where}/{name}", depth + 1)
    elif key in ("items", "additionalProperties"):
        if isinstance(value, list):  # draft-4 tuple form
            for i, sub in enumerate(value):
                _walk(sub, param, f"{where}/{i}", depth + 1)
        else:
            _walk(value, param, where, depth + 1)
    elif key in ("anyOf", "prefixItems"):
        if not isinstance(value, list) or not value:
            raise InvalidRequestError(f"{where} must be a non-empty array", param=param, code="invalid_schema")
        for i, sub in enumerate(value):
            _walk(sub, param, f"{where}/{i}", depth + 1)
    elif key == "format" and value not in _FORMATS:
        raise InvalidRequestError(
            f"the schema format {value!r} (at {where}) is not supported; use one of {', '.join(sorted(_FORMATS))} "
            "or a pattern",
            param=param,
            code="unsupported_schema_keyword",
        )
    elif key == "type":
        types = value if isinstance(value, list) else [value]
        if not types or any(t not in _TYPES for t in types):
            raise InvalidRequestError(f"{where} names an unknown type", param=param, code="invalid_schema")
    elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
        raise InvalidRequestError(
            f"{where}: only local references (#/...) are supported", param=param, code="unsupported_schema_keyword"
        )


def _compact(schema: Any) -> str:
    # Key order is kept: the grammar writes properties in the order the schema lists them.
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def schema_of(json_schema: Mapping[str, Any]) -> Any:
    """The schema in OpenAI's `json_schema` field: `{"name", "schema", "strict"}`, or a bare schema pasted
    without that wrapper (as users do in Dify's stock provider)."""
    inner = json_schema.get("schema")
    if isinstance(inner, dict | bool):
        return inner
    if "schema" not in json_schema and not set(json_schema) <= {"name", "strict", "description"}:
        return dict(json_schema)
    raise InvalidRequestError(
        "response_format.json_schema needs a 'schema' object", param="response_format.json_schema"
    )


def response_format_spec(kind: str, json_schema: Mapping[str, Any] | None) -> StructuredSpec | None:
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec(kind="json_object")
    if json_schema is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs a json_schema field", param="response_format.json_schema"
        )
    schema = schema_of(json_schema)
    check_schema(schema, "response_format.json_schema.schema")
    return StructuredSpec(kind="json_schema", schema=_compact(schema))


def tool_call_spec(tools: Sequence[Mapping[str, Any]], choice: str | None, parallel: bool) -> StructuredSpec | None:
    """The grammar for tool_choice `required` (any of the tools) or a function name (that one); None for auto/none.

    `tools` are OpenAI function tools ({"type": "function", "function": {"name", "parameters"}}).
    """
    if choice in (None, "auto", "none"):
        return None
    chosen = [t for t in tools if choice == "required" or t["function"]["name"] == choice]
    if not chosen:
        raise InvalidRequestError(
            f"tool_choice names the function {choice!r}, which is not among the tools", param="tool_choice"
        )
    calls = []
    for i, tool in enumerate(tools):
        if tool not in chosen:
            continue
        params = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        check_schema(params, f"tools[{i}].function.parameters")
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool["function"]["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    spec = StructuredSpec(kind="tool_calls", schema=_compact(schema), parallel=parallel and choice == "required")
    if len(spec.schema) > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(
            f"the tools' parameter schemas take {len(spec.schema)} bytes together; at most {MAX_SCHEMA_BYTES} "
            "are accepted with tool_choice required",
            param="tools",
            code="schema_too_large",
        )
    return spec
