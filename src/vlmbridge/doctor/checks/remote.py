"""Remote code: what `auto_map` would run, its hashes, the allowlist verdict, and the setting that allows it."""

from __future__ import annotations

from collections.abc import Iterator

from vlmbridge.doctor.checks.environment import permission_denied
from vlmbridge.doctor.context import Context
from vlmbridge.doctor.findings import Evidence, Finding, Severity
from vlmbridge.folder import ModelFolder
from vlmbridge.remote_code import inspect_remote_code, pin_setting

__all__ = ["check_remote_code"]


def check_remote_code(ctx: Context) -> Iterator[Finding]:
    if not ctx.config_file.ok:
        return
    if not ctx.auto_map:
        yield Finding(
            "VB300",
            Severity.INFO,
            "no auto_map in config.json: the model is built into transformers; trust_remote_code is not needed "
            "(leave it off)",
            evidence=Evidence(file="config.json", value="auto_map absent"),
        )
        py = ctx.names(".py")
        if py:
            yield Finding(
                "VB306",
                Severity.INFO,
                f"{', '.join(py[:3])} present but unused: nothing in config.json points to them, so they never run",
                evidence=Evidence(file=py[0]),
            )
        return
    folder = ModelFolder(path=ctx.path.resolve(), config=ctx.config)
    try:
        report = inspect_remote_code(folder, ctx.options.trust_remote_code)
    except PermissionError as exc:
        yield permission_denied(ctx, getattr(exc, "filename", None) or "*.py")
        return
    listing = ", ".join(f"{n} sha256={h[:12]}…" for n, h in sorted(report.files.items())) or "no .py files"
    evidence = Evidence(file="config.json", value=f"auto_map: {', '.join(sorted(ctx.auto_map))}")
    if report.cross_repo:
        yield Finding(
            "VB302",
            Severity.ERROR,
            f"auto_map points to code in another repository ({', '.join(report.cross_repo)}): it would be "
            "downloaded and run at load time; vlmbridge never runs code outside the pinned folder",
            fix="copy the referenced modules into the folder, make the auto_map entries local, then pin them",
            evidence=evidence,
        )
    if report.missing_modules:
        names = ", ".join(f"{m}.py" for m in report.missing_modules)
        yield Finding(
            "VB303",
            Severity.ERROR,
            f"auto_map names {names}, which the folder does not contain",
            fix=f"download {names} from the model's repository",
            evidence=evidence,
        )
    if report.pins is None:
        yield Finding(
            "VB301",
            Severity.ERROR,
            f"the model needs remote code ({listing}) and the folder is not on the remote-code allowlist "
            '(transformers: "contains custom code which must be executed" / trust_remote_code=True)',
            fix=f"review the files, then add {pin_setting(report)}",
            evidence=evidence,
        )
    elif report.mismatched:
        diffs = "; ".join(
            f"{n}: pinned {(p or 'nothing')[:12]}, found {(a or 'no file')[:12]}"
            for n, (p, a) in report.mismatched.items()
        )
        yield Finding(
            "VB304",
            Severity.ERROR,
            f"remote code differs from its pins ({diffs})",
            fix=f"review the change; if intended, update the pins: {pin_setting(report)}",
            evidence=evidence,
        )
    elif report.allowed:
        yield Finding(
            "VB305",
            Severity.INFO,
            f"remote code allowlisted and matching its pins ({listing})",
            evidence=evidence,
        )
