"""Memory planning: every way a checkpoint can load, what each needs for a workload, which one to use and why.

`vlmbridge plan` renders a `Plan`; the loader's `--quantization auto` asks `choose_quantization` the same
question on the real device. Both use the estimator in `vlmbridge.memory` (as does the doctor), so the three
always agree. Nothing here imports torch.

"Fits with headroom" means the estimate's total, which already carries the 20 % overhead Qwen recommends and
the CUDA context, is at most the free memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from vlmbridge.errors import ModelFolderError
from vlmbridge.folder import ModelFolder, read_json_file, read_safetensors_header
from vlmbridge.memory import (
    DeviceBudget,
    Estimate,
    LoadOption,
    ModelGeometry,
    WeightStats,
    Workload,
    device_budget,
    estimate,
    format_bytes,
    geometry_from_config,
    max_context_that_fits,
    weight_stats,
)
from vlmbridge.quant.formats import (
    BnbMethod,
    PreQuantization,
    QuantizationName,
    Runtime,
    detect,
    installed,
    runtime,
)

__all__ = [
    "DEFAULT_CONTEXT_CAP",
    "PLAN_SCHEMA",
    "Plan",
    "PlanInputs",
    "PlanRow",
    "Recommendation",
    "choose_quantization",
    "make_plan",
    "read_checkpoint",
]

PLAN_SCHEMA = "vlmbridge.plan/1"
DEFAULT_CONTEXT_CAP = 32768  # the server's default context: min(model maximum, 32768)
_BNB_PACKAGES = (("bitsandbytes", "bitsandbytes"), ("accelerate", "accelerate"))
# benchmarks/bench_memory.py: a 311 M model peaked at 2.6 GiB of RSS with bnb-8bit on the CPU, 1.1 GiB in bf16.
_CPU_INT8 = "on the CPU bitsandbytes' int8 matmul buffers (kept by the allocator) cost more than int8 weights save"
_LABELS = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "bnb-8bit": "bnb-8bit (int8)", "bnb-4bit": "bnb-4bit (nf4)"}


@dataclass(frozen=True)
class PlanInputs:
    """What to plan for. `gpu_memory` (bytes) replaces the device's free memory; `context` None = the server's
    default, min(model maximum, 32768)."""

    device: str = "auto"
    gpu_memory: int | None = None
    context: int | None = None
    images: int = 1
    max_pixels: int | None = None
    batch: int = 1
    videos: int = 0
    video_seconds: float = 10.0
    # engine: vllm — weights and KV cache split over tensor_parallel × pipeline_parallel GPUs; rows are per GPU.
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


@dataclass(frozen=True)
class Checkpoint:
    """A model folder's weight statistics and geometry, read from small files and safetensors headers."""

    folder: ModelFolder
    stats: WeightStats
    geometry: ModelGeometry
    pre: PreQuantization | None


@dataclass(frozen=True)
class PlanRow:
    """One way to load: its estimate, how to ask for it, and whether it can run here."""

    estimate: Estimate
    label: str
    flags: tuple[str, ...]  # vlmbridge serve/chat flags that load it this way
    quantization: QuantizationName  # the --quantization value it corresponds to
    blocker: str = ""  # why it cannot be used here ("" = it can)

    @property
    def available(self) -> bool:
        return not self.blocker

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.estimate.to_dict(),
            "label": self.label,
            "flags": list(self.flags),
            "quantization": self.quantization,
            "available": self.available,
            "blocker": self.blocker or None,
        }


