"""Grammar-constrained decoding for the transformers backend, with xgrammar (as vLLM's default backend).

A request's `StructuredSpec` (a JSON schema as text, checked and bounded by the front) is compiled once per
engine and schema, off the engine thread and with a timeout: compiled grammars are cached by the spec's hash
(as futures, so concurrent requests with one schema compile it once, and a runaway compile is waited on with a
bound, never by the engine thread). Each constrained request gets a `Constraint`: a GrammarMatcher plus its
bitmask row, applied to that request's logits row only, so unconstrained neighbours in a batch are untouched.

Beyond the grammar, constrained rows never take special tokens (they decode to nothing, so a string's length or
pattern would no longer hold) nor tokens with control bytes other than a newline (JSON forbids them raw in
strings, and xgrammar's string rule lets some through).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from vlmbridge.engine.types import StructuredSpec
from vlmbridge.errors import EngineFailedError, InvalidRequestError

__all__ = ["MAX_PARALLEL_CALLS", "Constraint", "GrammarBook"]

# `parallel_tool_calls`: at most this many calls in one answer (bounds the answer, and the grammar's size).
MAX_PARALLEL_CALLS = 4
_CALL_OPEN, _CALL_CLOSE, _CALL_SEP = "<tool_call>\n", "\n</tool_call>", "\n"


def _param(spec: StructuredSpec) -> str:
    return "tool_choice" if spec.kind == "tool_calls" else "response_format"


class GrammarBook:
    """Compiles and caches grammars for one model's tokenizer. Thread-safe."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_ids: frozenset[int],
        *,
        compile_timeout_s: float = 10.0,
        max_entries: int = 256,
    ) -> None:
        import torch
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        stops = sorted(stop_ids) or None  # none known: the tokenizer's own eos
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.compile_timeout_s = compile_timeout_s
        self._max_entries = max_entries
        self._cache: OrderedDict[str, Future[Any]] = OrderedDict()
        self._lock = threading.Lock()
        # Two threads: one runaway compile cannot hold up every other schema.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmbridge-grammar")
        self.banned = _banned_tokens(tokenizer, self.info, vocab_size, stop_ids, torch)
        self.hits = 0
        self.misses = 0

    def compiled(self, spec: StructuredSpec) -> Any:
        """The compiled grammar for `spec` (cached by its hash); a 400 naming the field if it cannot be had."""
        key = hashlib.sha256(f"{spec.kind}\0{spec.parallel}\0{spec.schema}".encode()).hexdigest()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
                future = self._pool.submit(self._compile, spec)
                self._cache[key] = future
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
        try:
            return future.result(timeout=self.compile_timeout_s)
        except FutureTimeout:
            raise InvalidRequestError(
                f"the schema took longer than {self.compile_timeout_s:g} s to compile; simplify it (fewer "
                "alternatives, shorter patterns, smaller bounds)",
                param=_param(spec),
                code="schema_too_complex",
            ) from None
        except (RuntimeError, ValueError) as exc:  # xgrammar's errors for what it cannot build
            with self._lock:
                self._cache.pop(key, None)
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise InvalidRequestError(
                f"the schema cannot be compiled into a grammar: {first}", param=_param(spec), code="invalid_schema"
            ) from None

    def _compile(self, spec: StructuredSpec) -> Any:
        xgr = self._xgr
        if spec.kind == "json_object":
            # Any object, compact: free whitespace would let a weak model pad until it runs out of tokens.
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_schema":
            return self._compiler.compile_json_schema(spec.schema, any_whitespace=False, strict_mode=True)
        call = xgr.Grammar.concat(
            xgr.Grammar.from_ebnf(f"root ::= {_ebnf_string(_CALL_OPEN)}"),
            xgr.Grammar.from_json_schema(spec.schema, any_whitespace=False, strict_mode=True),
            xgr.Grammar.from_ebnf(f"root ::= {_ebnf_string(_CALL_CLOSE)}"),
        )
        if not spec.parallel:
            return self._compiler.compile_grammar(call)
        sep = xgr.Grammar.from_ebnf(f"root ::= {_ebnf_string(_CALL_SEP)}")
        options = [call]
        for _ in range(MAX_PARALLEL_CALLS - 1):
            options.append(xgr.Grammar.concat(options[-1], sep, call))
        return self._compiler.compile_grammar(xgr.Grammar.union(*options))

    def constraint(self, compiled: Any, dormant_until: int | None = None) -> Constraint:
        return Constraint(self, compiled, dormant_until)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Constraint:
    """One request's grammar state. `dormant_until`: a token id (`</think>`) before which nothing is constrained:
    a thinking model reasons freely and the grammar applies to its answer."""

    def __init__(self, book: GrammarBook, compiled: Any, dormant_until: int | None = None) -> None:
        xgr = book._xgr
        self._xgr = xgr
        self._book = book
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, book.vocab_size)
        self._dormant_until = dormant_until

    @property
    def active(self) -> bool:
        return self._dormant_until is None

    def apply(self, scores: Any) -> Any:
        """`scores` (1-D, float32, a copy this request owns) with every token the grammar forbids at -inf."""
        if not self.active:
            return scores
        self._matcher.fill_next_token_bitmask(self._bitmask)
        width = scores.shape[-1]
        row = scores.view(1, width)
        if width != self._book.vocab_size:  # logits wider than the vocabulary: padding rows are never allowed
            row[:, self._book.vocab_size :] = float("-inf")
            row = row[:, : self._book.vocab_size]
        self._xgr.apply_token_bitmask_inplace(row, self._bitmask)
        row.masked_fill_(self._book.banned[: row.shape[-1]], float("-inf"))
        return scores

    def accept(self, token: int) -> None:
        if not self.active:
            if token == self._dormant_until:
                self._dormant_until = None
            return
        if not self._matcher.is_terminated() and not self._matcher.accept_token(token):
            raise EngineFailedError("the grammar rejected the chosen token", code="grammar_failed")


def _ebnf_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _banned_tokens(tokenizer: Any, info: Any, vocab_size: int, stop_ids: frozenset[int], torch: Any) -> Any:
    """Tokens a constrained answer never takes: special tokens (not the stop tokens: the grammar decides when
    those may come) and tokens whose bytes hold a control character other than a newline."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        if 0 <= tid < vocab_size and tid not in stop_ids:
            banned[tid] = True
    for tid, piece in enumerate(info.decoded_vocab[:vocab_size]):
        if tid not in stop_ids and any(b < 0x20 and b != 0x0A for b in piece):
            banned[tid] = True
    return banned
