"""A real byte-level BPE tokenizer built offline, with the Qwen special tokens, wrapped as Qwen2Tokenizer.

It mirrors the Qwen tokenizer's pipeline (NFC normalizer, Qwen's pre-tokenizer regex, byte-level BPE); only
the vocabulary is tiny, trained on a built-in corpus, so nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = ["QWEN_SPECIAL_TOKENS", "TinyTokenizer", "build_tokenizer"]

# Order as in the official Qwen vocab (ids 151643…151656 there), so relative ids line up.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Ordinary (non-special) added tokens the Qwen tokenizers carry for tools and thinking.
QWEN_EXTRA_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")


@dataclass
class TinyTokenizer:
    tokenizer: Any  # transformers Qwen2Tokenizer
    vocab: dict[str, int]
    merges: list[tuple[str, str]]

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    def write_vocab_files(self, out: Path) -> None:
        """vocab.json + merges.txt, the slow-tokenizer files the official repos ship beside tokenizer.json."""
        base = {t: i for t, i in self.vocab.items() if t not in QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS}
        (out / "vocab.json").write_text(json.dumps(base, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer(vocab_size: int = 1024) -> TinyTokenizer:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    corpus = files("vlmbridge.tiny").joinpath("corpus.txt").read_text(encoding="utf-8").splitlines()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges: list[tuple[str, str]] = [
        (m[0], m[1]) if isinstance(m, list) else (m.split(" ", 1)[0], m.split(" ", 1)[1]) for m in model["merges"]
    ]
    for token in QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS:
        vocab[token] = len(vocab)

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # pairs are accepted as well as "a b" strings
        unk_token=None,  # type: ignore[arg-type]  # byte-level BPE has no unknown token
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        split_special_tokens=False,
    )
    # Already in the vocab, so ids stay put; registering them keeps them unsplit (and special ones skippable).
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_EXTRA_TOKENS])
    return TinyTokenizer(tokenizer=tok, vocab=vocab, merges=merges)
