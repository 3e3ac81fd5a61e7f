"""`<tool_call>` blocks in an answer → OpenAI tool calls (Qwen's "hermes" format, as vLLM parses it).

Qwen2.5/Qwen3(-VL) templates ask for `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`, one block per
call. The parser runs on the answer text as it streams: text outside blocks passes through (whitespace next to a
call is dropped), a block is held until it closes and then becomes one `ToolCall` with a fresh id and its
arguments as a JSON string. A block that is not a JSON object naming one of the request's tools with object
arguments, or that never closes, is given back as text: a malformed call is never an error.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from typing import Any

from vlmbridge.engine.types import ToolCall

__all__ = ["ToolCallParser", "parse_tool_calls"]

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


class ToolCallParser:
    """Feed answer text; get back (text to show, calls completed). `flush` at the end."""

    def __init__(self, tool_names: Collection[str]) -> None:
        self._names = frozenset(tool_names)
        self._pending = ""
        self._in_call = False
        self._after_call = False  # whitespace right after a call is not content
        self._gap = ""  # whitespace before the open block: dropped if it is a call, given back if not
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        shown: list[str] = []
        calls: list[ToolCall] = []
        while self._pending:
            if self._in_call:
                end = self._pending.find(CLOSE)
                if end < 0:
                    break  # held until the block closes (or the answer ends)
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE) :]
                self._in_call = False
                call = self._parse(body)
                if call is None:
                    shown.append(self._text(self._gap + OPEN + body + CLOSE))
                else:
                    calls.append(call)
                    self._after_call = True
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                before, self._pending = self._pending[:start], self._pending[start + len(OPEN) :]
                text = before.rstrip()
                self._gap = before[len(text) :]
                if text:
                    shown.append(self._text(text))
                self._in_call = True
                continue
            # Hold what may still become the start of a block, and the whitespace that may precede one.
            cut = len(self._pending) - _partial_suffix(self._pending, OPEN)
            cut = len(self._pending[:cut].rstrip())
            ready, self._pending = self._pending[:cut], self._pending[cut:]
            if ready:
                shown.append(self._text(ready))
            break
        return "".join(shown), calls

    def flush(self) -> str:
        """What is left: an unclosed block or held text, as text."""
        rest, self._pending = self._pending, ""
        if self._in_call:
            self._in_call = False
            return self._text(self._gap + OPEN + rest)
        return self._text(rest) if rest.strip() or not self.calls else ""

    def _text(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return text

    def _parse(self, body: str) -> ToolCall | None:
        try:
            data: Any = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or data["name"] not in self._names:
            return None
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        self.calls += 1
        return ToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            name=data["name"],
            arguments=json.dumps(arguments, ensure_ascii=False),
        )


def parse_tool_calls(text: str, tool_names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """The whole answer at once: (content, calls)."""
    parser = ToolCallParser(tool_names)
    shown, calls = parser.feed(text)
    return shown + parser.flush(), calls


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
