"""What a loaded model costs: the proportional set size (PSS) of its worker process tree, and before loading, the
planner's estimate plus what an idle worker process costs on its own.

PSS, not RSS: the shared libraries (torch, its BLAS) that every worker maps are split between them, so the sum over
workers is what they really hold together (`/proc/PID/smaps_rollup`, Linux 4.14+).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["idle_worker_bytes", "pss_bytes", "tree_pss_bytes"]

# What the worker imports before it loads a model: measuring a process that imported the same is the idle cost.
_PROBE = (
    "import torch, transformers, vlmbridge.engine.worker, vlmbridge.engine.transformers.engine, vlmbridge.loader\n"
    "print(open('/proc/self/smaps_rollup').read())"
)


def pss_bytes(pid: int) -> int | None:
    """The process's PSS in bytes, None if it is gone or /proc cannot tell."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return _pss_of(text)


def _pss_of(smaps_rollup: str) -> int | None:
    for line in smaps_rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return found


def tree_pss_bytes(pid: int) -> int | None:
    """PSS of the process and all its descendants (a backend may run helpers of its own)."""
    total, seen, todo = 0, set[int](), [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        pss = pss_bytes(current)
        if pss is None:
            if current == pid:
                return None
            continue
        total += pss
        todo.extend(_children(current))
    return total


def idle_worker_bytes(timeout: float = 120.0) -> int:
    """Measured once per pool: the PSS of a fresh interpreter that imported what a worker imports."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=False)
    pss = _pss_of(done.stdout) if done.returncode == 0 else None
    if pss is None:
        raise RuntimeError(f"could not measure an idle worker process: {done.stderr.strip()[-300:]}")
    return pss
