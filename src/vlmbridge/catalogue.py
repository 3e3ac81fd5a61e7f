"""Catalogue of known failure messages: pattern → cause, fix and the doctor check that sees it beforehand.

Used by `vlmbridge explain` and by the loader and server to log load failures with their classified cause.
Rows come from shared/reference/errors.md (the field report's table and public issue trackers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CATALOGUE", "Entry", "classify", "classify_all"]


@dataclass(frozen=True)
class Entry:
    code: str  # stable slug, e.g. "vlm-loaded-as-causal-lm"
    patterns: tuple[str, ...]  # regexes, searched case-insensitively
    cause: str
    fix: str
    doctor_check: str | None = None  # doctor finding code that detects it before loading
    source: str = ""

    def matches(self, text: str) -> bool:
        return any(re.search(p, text, re.IGNORECASE | re.MULTILINE) for p in self.patterns)


CATALOGUE: tuple[Entry, ...] = (
    Entry(
        code="vlm-loaded-as-causal-lm",
        patterns=(r"Unrecognized configuration class .*for this kind of AutoModel: AutoModelForCausalLM",),
        cause="a vision-language model was loaded with the text-only AutoModelForCausalLM class",
        fix="load it with AutoModelForImageTextToText (vlmbridge's loader does this) and its AutoProcessor",
        source="ms-swift#3001, QwenLM/Qwen3-VL#157",
    ),
    Entry(
        code="transformers-too-old",
        patterns=(
            r"KeyError: '(qwen2_vl|qwen2_5_vl|qwen3_vl|qwen3_vl_moe)'",
            r"does not recognize this architecture",
            r"model type `?\w+`? but Transformers does not recognize",
        ),
        cause="the installed transformers predates this architecture",
        fix='pip install -U "transformers>=4.57.0" (Qwen3-VL; Qwen2.5-VL needs 4.49, Qwen2-VL 4.45)',
        source="transformers#34161, LlamaFactory#6784",
    ),
    Entry(
        code="safetensors-truncated",
        patterns=(r"MetadataIncompleteBuffer", r"incomplete metadata, file not fully covered"),
        cause="a safetensors shard is truncated (interrupted or partial download)",
        fix="re-download that shard and compare its size with the header (vlmbridge doctor names it)",
        source="common",
    ),
)


def classify_all(text: str) -> list[Entry]:
    return [e for e in CATALOGUE if e.matches(text)]


def classify(text: str) -> Entry | None:
    hits = classify_all(text)
    return hits[0] if hits else None
