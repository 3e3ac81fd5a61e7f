"""Before a model loads: the doctor (a broken folder fails that model with the finding's code) and the planner
(what it will need), both from small files and safetensors headers — no torch, no weights read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vlmbridge.errors import ModelFolderError, VlmbridgeError
from vlmbridge.settings import ModelSettings

if TYPE_CHECKING:
    from vlmbridge.budget import DeviceBudget

__all__ = ["DoctorRefusal", "FolderFacts", "folder_facts", "planned_bytes", "run_doctor"]


class DoctorRefusal(ModelFolderError):
    """The doctor found errors in the folder; `code` is the first finding's (e.g. VB101)."""

    def __init__(self, message: str, *, code: str, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.code = code


@dataclass(frozen=True)
class FolderFacts:
    """What /v1/models says about a model that is not loaded: read from its config."""

    max_model_len: int | None
    vision: bool | None
    quantization: str | None


def run_doctor(settings: ModelSettings, path: Path) -> None:
    """Raise DoctorRefusal when the doctor finds errors (unless the model's skip_doctor says start anyway)."""
    from vlmbridge.doctor import diagnose
    from vlmbridge.doctor.context import DoctorOptions

    report = diagnose(path, DoctorOptions.from_settings(cast(Any, settings)))
    errors = report.errors
    if errors and not settings.skip_doctor:
        first = errors[0]
        more = f" (and {len(errors) - 1} more; run `vlmbridge doctor {path}`)" if len(errors) > 1 else ""
        raise DoctorRefusal(f"{first.code}: {first.message}{more}", code=first.code, fix=first.fix)


def planned_bytes(settings: ModelSettings, path: Path, device: DeviceBudget | None = None) -> int:
    """The planner's total for the way the model will load here (its recommendation, else the first option); for
    vLLM on a GPU, the share of the GPU it takes at start-up, whatever the model needs (`device`: where, default
    the model's device as the budget reads it)."""
    from vlmbridge.budget import device_budget
    from vlmbridge.engine.vllm.preflight import gpu_share
    from vlmbridge.plan import PlanInputs, make_plan

    cpu_kv = 0
    if settings.engine == "vllm":
        device = device or device_budget(settings.device)
        if device.kind == "cuda" and device.total:
            # vLLM sizes its KV cache to fill gpu_memory_utilization of each GPU it uses (weights, KV, graphs): the
            # pool counts that share of the GPU its budget reads.
            return gpu_share(settings, device.total)
        cpu_kv = int(settings.vllm_cpu_kv_cache_gib * (1 << 30))  # on a CPU its KV cache is this, set apart
    plan = make_plan(
        path, PlanInputs(device=settings.device, context=settings.context_length, max_pixels=settings.max_pixels)
    )
    row = plan.recommendation.row or (plan.rows[0] if plan.rows else None)
    if row is None:
        raise ModelFolderError(f"the planner found no way to load {path}")
    return row.estimate.total + cpu_kv


def folder_facts(settings: ModelSettings, path: Path) -> FolderFacts:
    """Context length, modality and quantization from the config, as the engine would set them; None where the
    folder cannot tell (it may be broken: the doctor says why when it is loaded)."""
    from vlmbridge.plan import DEFAULT_CONTEXT_CAP, read_checkpoint

    try:
        ck = read_checkpoint(path)
    except (VlmbridgeError, OSError, ValueError, KeyError, TypeError):
        return FolderFacts(None, None, None)
    most = ck.geometry.max_context
    context = min(settings.context_length or min(most, DEFAULT_CONTEXT_CAP), most)
    quantization = ck.pre.method if ck.pre is not None else settings.quantization
    return FolderFacts(context, ck.geometry.vision is not None, quantization)
