"""Quantization facts shared by the loader, `vlmbridge plan` and the doctor: what a checkpoint's
`quantization_config` is, which packages it needs, and how transformers will run it on a given device.

Nothing here imports torch or transformers; the rules below were read from the quantizers of transformers 5.24
and checked by loading real tiny checkpoints (tests/test_quantization_*.py):

- fine-grained FP8: kept in FP8 only on CUDA compute capability >= 8.9, where its matmul is a Triton kernel the
  `kernels` package fetches from the Hub (kernels-community/finegrained-fp8); elsewhere transformers dequantizes it
  to the model dtype (about 2× the FP8 memory), logging one line.
- compressed-tensors: transformers has kernels only for FP8 schemes (and only when asked with
  `use_optimized_inference` on a capability-8.9 GPU); everything else (int4/int8 "pack-quantized" AWQ/GPTQ
  exports of llm-compressor) is decompressed to the model dtype on the first forward pass.
- AWQ / GPTQ (`quant_method: awq|gptq`): gptqmodel kernels (plus optimum for GPTQ), CPU or GPU.
- bitsandbytes: int8 / nf4 kernels on CUDA and, in recent bitsandbytes (0.50 tested), on the CPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FP8_MIN_CAPABILITY",
    "QUANT_PACKAGES",
    "BnbMethod",
    "PreQuantization",
    "QuantizationName",
    "Runtime",
    "detect",
    "installed",
    "runtime",
]

QuantizationName = Literal["auto", "none", "bnb-8bit", "bnb-4bit"]
BnbMethod = Literal["bnb-8bit", "bnb-4bit"]
FP8_MIN_CAPABILITY = (8, 9)

_ACC = ("accelerate", "accelerate")
# quant_method → (import name, pip name) it needs; from transformers' quantizers' validate_environment.
QUANT_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "bitsandbytes": (("bitsandbytes", "bitsandbytes"), _ACC),
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"), _ACC),
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
    "fp8": (_ACC,),
    "fbgemm_fp8": (("fbgemm_gpu", "fbgemm-gpu"), _ACC),
    "aqlm": (("aqlm", "aqlm[gpu,cpu]"), _ACC),
    "hqq": (("hqq", "hqq"),),
    "quanto": (("optimum.quanto", "optimum-quanto"), _ACC),
    "eetq": (("kernels", "kernels"), _ACC),
    "higgs": (("flute", "flute-kernel"), ("fast_hadamard_transform", "fast-hadamard-transform"), _ACC),
    "torchao": (("torchao", "torchao"),),
    "mxfp4": (("kernels", "kernels"), _ACC),
    "auto-round": (("auto_round", "auto-round"),),
    "bitnet": (_ACC,),
    "quark": (("quark", "amd-quark"),),
    "fp_quant": (("fp_quant", "fp_quant"),),
    "vptq": (("vptq", "vptq"),),
    "spqr": (("spqr_quant", "spqr_quant"),),
    "gguf": (("gguf", "gguf"),),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class PreQuantization:
    """A checkpoint's own quantization, as its config.json declares it."""

    method: str  # quant_method as transformers names it: fp8, compressed-tensors, awq, gptq, bitsandbytes, …
    scheme: str  # for people: "FP8 e4m3, 128×128 blocks", "int4, group 128 (pack-quantized)", "nf4"
    bits: int | None
    float_weights: bool  # FP8/FP4 weights rather than integers
    needs: tuple[tuple[str, str], ...]  # (import name, pip name)
    known: bool  # transformers 5.x knows this quant_method
    config_dequantize: bool  # config.json itself asks transformers to dequantize

    @property
    def missing(self) -> list[str]:
        """pip names of the needed packages that are not installed."""
        return [pip for module, pip in self.needs if not installed(module)]


def _compressed_tensors_scheme(qc: Mapping[str, Any]) -> tuple[str, int | None, bool]:
    groups = qc.get("config_groups")
    weights: list[Mapping[str, Any]] = []
    if isinstance(groups, Mapping):
        for group in groups.values():
            w = group.get("weights") if isinstance(group, Mapping) else None
            if isinstance(w, Mapping):
                weights.append(w)
    fmt = str(qc.get("format") or "dense")
    if not weights:
        return f"compressed-tensors ({fmt})", None, False
    first = weights[0]
    bits = first.get("num_bits") if isinstance(first.get("num_bits"), int) else None
    floats = all(w.get("type") == "float" for w in weights)
    kind = f"{'fp' if floats else 'int'}{bits or '?'}"
    group = first.get("group_size")
    detail = f", group {group}" if isinstance(group, int) and group > 0 else f", per {first.get('strategy', '?')}"
    return f"{kind}{detail} ({fmt})", bits, floats


