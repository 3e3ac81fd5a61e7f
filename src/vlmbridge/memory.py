"""Memory estimator shared by `vlmbridge doctor` and `vlmbridge plan`: what a checkpoint needs, and what fits.

Weights come from safetensors headers (exact bytes, no tensor data read), the KV cache and activations from the
config (`vlmbridge.geometry`), the budget from the device (`vlmbridge.budget`); this module re-exports both, so
`vlmbridge.memory` is the one import for callers. Nothing here imports torch.

    total = weights + KV cache + LM prefill activations + vision activations + overhead
    overhead = OVERHEAD_FRACTION × (the rest) + CUDA context (on GPUs)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast

from vlmbridge.budget import DeviceBudget, device_budget, format_bytes, parse_size
from vlmbridge.folder import HEADER_FLOAT_DTYPES, SafetensorsHeader
from vlmbridge.geometry import (
    ModelGeometry,
    VisionGeometry,
    geometry_from_config,
    image_tokens,
    kv_bytes_per_token,
    smart_resize,
)

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "OPTIONS",
    "OVERHEAD_FRACTION",
    "DeviceBudget",
    "Estimate",
    "LoadOption",
    "ModelGeometry",
    "VisionGeometry",
    "WeightStats",
    "Workload",
    "best_fit",
    "device_budget",
    "estimate",
    "estimate_options",
    "format_bytes",
    "geometry_from_config",
    "image_tokens",
    "kv_bytes_per_token",
    "max_context_that_fits",
    "parse_size",
    "smart_resize",
    "weight_stats",
]

LoadOption = Literal["as-stored", "bf16", "fp16", "fp32", "bnb-8bit", "bnb-4bit", "pre-quantized"]
# Best quality first: `best_fit` walks this order.
OPTIONS: tuple[LoadOption, ...] = ("as-stored", "bf16", "fp16", "fp32", "bnb-8bit", "bnb-4bit", "pre-quantized")

# Qwen's own guidance: real use needs about 1.2× the theoretical sum (allocator slack, temporaries).
OVERHEAD_FRACTION = 0.2
# The CUDA context and cuBLAS/cuDNN workspaces, resident before the first tensor.
CUDA_CONTEXT_BYTES = 512 * 1024**2
# bitsandbytes nf4 keeps one fp32 absmax per block of 64 weights; int8 one fp32 scale per output row.
_NF4_BLOCK = 64
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_QUANT_HEADER_DTYPES = {"F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "F6_E3M2"}
# Packed-int quantized weights (GPTQ/AWQ/compressed-tensors) hold several weights per int32.
_PACKED_SUFFIXES = (".qweight", ".weight_packed")
_QUANT_AUX_SUFFIXES = (".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_scale_inv", ".input_scale",
                       ".weight_zero_point", ".weight_shape", ".weight_global_scale",
                       # bitsandbytes' saved quantization state (nf4 absmax/quant_map, int8 row scales)
                       ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                       ".quant_state.bitsandbytes__fp4", ".SCB", ".weight_format")  # fmt: skip
_VISION_PREFIXES = ("visual.", "model.visual.", "vision_tower.", "model.vision_tower.", "vision_model.")


# --- weights -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightStats:
    """What the safetensors headers say about the weights (exact; no tensor data is read)."""

    stored_bytes: int
    params: int  # logical parameters: packed quantized weights counted unpacked, scales/zeros not counted
    linear_params: int  # 2-D Linear weights
    linear_rows: int  # their output rows (one int8 scale each)
    vision_params: int
    tensors: int
    bytes_by_dtype: Mapping[str, int]
    stored_float: str | None  # bf16/fp16/fp32: the dominant floating dtype as stored
    quantized: bool  # FP8/FP4 or packed-int tensors present: a pre-quantized checkpoint
    vision_linear_params: int = 0  # the vision tower's share of linear_params / linear_rows
    vision_linear_rows: int = 0

    @property
    def bnb_params(self) -> int:
        """What bitsandbytes quantizes: the language model's linear weights (the loader keeps the ViT in bf16)."""
        return self.linear_params - self.vision_linear_params

    @property
    def bnb_rows(self) -> int:
        return self.linear_rows - self.vision_linear_rows

    @property
    def other_params(self) -> int:
        return self.params - self.bnb_params


