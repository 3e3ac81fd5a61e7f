"""Incremental decoding, stop strings and the thinking split, unit by unit."""

from __future__ import annotations

import pytest

from tests.conftest import TinyFactory
from vlmbridge.output.textstream import IncrementalDecoder, ReasoningSplitter, StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    return "".join(matcher.feed(p) for p in pieces) + matcher.flush()


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hello", " wor", "ld"], (), "Hello world"),
        (["Hello", " wor", "ld"], ("world",), "Hello "),
        (["Hel", "lo<", "|end", "|>more"], ("<|end|>",), "Hello"),
        (["ab", "c"], ("bcd",), "abc"),  # a partial match that never completes is released at the end
        (["x", "STOP", "y"], ("STOP", "x"), ""),
        (["one two", " three"], ("two", "three"), "one "),
    ],
)
def test_stop_strings(pieces: list[str], stops: tuple[str, ...], expected: str) -> None:
    assert feed_all(StopMatcher(stops), pieces) == expected


def test_stop_holds_back_only_possible_prefixes() -> None:
    m = StopMatcher(("</answer>",))
    assert m.feed("The result is 4</") == "The result is 4"
    assert m.feed("b>") == "</b>"
    assert not m.stopped


@pytest.mark.parametrize(
    ("opened", "pieces", "text", "reasoning"),
    [
        (True, ["Let me", " look.</th", "ink>\n\nA cat."], "A cat.", "Let me look."),
        (False, ["<think>", "hmm</think>", "Yes"], "Yes", "hmm"),
        (False, ["  <thi", "nk>\nx\n</think>\n\nDone"], "Done", "x\n"),
        (False, ["No thinking here"], "No thinking here", ""),
        (True, ["never closed"], "", "never closed"),
        (False, ["<b>bold</b>"], "<b>bold</b>", ""),
    ],
)
def test_reasoning_split(opened: bool, pieces: list[str], text: str, reasoning: str) -> None:
    splitter = ReasoningSplitter(opened)
    deltas = [splitter.feed(p) for p in pieces] + [splitter.flush()]
    assert "".join(d.text for d in deltas) == text
    assert "".join(d.reasoning for d in deltas) == reasoning


def test_incremental_decoder_waits_for_whole_characters(tiny_model: TinyFactory) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    text = "商品图片 🐱 ok"
    ids = tok(text).input_ids
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


class _PythonOnlyTokenizer:
    """A tokenizer without a Rust backend (a slow tokenizer, remote code): only `decode`, delegated."""

    def __init__(self, tokenizer: object) -> None:
        self.decode = tokenizer.decode  # type: ignore[attr-defined]


def test_the_rust_decode_stream_and_the_python_path_show_the_same_text(tiny_model: TinyFactory) -> None:
    import random

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen3_vl"))
    assert isinstance(tok.backend_tokenizer, Tokenizer)  # so the first decoder below takes the Rust path
    # Random ids split characters across tokens (byte-level pieces) and include special tokens, which are skipped.
    rng = random.Random(7)
    ids = [rng.randrange(len(tok)) for _ in range(2000)] + tok("商品 🐱").input_ids
    shown: dict[str, tuple[list[str], str]] = {}
    for name, decoder in (("rust", IncrementalDecoder(tok)), ("python", IncrementalDecoder(_PythonOnlyTokenizer(tok)))):
        pieces = [decoder.add(i) for i in ids]
        shown[name] = (pieces, decoder.flush())
    assert shown["rust"] == shown["python"]
    assert "".join(shown["rust"][0]).endswith("商品 🐱")