def detect(config: Mapping[str, Any]) -> PreQuantization | None:
    """The checkpoint's quantization from config.json (top level, or text_config for some VLM exports)."""
    qc: Mapping[str, Any] | None = None
    text = config.get("text_config")
    for source in (config, text if isinstance(text, Mapping) else {}):
        value = source.get("quantization_config")
        if isinstance(value, Mapping):
            qc = value
            break
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits") if isinstance(qc.get("bits"), int) else None
    floats = False
    if method == "fp8":
        block = qc.get("weight_block_size")
        blocks = f", {block[0]}×{block[1]} blocks" if isinstance(block, list) and len(block) == 2 else ", per tensor"
        scheme, bits, floats = f"FP8 {qc.get('fmt', 'e4m3')}{blocks}", 8, True
    elif method == "compressed-tensors":
        scheme, bits, floats = _compressed_tensors_scheme(qc)
    elif method == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        method = "bitsandbytes"
        four = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
        scheme, bits = (str(qc.get("bnb_4bit_quant_type", "nf4")), 4) if four else ("int8", 8)
    elif method in ("awq", "gptq"):
        group = qc.get("group_size")
        scheme = f"int{bits or 4}, group {group}" if isinstance(group, int) else f"int{bits or 4}"
    else:
        scheme = method or "unknown"
    needs = QUANT_PACKAGES.get(method)
    return PreQuantization(
        method=method or "unknown",
        scheme=scheme,
        bits=bits,
        float_weights=floats,
        needs=needs or (),
        known=needs is not None,
        config_dequantize=bool(qc.get("dequantize")),
    )


@dataclass(frozen=True)
class Runtime:
    """How transformers will hold a pre-quantized checkpoint on a device.

    `dequantized` means the weights end up in the model dtype (2–4× the stored bytes); the loader refuses that
    unless asked explicitly. `overrides` are quantization_config entries the loader sets (e.g. the FP8 kernels).
    """

    dequantized: bool
    reason: str
    overrides: Mapping[str, Any]
    explicit: bool = False  # config.json itself asks for dequantization
    needs: tuple[tuple[str, str], ...] = ()  # packages the kernels themselves need, beyond the method's

    @property
    def missing(self) -> list[str]:
        return [pip for module, pip in self.needs if not installed(module)]


def _has_fp8_kernels(device_kind: str, capability: tuple[int, int] | None) -> bool | None:
    """True/False on a known device; None for a budget given by size only (the GPU is unknown)."""
    if device_kind == "cpu" or device_kind == "mps":
        return False
    if capability is None:
        return None
    return capability >= FP8_MIN_CAPABILITY


def runtime(pre: PreQuantization, device_kind: str, capability: tuple[int, int] | None = None) -> Runtime:
    """How `pre` runs on `device_kind` (cpu, cuda, mps; "given" = a GPU of unknown model)."""
    where = "the CPU" if device_kind == "cpu" else device_kind.upper() if device_kind == "mps" else "this GPU"
    if capability is not None and device_kind != "cpu":
        where = f"a compute-capability {capability[0]}.{capability[1]} GPU"
    if pre.config_dequantize:
        return Runtime(True, "config.json sets dequantize: true", {}, explicit=True)
    kernels = _has_fp8_kernels(device_kind, capability)
    if pre.method == "fp8":
        if kernels is False:
            return Runtime(
                True,
                f"FP8 kernels need a CUDA GPU with compute capability >= 8.9 (L4, RTX 40xx, H100); on {where} "
                "transformers dequantizes FP8 to bf16",
                {"dequantize": True},
            )
        note = "" if kernels else " (needs compute capability >= 8.9)"
        # transformers 5.24 runs fine-grained FP8 through the hub kernel kernels-community/finegrained-fp8.
        return Runtime(False, f"FP8 kernels{note}, from the `kernels` package", {}, needs=(("kernels", "kernels"),))
    if pre.method == "compressed-tensors":
        if pre.float_weights and pre.bits == 8 and kernels is not False:
            note = "" if kernels else " (needs compute capability >= 8.9)"
            return Runtime(False, f"FP8 kernels{note}", {"use_optimized_inference": True})
        return Runtime(
            True,
            f"transformers has no kernels for compressed-tensors {pre.scheme} on {where}: it decompresses the "
            "weights to the model dtype on the first forward pass (vLLM keeps them compressed)",
            {"dequantize": True},
        )
    return Runtime(False, f"{pre.method} kernels", {})
