"""Environment checks: does the path exist here (host vs container), can we read it, is it the right folder."""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from vlmbridge.doctor.context import Context
from vlmbridge.doctor.findings import Evidence, Finding, Severity

__all__ = ["detect_container", "looks_like_host_path", "preflight", "read_only"]

_HOST_PREFIXES = ("/home/", "/Users/", "/Volumes/", "/mnt/", "/media/", "~")
_WINDOWS = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")
_CONTAINER_MOUNTS = ("/models", "/data", "/workspace", "/mnt/models", "/app/models", "/root/models")
_CGROUP_MARKERS = ("docker", "kubepods", "containerd", "libpod", "lxc")


def detect_container(root: Path = Path("/")) -> bool:
    """True inside Docker/Podman/Kubernetes/LXC: the marker files they create, or the cgroup of PID 1."""
    if (root / ".dockerenv").exists() or (root / "run/.containerenv").exists():
        return True
    try:
        cgroup = (root / "proc/1/cgroup").read_text(errors="replace")
    except OSError:
        cgroup = ""
    return any(marker in cgroup for marker in _CGROUP_MARKERS) or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def looks_like_host_path(raw: str) -> bool:
    """A path that names a place on a desktop/host machine, rarely valid inside a container."""
    return raw.startswith(_HOST_PREFIXES) or bool(_WINDOWS.match(raw))


def read_only(path: Path) -> bool:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
    except (OSError, AttributeError):
        pass
    return not os.access(path, os.W_OK)


def _compose_hint(raw: str) -> tuple[str, str]:
    name = re.split(r"[\\/]", raw.rstrip("/\\"))[-1] or "model"
    target = f"/models/{name}"
    return (
        target,
        f'volumes: ["{raw}:{target}:ro"] in docker-compose.yml (docker run -v {raw}:{target}:ro), then use {target}',
    )


def _mounted_copy(raw: str) -> str | None:
    name = re.split(r"[\\/]", raw.rstrip("/\\"))[-1]
    for base in _CONTAINER_MOUNTS:
        candidate = Path(base) / name
        try:
            if name and (candidate / "config.json").is_file():
                return str(candidate)
        except OSError:
            continue
    return None


def _missing(raw: str, path: Path, in_container: bool) -> Finding:
    if in_container:
        mounted = _mounted_copy(raw)
        _, compose = _compose_hint(raw)
        if looks_like_host_path(raw) or mounted:
            where = f"; a copy is mounted at {mounted}" if mounted else ""
            return Finding(
                "VB600",
                Severity.ERROR,
                f"{raw} does not exist inside this container: it looks like a path on the host{where}. "
                "A container sees only what is mounted into it, at the mount's container path",
                fix=f"use {mounted}" if mounted else f"mount the host folder: {compose}",
                evidence=Evidence(value=raw),
            )
        return Finding(
            "VB601",
            Severity.ERROR,
            f"model folder {raw} does not exist (inside a container: the path must be the container-side one)",
            fix=f"check the path; to use a host folder: {compose}",
            evidence=Evidence(value=raw),
        )
    parent = path.parent
    hint = ""
    try:
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1, cutoff=0.6)
        hint = f"; did you mean {parent / close[0]}?" if close else ""
    except OSError:
        pass
    return Finding(
        "VB601",
        Severity.ERROR,
        f"model folder {raw} does not exist{hint}",
        fix="pass the folder that holds config.json (download it first: huggingface-cli download REPO --local-dir DIR)",
        evidence=Evidence(value=raw),
    )


def preflight(raw: str, path: Path, in_container: bool) -> list[Finding]:
    """Findings that stop the doctor before any file is read: missing path, a file, unlistable, empty."""
    try:
        path.stat()
    except FileNotFoundError:
        return [_missing(raw, path, in_container)]
    except PermissionError:
        return [_permission(path, "reach")]
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return [
                Finding(
                    "VB115",
                    Severity.ERROR,
                    f"{raw} is a symlink loop",
                    fix="point the link at the real model folder (ln -sfn /real/folder LINK)",
                    evidence=Evidence(value=raw),
                )
            ]
        return [
            Finding(
                "VB601",
                Severity.ERROR,
                f"cannot access {raw}: {exc.strerror or exc}",
                fix="check the path and the mount",
                evidence=Evidence(value=raw),
            )
        ]
    if not os.path.isdir(path):
        folder = path.parent if path.suffix in (".json", ".safetensors", ".bin") else None
        return [
            Finding(
                "VB604",
                Severity.ERROR,
                f"{raw} is a file, not a model folder",
                fix=f"pass the folder: vlmbridge doctor {folder}"
                if folder
                else "pass the folder that contains config.json",
                evidence=Evidence(value=raw),
            )
        ]
    try:
        with os.scandir(path) as it:
            empty = next(it, None) is None
    except PermissionError:
        return [_permission(path, "list")]
    except OSError as exc:
        return [
            Finding(
                "VB601",
                Severity.ERROR,
                f"cannot list {raw}: {exc.strerror or exc}",
                fix="check the path and the mount",
                evidence=Evidence(value=raw),
            )
        ]
    if empty:
        return [
            Finding(
                "VB605",
                Severity.ERROR,
                f"model folder {raw} is empty",
                fix="download or mount the model files into it (an empty folder often means a mount failed)",
                evidence=Evidence(value=raw),
            )
        ]
    return []


def _permission(path: Path, what: str, file: str | None = None) -> Finding:
    target = path / file if file else path
    return Finding(
        "VB602",
        Severity.ERROR,
        f"permission denied: cannot {what} {target} as uid {os.getuid() if hasattr(os, 'getuid') else '?'}",
        fix=f"make it readable: chmod -R a+rX {path} (or run as the files' owner)",
        evidence=Evidence(file=file, value="permission denied"),
    )


def permission_denied(ctx: Context, file: str) -> Finding:
    return _permission(ctx.path, "read", file)


def check_environment(ctx: Context) -> Iterator[Finding]:
    """After preflight: the model nested one level deeper, and a read-only folder (fine, said plainly)."""
    if "config.json" not in ctx.entries:
        nested = _find_nested_config(ctx.path)
        if nested is not None:
            yield Finding(
                "VB606",
                Severity.ERROR,
                f"{ctx.path} has no config.json but {nested} does (a Hugging Face cache or an extra folder level)",
                fix=f"vlmbridge doctor {nested}",
                evidence=Evidence(file=str(nested.relative_to(ctx.path) / "config.json")),
            )
    if read_only(ctx.path):
        yield Finding(
            "VB603",
            Severity.INFO,
            "the folder is read-only here: fine, vlmbridge never writes into a model folder",
            evidence=Evidence(value=str(ctx.path)),
        )


def _find_nested_config(path: Path, depth: int = 3) -> Path | None:
    # BFS so the shallowest match wins; HF caches nest as models--ORG--NAME/snapshots/<rev>/config.json.
    level = [path]
    for _ in range(depth):
        nxt: list[Path] = []
        for folder in level:
            try:
                subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:
                continue
            for sub in subdirs[:50]:
                try:
                    if (sub / "config.json").is_file():
                        return sub
                except OSError:
                    continue
                nxt.append(sub)
        level = nxt
    return None