def _is_linear_weight(name: str, shape: Sequence[int]) -> bool:
    # Embeddings and the output head stay unquantized under bitsandbytes; norms/biases are 1-D, convs 4/5-D.
    return (
        len(shape) == 2
        and name.endswith(".weight")
        and "embed" not in name
        and not name.startswith("lm_head")
        and ".lm_head" not in name
    )


def weight_stats(
    headers: Iterable[SafetensorsHeader], quantization_config: Mapping[str, Any] | None = None
) -> WeightStats:
    """Sum the tensors of every shard header. Tensors named in several shards are counted once."""
    bits = _quant_bits(quantization_config)
    per_int32 = 32 // bits if bits in (2, 4, 8) else 8
    # bitsandbytes nf4/fp4 checkpoints store two 4-bit weights per uint8 of `.weight`.
    qc = quantization_config or {}
    bnb4 = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    seen: set[str] = set()
    stored = params = linear = rows = vision = vision_linear = vision_rows = 0
    by_dtype: dict[str, int] = {}
    quantized = False
    for header in headers:
        for name, (dtype, shape, (begin, end)) in header.tensors.items():
            if name in seen:
                continue
            seen.add(name)
            nbytes = end - begin
            stored += nbytes
            by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
            numel = math.prod(shape)
            if dtype in _QUANT_HEADER_DTYPES:
                quantized = True
            if name.endswith(_PACKED_SUFFIXES):
                quantized = True
                numel *= per_int32
            elif bnb4 and dtype == "U8" and name.endswith(".weight"):
                numel *= 2
            elif name.endswith(_QUANT_AUX_SUFFIXES):
                continue
            params += numel
            is_vision = name.startswith(_VISION_PREFIXES)
            if _is_linear_weight(name, shape) or name.endswith(_PACKED_SUFFIXES) or (bnb4 and dtype == "U8"):
                linear += numel
                rows += shape[0] if shape else 0
                if is_vision:
                    vision_linear += numel
                    vision_rows += shape[0] if shape else 0
            if is_vision:
                vision += numel
    floats = {HEADER_FLOAT_DTYPES[d]: n for d, n in by_dtype.items() if d in HEADER_FLOAT_DTYPES}
    return WeightStats(
        stored_bytes=stored,
        params=params,
        linear_params=linear,
        linear_rows=rows,
        vision_params=vision,
        tensors=len(seen),
        bytes_by_dtype=by_dtype,
        stored_float=max(floats, key=lambda k: floats[k]) if floats else None,
        quantized=quantized or bool(quantization_config),
        vision_linear_params=vision_linear,
        vision_linear_rows=vision_rows,
    )


def _quant_bits(qc: Mapping[str, Any] | None) -> int | None:
    """Bits per packed weight: `bits` (GPTQ/AWQ) or the first compressed-tensors weight group's `num_bits`."""
    if not qc:
        return None
    if isinstance(qc.get("bits"), int):
        return int(qc["bits"])
    groups = qc.get("config_groups")
    for group in groups.values() if isinstance(groups, Mapping) else ():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if isinstance(weights, Mapping) and isinstance(weights.get("num_bits"), int):
            return int(weights["num_bits"])
    return None


