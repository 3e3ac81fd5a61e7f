"""Bounded JSON schemas for the structured-output tests, and how many tokens their longest valid answer takes.

Every string has maxLength, a pattern or an enum, every array maxItems, every number bounds: so every schema has a
longest valid answer, and a request with at least that many tokens must finish with a complete, valid object. Except
in one place: a number's range bounds its integer part, not its fraction (JSON schema cannot, and no grammar library
does), so a model that loops on a digit can run out of tokens inside a fraction (tests/test_structured_serving.py
allows that, rarely, and checks it happened there).
"""

from __future__ import annotations

import json
import random
from typing import Any

__all__ = ["bounded_schemas", "token_budget"]

# Patterns with the longest string they match (written unescaped, one byte a character here).
_PATTERNS = {"^[A-Z]{2}[0-9]{4}$": 6, "^(yes|no|maybe)$": 5, "^[a-z]{1,6}-[0-9]{1,3}$": 10}

_FIELDS: list[dict[str, Any]] = [
    {"type": "string", "maxLength": 3},
    {"type": "string", "maxLength": 12},
    {"type": "string", "minLength": 2, "maxLength": 6},
    {"type": "string", "enum": ["apparel", "electronics", "home", "toys", "other"]},
    {"enum": ["approve", "reject", "review"]},
    {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
    {"type": "string", "pattern": "^(yes|no|maybe)$"},
    {"type": "string", "pattern": "^[a-z]{1,6}-[0-9]{1,3}$"},
    {"type": "integer", "minimum": 0, "maximum": 100},
    {"type": "integer", "minimum": -40, "maximum": 2000},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "number", "minimum": -90, "maximum": 90},
    {"type": "boolean"},
    {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 4},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
    {"type": ["string", "null"], "maxLength": 4},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]},
    {"const": "v1"},
    {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 50}, "ok": {"type": "boolean"}},
        "required": ["x"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "label": {"type": "string", "maxLength": 8},
            "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 2},
        },
        "required": ["label", "scores"],
    },
]
_NAMES = ["title", "tags", "category", "verdict", "confidence", "reason", "order_id", "grade", "flag", "meta"]


def bounded_schemas(count: int = 50, seed: int = 17) -> list[dict[str, Any]]:
    """`count` different schemas: objects of 1-4 fields with some optional, a few with $defs, a few not objects."""
    rng = random.Random(seed)
    out: dict[str, dict[str, Any]] = {}
    tops: list[dict[str, Any]] = [
        {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        {"enum": ["red", "green", "blue"]},
        {"type": "integer", "minimum": 1, "maximum": 5},
    ]
    for schema in tops:
        out[json.dumps(schema, sort_keys=True)] = schema
    while len(out) < count:
        names = rng.sample(_NAMES, rng.randint(1, 4))
        props = {n: rng.choice(_FIELDS) for n in names}
        schema: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "required": rng.sample(names, rng.randint(0, len(names))),
        }
        if rng.random() < 0.5:
            schema["additionalProperties"] = False
        if rng.random() < 0.15:  # the first field through a reference
            first = names[0]
            schema["$defs"] = {"item": props[first]}
            schema["properties"] = {**props, first: {"$ref": "#/$defs/item"}}
        out.setdefault(json.dumps(schema, sort_keys=True), schema)
    return list(out.values())


def _bytes(schema: Any, defs: dict[str, Any]) -> int:
    """The longest compact JSON (separators ", " and ": ") that `schema` admits, in bytes (each token >= 1 byte)."""
    if "$ref" in schema:
        return _bytes(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "const" in schema:
        return len(json.dumps(schema["const"]).encode())
    if "enum" in schema:
        return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in schema["enum"])
    if "anyOf" in schema:
        return max(_bytes(s, defs) for s in schema["anyOf"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return max(_bytes({**schema, "type": k}, defs) for k in kind)
    if kind == "object":
        props = schema.get("properties", {})
        items = [len(json.dumps(k).encode()) + 2 + _bytes(v, defs) for k, v in props.items()]
        return 2 + sum(items) + 2 * max(len(items) - 1, 0)
    if kind == "array":
        n = schema["maxItems"]
        return 2 + n * _bytes(schema["items"], defs) + 2 * max(n - 1, 0)
    if kind == "string":
        chars = _PATTERNS[schema["pattern"]] if "pattern" in schema else schema["maxLength"]
        return 2 + 6 * chars  # a character may be written as a \\uXXXX escape
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "number":
        return 24  # bounded numbers: sign, digits of the bound, a short fraction (a fraction has no bound)
    return {"boolean": 5, "null": 4}[kind]


def token_budget(schema: dict[str, Any]) -> int:
    """max_tokens that covers the schema's longest valid answer, plus the end-of-sequence token."""
    return _bytes(schema, schema.get("$defs", {})) + 1
