"""`diagnose(path, options) -> Report`: run every check; never raise.

A check that crashes becomes a VB900 warning naming the check, so one bug (or one unforeseen folder) can never
hide the other findings or turn the doctor itself into the traceback the user came to get rid of.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from vlmbridge.doctor.checks.architecture import check_architecture, check_rope, check_token_ids, check_vision_weights
from vlmbridge.doctor.checks.dependencies import check_dependencies
from vlmbridge.doctor.checks.environment import check_environment, detect_container, preflight
from vlmbridge.doctor.checks.memory import check_memory
from vlmbridge.doctor.checks.processing import check_chat_template, check_processors, check_tokenizer_files
from vlmbridge.doctor.checks.remote import check_remote_code
from vlmbridge.doctor.checks.tensors import check_tensors
from vlmbridge.doctor.checks.weights import check_config, check_pickle, check_shards, check_weight_files
from vlmbridge.doctor.context import Context, DoctorOptions
from vlmbridge.doctor.findings import Evidence, Finding, Report, Severity

if TYPE_CHECKING:
    from vlmbridge.settings import Settings

__all__ = ["CHECKS", "diagnose"]

Check = Callable[[Context], Iterable[Finding]]

# Order = the order findings are reported in within an area.
CHECKS: tuple[Check, ...] = (
    check_environment,
    check_config,
    check_weight_files,
    check_shards,
    check_pickle,
    check_tensors,
    check_tokenizer_files,
    check_chat_template,
    check_processors,
    check_architecture,
    check_token_ids,
    check_vision_weights,
    check_rope,
    check_remote_code,
    check_dependencies,
    check_memory,
)


def diagnose(path: str | Path, options: DoctorOptions | None = None, *, settings: Settings | None = None) -> Report:
    """Diagnose a model folder from its small files and safetensors headers. Never raises (except BaseException).

    `settings` (when no `options`) gives the options `vlmbridge serve` would load with."""
    started = time.perf_counter()
    if options is None:
        options = DoctorOptions.from_settings(settings) if settings is not None else DoctorOptions()
    raw = str(path)
    findings: list[Finding] = []
    try:
        target = Path(raw).expanduser() if raw else Path("")
        if not raw or "\x00" in raw:
            raise ValueError("empty path" if not raw else "path contains a NUL byte")
        in_container = options.in_container if options.in_container is not None else detect_container()
        stop = preflight(raw, target, in_container)
    except Exception as exc:
        findings.append(
            Finding(
                "VB601",
                Severity.ERROR,
                f"cannot use {raw!r} as a path: {exc}",
                fix="pass the model folder's path",
                evidence=Evidence(value=raw[:200]),
            )
        )
        return Report(path=Path(raw or "."), findings=findings, elapsed_s=time.perf_counter() - started)
    if stop:
        return Report(path=target, findings=stop, elapsed_s=time.perf_counter() - started)

    ctx = Context(_absolute(target), options)
    for check in CHECKS:
        try:
            findings.extend(check(ctx))
        except Exception as exc:  # a bug or an unforeseen folder: report it, keep going
            findings.append(
                Finding(
                    "VB900",
                    Severity.WARNING,
                    f"check {check.__name__} could not run: {type(exc).__name__}: {str(exc)[:200]}",
                    fix="please report this with the output of `vlmbridge doctor --json`",
                    evidence=Evidence(value=check.__name__),
                )
            )
        if check is check_environment:
            ctx.facts["nested_config"] = any(f.code == "VB606" for f in findings)
    facts = {
        "transformers": ctx.tf.version,
        "model_type": ctx.model_type,
        "family": ctx.family.display_name if ctx.family else None,
        **{k: v for k, v in ctx.facts.items() if k != "nested_config"},
    }
    return Report(path=ctx.path, findings=findings, facts=facts, elapsed_s=time.perf_counter() - started)


def _absolute(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()
