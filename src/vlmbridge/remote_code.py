"""Decide whether a folder's remote code (`auto_map`) may run.

transformers executes every `.py` a folder's `auto_map` points to (and whatever those import from the same
folder) when `trust_remote_code=True`. We allow that only for folders on an allowlist whose every `.py` file
matches a sha256 pin recorded there, and never for `auto_map` entries that point into another repository.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmbridge.errors import RemoteCodeRefusedError
from vlmbridge.folder import ModelFolder

__all__ = [
    "RemoteCodeReport",
    "auto_map_references",
    "check_remote_code",
    "inspect_remote_code",
    "pin_setting",
    "sha256_file",
]

_MAX_PY_FILES = 200  # a model folder with more Python files than this is not a model folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def auto_map_references(auto_map: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (auto class, reference) for every entry; tokenizer entries may be [slow, fast] lists."""
    for auto_cls, value in auto_map.items():
        refs = value if isinstance(value, list | tuple) else [value]
        for ref in refs:
            if isinstance(ref, str) and ref:
                yield str(auto_cls), ref


@dataclass(frozen=True)
class RemoteCodeReport:
    """What a folder's remote code consists of and how it compares to the pins on the allowlist."""

    folder: Path
    needs_remote_code: bool
    files: Mapping[str, str]  # file name → sha256, every .py in the folder
    cross_repo: tuple[str, ...]  # auto_map references of the form repo--module.Class
    missing_modules: tuple[str, ...]  # modules auto_map names that are not in the folder
    pins: Mapping[str, str] | None  # the allowlist entry for this folder, if any

    @property
    def mismatched(self) -> dict[str, tuple[str | None, str | None]]:
        """file → (pinned hash, actual hash) for every difference between pins and the folder."""
        if self.pins is None:
            return {}
        names = set(self.files) | set(self.pins)
        return {
            n: (self.pins.get(n), self.files.get(n)) for n in sorted(names) if self.pins.get(n) != self.files.get(n)
        }

    @property
    def allowed(self) -> bool:
        return (
            self.needs_remote_code
            and self.pins is not None
            and not self.cross_repo
            and not self.missing_modules
            and not self.mismatched
        )


def inspect_remote_code(folder: ModelFolder, allowlist: Mapping[str, Mapping[str, str]]) -> RemoteCodeReport:
    auto_map = folder.auto_map
    cross_repo: list[str] = []
    modules: set[str] = set()
    for _, ref in auto_map_references(auto_map):
        if "--" in ref:
            cross_repo.append(ref)
            continue
        module, _, _cls = ref.rpartition(".")
        if module:
            modules.add(module)
    py_files = folder.python_files[:_MAX_PY_FILES]
    files = {f.name: sha256_file(f) for f in py_files}
    missing = tuple(sorted(m for m in modules if f"{m}.py" not in files))
    return RemoteCodeReport(
        folder=folder.path,
        needs_remote_code=bool(auto_map),
        files=files,
        cross_repo=tuple(cross_repo),
        missing_modules=missing,
        pins=_pins_for(folder.path, allowlist),
    )


def _pins_for(path: Path, allowlist: Mapping[str, Mapping[str, str]]) -> Mapping[str, str] | None:
    for key, pins in allowlist.items():
        try:
            if Path(key).expanduser().resolve() == path:
                return pins
        except OSError:
            continue
    return None


def pin_setting(report: RemoteCodeReport) -> str:
    """The exact setting that would allowlist the folder as it is now (after the user reviewed the code)."""
    spec = ",".join(f"{name}:{sha}" for name, sha in sorted(report.files.items()))
    env = json.dumps({str(report.folder): dict(sorted(report.files.items()))})
    return f"--trust-remote-code '{report.folder}={spec}'  (or VLMBRIDGE_TRUST_REMOTE_CODE='{env}')"


def check_remote_code(folder: ModelFolder, allowlist: Mapping[str, Mapping[str, str]]) -> bool:
    """True when the folder needs remote code and may run it; False when it needs none. Raises otherwise."""
    report = inspect_remote_code(folder, allowlist)
    if not report.needs_remote_code:
        return False
    if report.cross_repo:
        raise RemoteCodeRefusedError(
            f"{folder.path}: auto_map points to code in another repository ({', '.join(report.cross_repo)}); "
            "code outside the pinned folder is never run",
            fix="copy the referenced modules into the folder, change auto_map to local references, and pin them",
        )
    if report.missing_modules:
        names = ", ".join(f"{m}.py" for m in report.missing_modules)
        raise RemoteCodeRefusedError(
            f"{folder.path}: auto_map names {names}, which the folder does not contain",
            fix="download the missing .py files from the model's repository",
        )
    listing = ", ".join(f"{n} sha256={h[:12]}…" for n, h in sorted(report.files.items()))
    if report.pins is None:
        raise RemoteCodeRefusedError(
            f"{folder.path} needs remote code ({listing}); it is not on the remote-code allowlist",
            fix=f"review those files, then add {pin_setting(report)}",
        )
    if report.mismatched:
        diffs = "; ".join(
            f"{n}: pinned {(p or 'nothing')[:12]}, found {(a or 'no file')[:12]}"
            for n, (p, a) in report.mismatched.items()
        )
        raise RemoteCodeRefusedError(
            f"{folder.path}: remote code does not match its pins ({diffs})",
            fix=f"if the change is reviewed and intended, update the pins: {pin_setting(report)}",
        )
    return True
