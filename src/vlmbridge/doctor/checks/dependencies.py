"""Dependencies: packages the checkpoint's quantization, attention kernel and processors need, and the GPU for FP8.

Presence is checked with `importlib.util.find_spec` (nothing is imported), except flash_attn, which is imported
only when it was requested — an `undefined symbol` there is exactly what we need to catch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from vlmbridge.doctor.context import Context
from vlmbridge.doctor.findings import Evidence, Finding, Severity
from vlmbridge.quant.formats import QUANT_PACKAGES, installed

__all__ = ["QUANT_PACKAGES", "check_dependencies", "check_quantization", "installed"]

_FP8_MIN_CC = (8, 9)
_FA2_MIN_CC = (8, 0)
_TP_SIZES = (1, 2, 4, 8)


def check_dependencies(ctx: Context) -> Iterator[Finding]:
    missing = [m for m in ("torch", "transformers") if not installed(m)]
    if missing:
        yield Finding(
            "VB408",
            Severity.ERROR,
            f"{' and '.join(missing)} not installed in this Python ({', '.join(missing)} is needed to load any model)",
            fix=f"pip install {' '.join(missing)}",
            evidence=Evidence(value=", ".join(missing)),
        )
    if ctx.is_vlm and not installed("torchvision"):
        yield Finding(
            "VB404",
            Severity.ERROR,
            "torchvision is not installed: transformers 5's Qwen-VL image and video processors need it "
            '("requires the Torchvision library")',
            fix="pip install torchvision (the build matching your torch)",
            evidence=Evidence(value="torchvision"),
        )
    if not installed("accelerate"):
        yield Finding(
            "VB405",
            Severity.ERROR,
            'accelerate is not installed: loading onto a device (device_map) needs it ("requires `accelerate`")',
            fix="pip install accelerate",
            evidence=Evidence(value="accelerate"),
        )
    if ctx.model_type == "qwen" and not installed("tiktoken"):
        yield Finding(
            "VB409",
            Severity.ERROR,
            "Qwen-VL v1 (model_type qwen) remote code tokenizes with tiktoken, which is not installed",
            fix="pip install tiktoken",
            evidence=Evidence(file="config.json", value="model_type=qwen"),
        )
    yield from _check_flash_attention(ctx)
    yield from check_quantization(ctx)


def _check_flash_attention(ctx: Context) -> Iterator[Finding]:
    requested = ctx.options.attn_implementation
    if not requested.startswith("flash_attention"):
        return
    reason = None
    if not installed("flash_attn"):
        reason = "the flash_attn package is not installed"
    else:
        try:
            importlib.import_module("flash_attn")  # an import failure (undefined symbol) is the finding
        except Exception as exc:
            reason = f"flash_attn fails to import ({str(exc).splitlines()[0][:160]}) — built for another torch/CUDA"
    budget = ctx.budget
    if reason is None and budget.kind == "cpu":
        reason = "FlashAttention runs on CUDA GPUs only and the model would load on the CPU"
    cc = budget.compute_capability
    if reason is None and cc is not None and cc < _FA2_MIN_CC:
        reason = f"the GPU has compute capability {cc[0]}.{cc[1]}; FlashAttention 2 needs 8.0 (Ampere) or newer"
    if reason:
        yield Finding(
            "VB403",
            Severity.ERROR,
            f"attn_implementation={requested} requested but unusable: {reason} "
            '("FlashAttention2 has been toggled on, but it cannot be used")',
            fix="use --attn-implementation sdpa (nearly as fast), or pip install flash-attn --no-build-isolation "
            "matching your torch and CUDA",
            evidence=Evidence(value=f"attn_implementation={requested}"),
        )


def _group_size(qc: Mapping[str, Any]) -> int | None:
    value = qc.get("group_size")
    if isinstance(value, int) and value > 0:
        return value
    groups = qc.get("config_groups")
    if isinstance(groups, dict):
        for group in groups.values():
            weights = group.get("weights") if isinstance(group, dict) else None
            size = weights.get("group_size") if isinstance(weights, dict) else None
            if isinstance(size, int) and size > 0:
                return size
    return None


def check_quantization(ctx: Context) -> Iterator[Finding]:
    qc = ctx.quantization_config
    if qc is None:
        return
    method = str(qc.get("quant_method", "")).lower()
    evidence = Evidence(file="config.json", value=f"quantization_config.quant_method={method or '?'}")
    needs = QUANT_PACKAGES.get(method)
    if needs is None:
        yield Finding(
            "VB406",
            Severity.WARNING,
            f"quantization method {method!r} is not one transformers {ctx.tf.version or ''} supports by name",
            fix="check quantization_config in config.json against the model card",
            evidence=evidence,
        )
        return
    absent = [pip for module, pip in needs if not installed(module)]
    if absent:
        yield Finding(
            "VB400",
            Severity.ERROR,
            f"this {method} checkpoint needs {', '.join(absent)}, which is not installed",
            fix=f"pip install {' '.join(absent)}",
            evidence=evidence,
        )
    else:
        packages = ", ".join(pip for _, pip in needs)
        yield Finding(
            "VB401",
            Severity.INFO,
            f"pre-quantized {method} checkpoint; its packages ({packages}) are installed",
            evidence=evidence,
        )
    if method == "fp8" and not qc.get("dequantize"):
        yield from _check_fp8(ctx, evidence)
    group = _group_size(qc)
    inter = ctx.text_config.get("intermediate_size")
    if method in ("awq", "gptq", "compressed-tensors") and group and isinstance(inter, int):
        ok = [tp for tp in _TP_SIZES if inter % tp == 0 and (inter // tp) % group == 0]
        bad = [tp for tp in _TP_SIZES if tp not in ok]
        yield Finding(
            "VB407",
            Severity.INFO,
            f"group size {group} with intermediate_size {inter}: tensor-parallel sizes {ok or 'none'} divide it"
            + (f'; {bad} fail in vLLM ("not aligned with the quantized weight shape")' if bad else ""),
            evidence=Evidence(file="config.json", value=f"group_size={group}"),
        )


def _check_fp8(ctx: Context, evidence: Evidence) -> Iterator[Finding]:
    budget = ctx.budget
    cc = budget.compute_capability
    if budget.kind == "cpu" or (cc is not None and cc < _FP8_MIN_CC):
        where = "on the CPU" if budget.kind == "cpu" else f"on a compute-capability {cc[0]}.{cc[1]} GPU" if cc else ""
        yield Finding(
            "VB402",
            Severity.WARNING,
            f"FP8 weights {where}: transformers dequantizes them to bf16, about twice the memory of the FP8 "
            "checkpoint (FP8 kernels need compute capability >= 8.9: L4, RTX 40xx, H100)",
            fix="use the bf16 checkpoint or an AWQ/GPTQ one on this device, or a GPU with compute capability >= 8.9; "
            "vlmbridge loads it dequantized only with --allow-dequantize",
            evidence=evidence,
        )
