"""Every doctor finding code, its area and a short title. Codes are stable: never reuse or renumber one.

docs/doctor.md lists the same table (a test keeps them in sync), and `catalogue.Entry.doctor_check` points here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmbridge.doctor.findings import Area, Severity

__all__ = ["CODES", "CodeInfo", "area_of"]


@dataclass(frozen=True)
class CodeInfo:
    area: Area
    severity: Severity  # the usual severity; a few codes vary with the situation (see the docs)
    title: str


_E, _W, _I = Severity.ERROR, Severity.WARNING, Severity.INFO
_F, _T, _P = Area.FILES, Area.TOKENIZER, Area.PROCESSOR
_A, _R, _D = Area.ARCHITECTURE, Area.REMOTE_CODE, Area.DEPENDENCIES
_M, _V = Area.MEMORY, Area.ENVIRONMENT

CODES: dict[str, CodeInfo] = {
    # files & integrity
    "VB100": CodeInfo(_F, _E, "config.json missing"),
    "VB101": CodeInfo(_F, _E, "config.json unreadable or not a JSON object"),
    "VB102": CodeInfo(_F, _E, "no weight files"),
    "VB103": CodeInfo(_F, _E, "index names a shard that does not exist"),
    "VB104": CodeInfo(_F, _E, "safetensors header unreadable"),
    "VB105": CodeInfo(_F, _E, "shard size differs from what its header declares (truncated or padded)"),
    "VB106": CodeInfo(_F, _E, "model.safetensors.index.json unreadable"),
    "VB107": CodeInfo(_F, _E, "index lists tensors that no shard contains"),
    "VB108": CodeInfo(_F, _W, "index disagrees with the shard headers"),
    "VB109": CodeInfo(_F, _E, "several safetensors files but no index"),
    "VB110": CodeInfo(_F, _W, "stray safetensors file not named by the index"),
    "VB111": CodeInfo(_F, _W, "the same tensor in several shards"),
    "VB112": CodeInfo(_F, _E, "only pickle (.bin) weights"),
    "VB113": CodeInfo(_F, _E, "pickle weights hold objects torch's weights_only loader refuses"),
    "VB114": CodeInfo(_F, _I, "both .bin and safetensors weights"),
    "VB115": CodeInfo(_F, _E, "broken symlink or symlink loop"),  # a warning for files the loader never opens
    "VB116": CodeInfo(_F, _W, "GGUF files (llama.cpp/Ollama format)"),
    "VB117": CodeInfo(_F, _E, "tensors the architecture needs are in no shard"),
    "VB118": CodeInfo(_F, _E, "tensors whose shape differs from what config.json implies"),
    "VB119": CodeInfo(_F, _W, "tensors the architecture does not use"),
    # tokenizer & chat template
    "VB120": CodeInfo(_T, _E, "no tokenizer files"),
    "VB121": CodeInfo(_T, _E, "tokenizer or chat-template file unreadable"),
    "VB122": CodeInfo(_T, _W, "tokenizer_config.json missing"),
    "VB123": CodeInfo(_T, _E, "no chat template the model's loader uses"),
    # processors
    "VB130": CodeInfo(_P, _E, "no image processor config"),
    "VB131": CodeInfo(_P, _E, "processor class or type does not resolve in the installed transformers"),
    "VB132": CodeInfo(_P, _E, "old-style processor size keys the installed transformers rejects"),
    "VB133": CodeInfo(_P, _W, "video processor config missing (the family's repo ships one)"),
    "VB134": CodeInfo(_P, _E, "processor config unreadable"),
    # architecture & versions
    "VB200": CodeInfo(_A, _E, "model_type missing"),
    "VB201": CodeInfo(_A, _E, "model_type unknown to the installed transformers"),
    "VB202": CodeInfo(_A, _W, "architectures names a class transformers does not have"),
    "VB203": CodeInfo(_A, _W, "architectures disagrees with model_type"),
    "VB204": CodeInfo(_A, _I, "model kind and the Auto class to load it with"),
    "VB205": CodeInfo(_A, _E, "special-token ids in config.json differ from the tokenizer's"),
    "VB206": CodeInfo(_A, _E, "tokenizer ids beyond the model's vocab_size"),
    "VB207": CodeInfo(_A, _E, "vision-language config but no vision-tower weights"),
    "VB208": CodeInfo(_A, _E, "rotary (mrope) config inconsistent"),
    "VB209": CodeInfo(_A, _W, "generation stops on no token the chat template ends turns with"),
    "VB210": CodeInfo(_A, _I, "saved by a newer transformers than the one installed"),
    # remote code
    "VB300": CodeInfo(_R, _I, "no auto_map: trust_remote_code is not needed"),
    "VB301": CodeInfo(_R, _E, "remote code needed and not on the allowlist"),
    "VB302": CodeInfo(_R, _E, "auto_map points into another repository"),
    "VB303": CodeInfo(_R, _E, "auto_map names modules the folder lacks"),
    "VB304": CodeInfo(_R, _E, "remote code differs from its pins"),
    "VB305": CodeInfo(_R, _I, "remote code allowlisted and matching its pins"),
    "VB306": CodeInfo(_R, _I, "Python files present but unused (no auto_map)"),
    # dependencies
    "VB400": CodeInfo(_D, _E, "quantization package missing"),
    "VB401": CodeInfo(_D, _I, "pre-quantized checkpoint and its packages"),
    "VB402": CodeInfo(_D, _W, "FP8 checkpoint will be dequantized to bf16 (2× memory)"),
    "VB403": CodeInfo(_D, _E, "flash-attention requested but unusable"),
    "VB404": CodeInfo(_D, _E, "torchvision missing"),
    "VB405": CodeInfo(_D, _E, "accelerate missing"),
    "VB406": CodeInfo(_D, _W, "unknown quantization method"),
    "VB407": CodeInfo(_D, _I, "quantization group size and tensor-parallel sizes"),
    "VB408": CodeInfo(_D, _E, "torch or transformers missing"),
    "VB409": CodeInfo(_D, _E, "package the model's remote code needs is missing"),
    # memory
    "VB500": CodeInfo(_M, _I, "weights: bytes as stored and as loaded"),
    "VB501": CodeInfo(_M, _I, "KV cache per token and for the context"),
    "VB502": CodeInfo(_M, _I, "image tokens and vision-encoder memory"),
    "VB503": CodeInfo(_M, _I, "fits the device"),
    "VB504": CodeInfo(_M, _E, "weights alone do not fit the device"),
    "VB505": CodeInfo(_M, _W, "the requested workload does not fit the device"),
    "VB506": CodeInfo(_M, _I, "device memory unknown"),
    "VB507": CodeInfo(_M, _W, "images take more tokens than the context holds"),
    "VB508": CodeInfo(_M, _I, "memory not estimated"),
    "VB509": CodeInfo(_M, _I, "video tokens and vision-encoder memory per clip"),
    # environment
    "VB600": CodeInfo(_V, _E, "host path used inside a container"),
    "VB601": CodeInfo(_V, _E, "model path does not exist"),
    "VB602": CodeInfo(_V, _E, "permission denied"),
    "VB603": CodeInfo(_V, _I, "read-only folder (fine)"),
    "VB604": CodeInfo(_V, _E, "path is a file, not a folder"),
    "VB605": CodeInfo(_V, _E, "folder is empty"),
    "VB606": CodeInfo(_V, _E, "the model is in a subfolder"),
    # the doctor itself
    "VB900": CodeInfo(Area.DOCTOR, _W, "a check could not run"),
}


def area_of(code: str) -> Area:
    info = CODES.get(code)
    return info.area if info else Area.DOCTOR