@dataclass(frozen=True)
class Recommendation:
    row: PlanRow | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        row = self.row
        return {
            "option": row.estimate.option if row else None,
            "label": row.label if row else None,
            "flags": list(row.flags) if row else [],
            "total": row.estimate.total if row else None,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Plan:
    checkpoint: Checkpoint
    workload: Workload
    budget: DeviceBudget
    device_kind: str  # cpu | cuda: whether the CUDA context counts and which kernels exist
    runtime: Runtime | None
    rows: tuple[PlanRow, ...]
    recommendation: Recommendation = field(default_factory=lambda: Recommendation(None, ""))

    def to_dict(self) -> dict[str, Any]:
        ck, stats, pre = self.checkpoint, self.checkpoint.stats, self.checkpoint.pre
        b = self.budget
        first = self.rows[0].estimate if self.rows else None
        return {
            "schema": PLAN_SCHEMA,
            "path": str(ck.folder.path),
            "model_type": ck.folder.model_type,
            "weights": {
                "stored_bytes": stats.stored_bytes,
                "params": stats.params,
                "stored_dtype": stats.stored_float,
                "by_dtype": dict(stats.bytes_by_dtype),
            },
            "quantization": None
            if pre is None
            else {
                "method": pre.method,
                "scheme": pre.scheme,
                "bits": pre.bits,
                "needs": [pip for _, pip in pre.needs],
                "missing": pre.missing,
                "dequantized_here": self.runtime.dequantized if self.runtime else None,
                "runtime": self.runtime.reason if self.runtime else None,
            },
            "workload": {
                "context": self.workload.context,
                "images": self.workload.images,
                "batch": self.workload.batch,
                "max_pixels": self.workload.max_pixels,
                "image_size": list(self.workload.image_size),
                "videos": self.workload.videos,
                "video_seconds": self.workload.video_seconds,
                "video_frames": self.workload.video_frames,
            },
            "device": {
                "name": b.name,
                "kind": self.device_kind,
                "free_bytes": b.free,
                "total_bytes": b.total,
                "compute_capability": list(b.compute_capability) if b.compute_capability else None,
                "detail": b.detail,
            },
            "kv_bytes_per_token": first.kv_per_token if first else None,
            "image_tokens_per_image": first.image_tokens if first else None,
            "video_tokens_per_video": first.video_tokens if first else None,
            "options": [r.to_dict() for r in self.rows],
            "recommendation": self.recommendation.to_dict(),
        }


# --- reading -----------------------------------------------------------------------------------------------
def processor_settings(folder: ModelFolder) -> dict[str, Any] | None:
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = folder.path / name
        if not path.is_file():
            continue
        try:
            data = read_json_file(path)
        except (OSError, ValueError):
            continue
        section = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(section, dict):
            return section
    return None


def read_checkpoint(path: str | Path | ModelFolder) -> Checkpoint:
    """Weight stats and geometry of a folder. Raises ModelFolderError when they cannot be read."""
    folder = path if isinstance(path, ModelFolder) else ModelFolder.open(path)
    shards = folder.safetensors_files
    if not shards:
        raise ModelFolderError(
            f"{folder.path} has no safetensors weights; plans size weights from their headers",
            fix="convert the weights to safetensors (pickle .bin weights are not sized)",
        )
    try:
        headers = [read_safetensors_header(p) for p in shards]
        geometry = geometry_from_config(folder.config, processor_settings(folder))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(
            f"cannot plan {folder.path}: {exc}", fix=f"run `vlmbridge doctor {folder.path}` for a diagnosis"
        ) from None
    return Checkpoint(
        folder=folder,
        stats=weight_stats(headers, folder.quantization_config),
        geometry=geometry,
        pre=detect(folder.config),
    )


# --- rows --------------------------------------------------------------------------------------------------
def _missing(packages: Sequence[tuple[str, str]]) -> str:
    absent = [pip for module, pip in packages if not installed(module)]
    return f"needs {', '.join(absent)} (pip install {' '.join(absent)})" if absent else ""


def _rows(ck: Checkpoint, workload: Workload, device_kind: str, rt: Runtime | None) -> list[PlanRow]:
    def est(option: LoadOption) -> Estimate:
        return estimate(ck.stats, ck.geometry, workload, option, device_kind=device_kind)

    pre = ck.pre
    if pre is not None:
        missing = _missing(pre.needs)
        dequantized = rt is not None and rt.dequantized
        kernels = _missing(rt.needs) if rt is not None and not dequantized else ""
        own = missing or (f"not here: {rt.reason}" if rt is not None and dequantized else kernels)
        fallback = missing or ("" if dequantized else "not needed: it runs quantized here")
        return [
            PlanRow(est("pre-quantized"), f"{pre.method} as stored ({pre.scheme})", (), "none", own),
            PlanRow(est("bf16"), "bf16 (dequantized)", ("--allow-dequantize",), "none", fallback),
        ]
    stored = ck.stats.stored_float or "fp32"
    rows = [PlanRow(est("as-stored"), f"as stored ({stored})", (), "none")]
    floats: tuple[LoadOption, ...] = ("bf16", "fp16")
    for option in floats:
        cpu_fp16 = option == "fp16" and device_kind == "cpu"
        blocker = "the loader refuses fp16 on the CPU (slow kernels)" if cpu_fp16 else ""
        rows.append(PlanRow(est(option), _LABELS[option], ("--dtype", option), "none", blocker))
    bnb_blocker = _missing(_BNB_PACKAGES)
    methods: tuple[BnbMethod, ...] = ("bnb-8bit", "bnb-4bit")
    for method in methods:
        blocker = bnb_blocker
        if not blocker and method == "bnb-8bit" and device_kind == "cpu":
            blocker = _CPU_INT8
        rows.append(PlanRow(est(method), _LABELS[method], ("--quantization", method), method, blocker))
    return rows


def per_gpu(e: Estimate, tensor_parallel: int, pipeline_parallel: int) -> Estimate:
    """One GPU's share under vLLM's tensor × pipeline parallelism: the language model's weights and KV cache split
    over all of them (TP splits every layer's matrices and KV heads, PP the layers); the vision tower, activations
    and the CUDA context are counted whole on each GPU (the tower is replicated; conservative for the rest)."""
    gpus = tensor_parallel * pipeline_parallel
    weights, kv = -(-e.weights // gpus), -(-e.kv_cache // gpus)
    total = e.total - e.weights - e.kv_cache + weights + kv
    note = f"per GPU of {gpus} (tensor {tensor_parallel} × pipeline {pipeline_parallel})"
    return replace(
        e, weights=weights, kv_cache=kv, kv_per_token=-(-e.kv_per_token // gpus), total=total,
        note=f"{e.note}; {note}" if e.note else note,
    )  # fmt: skip


def _with_fits(rows: Sequence[PlanRow], free: int | None) -> tuple[PlanRow, ...]:
    return tuple(
        replace(r, estimate=replace(r.estimate, fits=None if free is None else r.estimate.total <= free)) for r in rows
    )


# --- plan --------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return format_bytes(n, binary=True)


def _device_kind(budget: DeviceBudget, device: str) -> str:
    if budget.kind == "given":
        return "cpu" if device == "cpu" else "cuda"
    return budget.kind


def make_plan(path: str | Path | ModelFolder | Checkpoint, inputs: PlanInputs | None = None) -> Plan:
    """Every loading option for the folder under the workload, with the recommendation."""
    inputs = inputs or PlanInputs()
    ck = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    geo = ck.geometry
    workload = Workload(
        context=inputs.context or min(geo.max_context, DEFAULT_CONTEXT_CAP),
        images=inputs.images if geo.vision is not None else 0,
        batch=inputs.batch,
        max_pixels=inputs.max_pixels,
        videos=inputs.videos if geo.vision is not None else 0,
        video_seconds=inputs.video_seconds,
    )
    budget = device_budget(inputs.device, inputs.gpu_memory)
    kind = _device_kind(budget, inputs.device)
    rt = runtime(ck.pre, kind, budget.compute_capability) if ck.pre is not None else None
    estimated = _rows(ck, workload, kind, rt)
    tp, pp = inputs.tensor_parallel, inputs.pipeline_parallel
    if tp * pp > 1:
        estimated = [replace(r, estimate=per_gpu(r.estimate, tp, pp)) for r in estimated]
    rows = _with_fits(estimated, budget.free)
    plan = Plan(checkpoint=ck, workload=workload, budget=budget, device_kind=kind, runtime=rt, rows=rows)
    return replace(plan, recommendation=_recommend(plan))


def _recommend(plan: Plan) -> Recommendation:
    free = plan.budget.free
    if free is None:
        return Recommendation(None, f"the free memory of {plan.budget.name} is unknown: pass --gpu-memory SIZE")
    where = _where(plan.budget, free)
    too_big: dict[int, list[str]] = {}  # total → labels: rows of equal size read as one clause
    blocked: list[str] = []
    for row in plan.rows:
        e = row.estimate
        if not row.available:
            if e.total <= free and "not needed" not in row.blocker:
                blocked.append(f"{row.label} would fit but {row.blocker}")
            continue
        if e.total > free:
            too_big.setdefault(e.total, []).append(row.label)
            continue
        reason = f"{row.label} is the best quality that fits: {_gib(e.total)} of {where}, {_gib(free - e.total)} spare"
        skipped = [f"{' / '.join(labels)} would need {_gib(total)}" for total, labels in too_big.items()]
        return Recommendation(row, "; ".join([reason, *skipped, *blocked]))
    return Recommendation(None, _nothing_fits(plan, free, where))


def _where(budget: DeviceBudget, free: int) -> str:
    return f"the {_gib(free)} budget" if budget.kind == "given" else f"{_gib(free)} free on {budget.name}"


def _nothing_fits(plan: Plan, free: int, where: str) -> str:
    usable = [r for r in plan.rows if r.available] or list(plan.rows)
    smallest = min(usable, key=lambda r: r.estimate.total)
    ck = plan.checkpoint
    reason = f"nothing fits in {where}: the smallest, {smallest.label}, needs {_gib(smallest.estimate.total)}"
    context = max_context_that_fits(
        ck.stats, ck.geometry, plan.workload, smallest.estimate.option, free, device_kind=plan.device_kind
    )
    if context >= 1024:
        return reason + f"; it fits with --context {context}"
    return reason + "; use a device with more memory or a smaller model"


def choose_quantization(plan: Plan, dtype: str = "auto") -> tuple[QuantizationName, str]:
    """What `--quantization auto` loads: the user's dtype if it fits, else bnb-8bit, else bnb-4bit; with why.

    A pre-quantized checkpoint keeps its own quantization; with the memory unknown nothing is quantized.
    """
    if plan.checkpoint.pre is not None:
        return "none", f"the checkpoint is pre-quantized ({plan.checkpoint.pre.method}): loading it as stored"
    free = plan.budget.free
    base_option = cast(LoadOption, "as-stored" if dtype == "auto" else dtype)
    ck = plan.checkpoint
    base = estimate(ck.stats, ck.geometry, plan.workload, base_option, device_kind=plan.device_kind)
    label = _LABELS.get(base_option, f"as stored ({ck.stats.stored_float or 'fp32'})")
    if free is None:
        return "none", f"the free memory of {plan.budget.name} is unknown: loading {label} unquantized"
    where = _where(plan.budget, free)
    if base.total <= free:
        return "none", f"{label} fits: needs {_gib(base.total)} of {where}"
    why = f"{label} needs {_gib(base.total)}, more than {where}"
    bnb = [r for r in plan.rows if r.quantization != "none"]
    unavailable = [r for r in bnb if not r.available]
    for row in bnb:
        if row.available and row.estimate.total <= free:
            return row.quantization, f"{why}; {row.label} needs {_gib(row.estimate.total)}"
    usable = [r for r in bnb if r.available]
    if usable:
        last = usable[-1]
        return last.quantization, (
            f"{why}; nothing fits, {last.label} comes closest ({_gib(last.estimate.total)}): trying it"
        )
    blocker = unavailable[0].blocker if unavailable else "no quantization applies"
    return "none", f"{why}; bnb quantization {blocker}: loading {label} anyway"
