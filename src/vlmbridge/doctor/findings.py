"""Doctor findings are data: a stable code, a severity, one line of message, the exact fix and the evidence.

Checks only build `Finding`s; the rich and JSON renderers are the only places that turn them into text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["Area", "Evidence", "Finding", "Report", "Severity"]


class Severity(StrEnum):
    ERROR = "error"  # loading (or chatting) will fail or silently produce a broken model
    WARNING = "warning"  # it loads, but something is wrong or will bite later
    INFO = "info"  # facts worth knowing (memory figures, which Auto class, remote code not needed)


class Area(StrEnum):
    FILES = "files"
    TOKENIZER = "tokenizer"
    PROCESSOR = "processor"
    ARCHITECTURE = "architecture"
    REMOTE_CODE = "remote-code"
    DEPENDENCIES = "dependencies"
    MEMORY = "memory"
    ENVIRONMENT = "environment"
    DOCTOR = "doctor"


@dataclass(frozen=True)
class Evidence:
    """Where the doctor saw it: a file of the folder (relative name) and the value it read there."""

    file: str | None = None
    value: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"file": self.file, "value": self.value}


@dataclass(frozen=True)
class Finding:
    code: str  # stable, e.g. "VB105"; listed in doctor/codes.py and docs/doctor.md
    severity: Severity
    message: str  # one line
    fix: str | None = None  # a command or a config line, never "check your setup"
    evidence: Evidence | None = None

    @property
    def area(self) -> Area:
        from vlmbridge.doctor.codes import area_of

        return area_of(self.code)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": str(self.severity),
            "area": str(self.area),
            "message": self.message,
            "fix": self.fix,
            "evidence": self.evidence.to_dict() if self.evidence else None,
        }


@dataclass(frozen=True)
class Report:
    """Everything one doctor run found, plus the facts it established (model kind, memory figures)."""

    path: Path
    findings: Sequence[Finding]
    facts: Mapping[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def by_severity(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self.by_severity(Severity.ERROR)

    @property
    def warnings(self) -> list[Finding]:
        return self.by_severity(Severity.WARNING)

    @property
    def has_errors(self) -> bool:
        return bool(self.errors)

    @property
    def loadable(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        """0 = loadable (warnings allowed), 1 = errors. (2, usage errors, never reaches a Report.)"""
        return 0 if self.loadable else 1

    @property
    def verdict(self) -> str:
        if self.errors:
            return "errors"
        return "warnings" if self.warnings else "ok"

    def codes(self, severity: Severity | None = None) -> list[str]:
        return [f.code for f in self.findings if severity is None or f.severity == severity]