# --- estimate ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What the model must hold at once: `batch` sequences of `context` tokens, each with `images` images of
    `image_size` (width, height) resized under `max_pixels` (None = the processor's own limit)."""

    context: int
    images: int = 1
    batch: int = 1
    max_pixels: int | None = None
    image_size: tuple[int, int] = (1920, 1080)
    # `videos` clips of `video_seconds` each, sampled as the server does (fps, max_frames, per-frame pixel budget)
    videos: int = 0
    video_seconds: float = 10.0
    video_fps: float = 2.0
    video_max_frames: int = 32
    video_max_pixels: int = 640 * 360
    video_size: tuple[int, int] = (1280, 720)

    @property
    def video_frames(self) -> int:
        """Frames sampled per clip (the server's rule: fps over the clip, at most max_frames, at least one)."""
        return max(1, min(self.video_max_frames, math.floor(self.video_seconds * self.video_fps + 1e-9)))


@dataclass(frozen=True)
class Estimate:
    option: LoadOption
    compute_dtype: str
    weights: int
    kv_cache: int
    kv_per_token: int
    image_tokens: int  # per image
    vision_activations: int
    lm_activations: int
    overhead: int
    total: int
    fits: bool | None = None  # None while no budget is known
    note: str = ""
    video_tokens: int = 0  # per clip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bnb_quantized_bytes(stats: WeightStats, option: LoadOption) -> int:
    if option == "bnb-8bit":
        return stats.bnb_params + stats.bnb_rows * 4
    return stats.bnb_params // 2 + math.ceil(stats.bnb_params / _NF4_BLOCK) * 4  # bnb-4bit


def _option_weights(stats: WeightStats, option: LoadOption) -> int:
    if option in ("as-stored", "pre-quantized"):
        return stats.stored_bytes
    if option in _DTYPE_BYTES:
        # Integer buffers keep their size; every parameter takes the requested float width.
        ints = (
            0
            if stats.quantized
            else sum(n for d, n in stats.bytes_by_dtype.items() if d.startswith(("I", "U", "BOOL")))
        )
        return stats.params * _DTYPE_BYTES[option] + ints
    return _bnb_quantized_bytes(stats, option) + stats.other_params * 2


def _compute_dtype(stats: WeightStats, option: LoadOption, device_kind: str) -> str:
    if option in _DTYPE_BYTES:
        return option
    if option in ("as-stored", "pre-quantized") and not stats.quantized:
        stored = stats.stored_float or "fp32"
        return "fp32" if stored == "fp16" and device_kind == "cpu" else stored
    return "bf16"


def estimate(
    stats: WeightStats, geo: ModelGeometry, workload: Workload, option: LoadOption, *, device_kind: str = "cuda"
) -> Estimate:
    """Memory for `option` under `workload` on a `device_kind` ("cuda" adds the CUDA context)."""
    dtype = _compute_dtype(stats, option, device_kind)
    act = _DTYPE_BYTES[dtype]
    weights = _option_weights(stats, option)
    if option == "as-stored" and not stats.quantized and dtype != (stats.stored_float or dtype):
        weights = _option_weights(stats, cast(LoadOption, dtype))  # fp16 on the CPU loads as fp32
    per_token = kv_bytes_per_token(geo, act)
    kv = per_token * workload.context * workload.batch
    # Prefill peak inside one decoder layer: residual + normed input (2·hidden) and the MLP's gate/up/product.
    lm_act = workload.context * workload.batch * (2 * geo.hidden + 3 * geo.intermediate) * act
    tokens = vision_act = 0
    if geo.vision is not None and workload.images > 0:
        v = geo.vision
        tokens = image_tokens(*workload.image_size, v, workload.max_pixels)
        patches = tokens * v.merge_size**2
        pixel_row = v.in_channels * v.temporal_patch_size * v.patch_size**2 * 4  # fp32 pixel_values
        if device_kind == "cpu":  # preprocessing's own fp32 copy of the image shares the RAM (measured: 2×)
            pixel_row *= 2
        per_patch = (4 * v.hidden + 3 * v.intermediate) * act + pixel_row
        merged = tokens * v.out_hidden * (1 + v.deepstack_layers) * act
        vision_act = (patches * per_patch + merged) * workload.images * workload.batch
    video_tokens = 0
    if geo.vision is not None and workload.videos > 0:
        video_tokens, clip_act = _video_estimate(geo.vision, workload, act, device_kind)
        vision_act += clip_act * workload.videos * workload.batch
    subtotal = weights + kv + lm_act + vision_act
    overhead = int(subtotal * OVERHEAD_FRACTION) + (CUDA_CONTEXT_BYTES if device_kind == "cuda" else 0)
    return Estimate(
        option=option,
        compute_dtype=dtype,
        weights=weights,
        kv_cache=kv,
        kv_per_token=per_token,
        image_tokens=tokens,
        vision_activations=vision_act,
        lm_activations=lm_act,
        overhead=overhead,
        total=subtotal + overhead,
        video_tokens=video_tokens,
    )


def _video_estimate(v: Any, workload: Workload, act: int, device_kind: str) -> tuple[int, int]:
    """(tokens, bytes) of one clip: frames go in temporal pairs, each pair priced like an image at the per-frame
    budget; the sampled frames themselves are held decoded (uint8 RGB, reduced to 2× the budget) meanwhile."""
    frames = workload.video_frames
    pairs = -(-frames // v.temporal_patch_size)
    per_pair = image_tokens(*workload.video_size, v, workload.video_max_pixels)
    tokens = pairs * per_pair
    patches = tokens * v.merge_size**2
    pixel_row = v.in_channels * v.temporal_patch_size * v.patch_size**2 * 4
    if device_kind == "cpu":
        pixel_row *= 2
    per_patch = (4 * v.hidden + 3 * v.intermediate) * act + pixel_row
    merged = tokens * v.out_hidden * (1 + v.deepstack_layers) * act
    w, h = workload.video_size
    decoded = frames * min(w * h, 2 * workload.video_max_pixels) * 3
    return tokens, patches * per_patch + merged + decoded


def estimate_options(
    stats: WeightStats,
    geo: ModelGeometry,
    workload: Workload,
    *,
    device_kind: str = "cuda",
    budget: int | None = None,
) -> list[Estimate]:
    """Every loading option that applies to this checkpoint, best quality first, with `fits` against `budget`."""
    if stats.quantized:
        options: tuple[LoadOption, ...] = ("pre-quantized", "bf16")
    else:
        options = ("as-stored", "bf16", "fp16", "bnb-8bit", "bnb-4bit")
    out = []
    for option in options:
        est = estimate(stats, geo, workload, option, device_kind=device_kind)
        note = ""
        if option == "fp16" and device_kind == "cpu":
            note = "not supported on CPU: the loader refuses --dtype fp16 there (use bf16 or fp32)"
        elif option == "bf16" and stats.quantized:
            note = "dequantized to bf16 (what transformers does for FP8 without a compute-capability 8.9 GPU)"
        out.append(replace(est, fits=None if budget is None else est.total <= budget, note=note))
    return out


def best_fit(estimates: Sequence[Estimate], budget: int) -> Estimate | None:
    """The first (best-quality) estimate whose total fits the budget, skipping options the device can't run."""
    for est in estimates:
        if est.total <= budget and "not supported" not in est.note:
            return est
    return None


def max_context_that_fits(
    stats: WeightStats,
    geo: ModelGeometry,
    workload: Workload,
    option: LoadOption,
    budget: int,
    *,
    device_kind: str = "cuda",
) -> int:
    """The longest context (multiple of 256, at least the images' tokens) that fits; 0 if none does."""

    def fits(context: int) -> bool:
        est = estimate(stats, geo, replace(workload, context=context), option, device_kind=device_kind)
        return est.total <= budget

    lo, hi = 0, max(workload.context, geo.max_context) // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * 256):
            lo = mid
        else:
            hi = mid - 1
    return lo * 256
