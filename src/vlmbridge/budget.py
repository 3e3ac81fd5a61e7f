"""Memory budgets: sizes as people write them ("16GiB", "24GB") and the free memory of the device a model
would load on (a CUDA GPU if there is one, else RAM within the container's limit).

torch is imported lazily and only where an NVIDIA driver is visible: importing it costs ~1.5 s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["DeviceBudget", "device_budget", "format_bytes", "parse_size"]


# --- sizes -------------------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}  # fmt: skip


def parse_size(text: str) -> int:
    """'16GiB' → 17179869184, '24GB' → 24000000000, '512MiB', '1.5T', '1000' (bytes). Raises ValueError."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; use e.g. 16GiB, 24GB or 8000MiB")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def format_bytes(n: float, *, binary: bool = False) -> str:
    """17534247392 → '17.53 GB' (decimal, like model cards) or, with binary=True, '16.33 GiB'."""
    base, units = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000.0, ("B", "kB", "MB", "GB", "TB"))
    value, unit = float(n), units[0]
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            break
        value /= base
    return f"{value:.0f} {unit}" if unit == "B" or value == int(value) else f"{value:.2f} {unit}"


# --- device ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceBudget:
    """Free memory of the device the model would load on. `free` is None when it cannot be read."""

    kind: Literal["cuda", "cpu", "given"]
    name: str
    free: int | None
    total: int | None
    compute_capability: tuple[int, int] | None = None
    detail: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


def _nvidia_present() -> bool:
    # Importing torch costs ~1.5 s: only do it where an NVIDIA driver is visible at all.
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def _ram_budget() -> DeviceBudget:
    total = free = None
    try:
        info = {
            k: int(v.split()[0]) * 1024
            for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
            if v.strip() and v.split()[0].isdigit()
        }
        total, free = info.get("MemTotal"), info.get("MemAvailable", info.get("MemFree"))
    except OSError:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        except (OSError, ValueError, AttributeError):
            pass
    detail = "available RAM"
    limit = _cgroup_room()
    if limit is not None and (free is None or limit < free):
        free, detail = limit, "container memory limit minus current use"
    return DeviceBudget(kind="cpu", name="RAM", free=free, total=total, detail=detail)


def _cgroup_room() -> int | None:
    """Bytes left under the container's memory limit (cgroup v2, then v1), or None without a limit."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    )
    for limit_file, usage_file in pairs:
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
                return None
            return max(0, int(raw) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def _cuda_budget(index: int) -> DeviceBudget:
    try:
        import torch

        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return DeviceBudget(kind="cuda", name=f"cuda:{index}", free=None, total=None, detail="no such CUDA device")
        free, total = torch.cuda.mem_get_info(index)
        cc = torch.cuda.get_device_capability(index)
        return DeviceBudget(
            kind="cuda",
            name=torch.cuda.get_device_name(index),
            free=int(free),
            total=int(total),
            compute_capability=(int(cc[0]), int(cc[1])),
            detail=f"free memory of cuda:{index}",
        )
    except Exception as exc:  # a broken driver or torch build must not break the estimate
        return DeviceBudget(kind="cuda", name=f"cuda:{index}", free=None, total=None, detail=f"unreadable: {exc}")


def device_budget(device: str = "auto", gpu_memory: str | int | None = None) -> DeviceBudget:
    """The memory budget: `gpu_memory` if given, else the free memory of `device` (auto: CUDA if any, else RAM)."""
    if gpu_memory is not None:
        size = parse_size(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
        return DeviceBudget(kind="given", name="--gpu-memory", free=size, total=size, detail="as given")
    if device.startswith("cuda"):
        return _cuda_budget(int(device.split(":", 1)[1]) if ":" in device else 0)
    if device == "auto" and _nvidia_present():
        budget = _cuda_budget(0)
        if budget.free is not None:
            return budget
    return _ram_budget()
