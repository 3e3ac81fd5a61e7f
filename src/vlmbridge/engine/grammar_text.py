"""The grammar a `StructuredSpec` stands for, as llguidance's Lark text: one text for every backend.

The transformers backend compiles it with llguidance itself; the vLLM backend hands it to vLLM's `guidance`
(llguidance) structured-output backend. Both engines therefore constrain an answer identically: the same closed
objects, the same JSON separators, the same `<tool_call>` blocks. No library is imported here; the caller says
which tags are single tokens in its vocabulary.

Objects allow only their listed properties unless the schema says otherwise (as vLLM's backends do): an answer is
bounded when its schema is. JSON comes compact, with the ", " and ": " separators Qwen's tool-call format uses.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from vlmbridge.engine.types import StructuredSpec

__all__ = ["JSON_STYLE", "MAX_PARALLEL_CALLS", "TOOL_CALL_TAGS", "closed", "grammar_text", "single_token_id"]

# `parallel_tool_calls`: at most this many calls in one answer (bounds the answer).
MAX_PARALLEL_CALLS = 4
# llguidance's JSON options (its "x-guidance" schema key): no free whitespace, Qwen's separators.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_CALL_TAGS = ("<tool_call>", "</tool_call>")


def grammar_text(spec: StructuredSpec, token_id: Callable[[str], int | None]) -> str:
    """Lark text (llguidance's dialect) for `spec`. `token_id(text)`: the tag's id when the vocabulary has it as
    one token (Qwen's <tool_call> is an added token, which llguidance matches only as that token), else None."""
    if spec.kind == "json_object":
        return f"start: %json {_styled({'type': 'object'})}\n"
    schema = closed(json.loads(spec.schema))
    if spec.kind == "json_schema":
        return f"start: %json {_styled(schema)}\n"
    # Qwen's format: `<tool_call>\n{call}\n</tool_call>`, blocks one line apart.
    opening, closing = (_tag(t, token_id) for t in TOOL_CALL_TAGS)
    more = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if spec.parallel else ""
    return f'start: call {more}\ncall: {opening} "\\n" body "\\n" {closing}\nbody: %json {_styled(schema)}\n'


def single_token_id(tokenizer: Any, text: str, vocab_size: int | None = None) -> int | None:
    """`text`'s id when `tokenizer` has it as one token (below `vocab_size`, where the logits end), else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    if not isinstance(tid, int) or tid == getattr(tokenizer, "unk_token_id", None):
        return None
    return tid if vocab_size is None or tid < vocab_size else None


def _styled(schema: Any) -> str:
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": JSON_STYLE}
    return json.dumps(schema)


def _tag(text: str, token_id: Callable[[str], int | None]) -> str:
    tid = token_id(text)
    return f"<[{tid}]>" if tid is not None else json.dumps(text)


def closed(schema: Any) -> Any:
    """`schema` with additionalProperties: false wherever properties are listed and nothing else is said."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            for sub in (node.get(key) or {}).values():
                walk(sub)
        for key in ("items", "additionalProperties"):
            for sub in node[key] if isinstance(node.get(key), list) else [node.get(key)]:
                walk(sub)
        for key in ("anyOf", "prefixItems"):
            for sub in node.get(key) or []:
                walk(sub)
        if "properties" in node and "additionalProperties" not in node and "patternProperties" not in node:
            node["additionalProperties"] = False

    walk(schema)
    return schema
