"""Memory: exact weight bytes, KV cache, image tokens and vision cost, total vs the device, and what would fit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from vlmbridge.doctor.context import Context
from vlmbridge.doctor.findings import Evidence, Finding, Severity
from vlmbridge.memory import (
    CUDA_CONTEXT_BYTES,
    Estimate,
    LoadOption,
    ModelGeometry,
    WeightStats,
    Workload,
    best_fit,
    estimate,
    estimate_options,
    format_bytes,
    geometry_from_config,
    max_context_that_fits,
    weight_stats,
)
from vlmbridge.plan import DEFAULT_CONTEXT_CAP
from vlmbridge.quant.formats import detect, runtime

__all__ = ["DEFAULT_CONTEXT_CAP", "check_memory"]


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _gb(n: int) -> str:
    return format_bytes(n)


def _gib(n: int) -> str:
    return format_bytes(n, binary=True)


def _chosen_option(ctx: Context, stats: WeightStats, geo: ModelGeometry, device_kind: str) -> LoadOption:
    pre = detect(ctx.config)
    if pre is not None:
        rt = runtime(pre, device_kind, ctx.budget.compute_capability)
        return "bf16" if rt.dequantized else "pre-quantized"  # dequantized: VB402 (FP8), or --allow-dequantize
    quantization = ctx.options.quantization
    if quantization == "auto":
        quantization = _auto_choice(ctx, stats, geo)
    if quantization in ("bnb-8bit", "bnb-4bit"):
        return quantization  # type: ignore[return-value]
    dtype = ctx.options.dtype
    if dtype in ("bf16", "fp16", "fp32"):
        return dtype  # type: ignore[return-value]
    return "as-stored"


def _auto_choice(ctx: Context, stats: WeightStats, geo: ModelGeometry) -> str:
    """What the loader's --quantization auto will pick: the plan for one request, as the loader makes it."""
    from vlmbridge.folder import ModelFolder
    from vlmbridge.plan import Checkpoint, PlanInputs, choose_quantization, make_plan

    opts = ctx.options
    checkpoint = Checkpoint(ModelFolder(ctx.path, ctx.config), stats, geo, None)
    inputs = PlanInputs(
        device=opts.device, gpu_memory=opts.gpu_memory, context=opts.context, max_pixels=opts.max_pixels
    )
    return choose_quantization(make_plan(checkpoint, inputs), opts.dtype)[0]


def check_memory(ctx: Context) -> Iterator[Finding]:
    headers = ctx.headers
    if not headers or any(isinstance(h, str) for h in headers.values()):
        why = "the safetensors headers are missing or unreadable" if headers or not ctx.names(".bin") else "pickle"
        yield Finding(
            "VB508",
            Severity.INFO,
            f"memory not estimated: {why} (weights are sized from the headers)",
            evidence=Evidence(value="no readable safetensors headers"),
        )
        return
    try:
        image = ctx.processor_section("image")
        geo = geometry_from_config(ctx.config, image[1] if image else None)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        yield Finding(
            "VB508",
            Severity.INFO,
            f"memory not estimated: {exc}",
            evidence=Evidence(file="config.json", value=str(exc)[:120]),
        )
        return
    stats = weight_stats(ctx.good_headers, ctx.quantization_config)
    opts = ctx.options
    workload = Workload(
        context=opts.context or min(geo.max_context, DEFAULT_CONTEXT_CAP),
        images=opts.images if geo.vision is not None else 0,
        batch=opts.batch,
        max_pixels=opts.max_pixels,
        videos=opts.videos if geo.vision is not None else 0,
        video_seconds=opts.video_seconds,
    )
    budget = ctx.budget
    device_kind = "cpu" if budget.kind == "cpu" else "cuda"
    option = _chosen_option(ctx, stats, geo, device_kind)
    chosen = estimate(stats, geo, workload, option, device_kind=device_kind)
    table = estimate_options(stats, geo, workload, device_kind=device_kind, budget=budget.free)
    ctx.facts["memory"] = _facts(stats, geo, workload, chosen, table, budget.free, budget.name, budget.kind)

    stored = ", ".join(f"{d} {_gb(n)}" for d, n in sorted(stats.bytes_by_dtype.items(), key=lambda kv: -kv[1]))
    yield Finding(
        "VB500",
        Severity.INFO,
        f"weights: {_gb(stats.stored_bytes)} as stored ({stored}; {_count(stats.params)} parameters in "
        f"{len(headers)} file(s)); {_gb(chosen.weights)} as loaded ({option}, computing in {chosen.compute_dtype})",
        evidence=Evidence(file=next(iter(headers)), value=f"{stats.tensors} tensors"),
    )
    yield Finding(
        "VB501",
        Severity.INFO,
        f"KV cache: {_gib(chosen.kv_per_token)} per token ({chosen.compute_dtype}; {geo.kv_layers} layers × "
        f"{geo.kv_heads} KV heads × {geo.head_dim}) → {_gib(chosen.kv_cache)} for {workload.context} tokens × "
        f"batch {workload.batch}",
        evidence=Evidence(file="config.json", value=f"max_position_embeddings={geo.max_context}"),
    )
    yield from _vision_findings(geo, workload, chosen)
    yield from _fit_findings(ctx, stats, geo, workload, chosen, table)


def _worst_tokens(geo: ModelGeometry, workload: Workload) -> int:
    """Image tokens of the largest image the pixel budget lets through."""
    v = geo.vision
    if v is None:
        return 0
    cap = min(v.max_pixels, workload.max_pixels) if workload.max_pixels else v.max_pixels
    return cap // (v.patch_size**2 * v.merge_size**2)


def _vision_findings(geo: ModelGeometry, workload: Workload, chosen: Estimate) -> Iterator[Finding]:
    v = geo.vision
    if v is None:
        return
    w, h = workload.image_size
    worst = _worst_tokens(geo, workload)
    budget = f"--max-pixels {workload.max_pixels}" if workload.max_pixels else f"the processor's {v.max_pixels}"
    yield Finding(
        "VB502",
        Severity.INFO,
        f"images: a {w}×{h} image → {chosen.image_tokens} image tokens (up to {worst} at {budget} pixels); "
        f"vision encoder ≈ {_gb(chosen.vision_activations)} for {workload.images} image(s) × batch {workload.batch}",
        evidence=Evidence(value=f"patch {v.patch_size}, merge {v.merge_size}, pixels {v.min_pixels}…{v.max_pixels}"),
    )
    if workload.videos:
        yield Finding(
            "VB509",
            Severity.INFO,
            f"videos: a {workload.video_seconds:g} s clip at {workload.video_fps:g} fps → {workload.video_frames} "
            f"frames (≤ {workload.video_max_frames}) of ≤ {workload.video_max_pixels} pixels → {chosen.video_tokens} "
            f"video tokens each; {workload.videos} clip(s) × batch {workload.batch} are in the vision estimate",
            evidence=Evidence(value=f"--videos {workload.videos} --video-seconds {workload.video_seconds:g}"),
        )
    if workload.images and worst * workload.images > workload.context:
        need = workload.context // max(workload.images, 1) // 2  # leave half the context for text
        pixels = max(need, 1) * v.patch_size**2 * v.merge_size**2
        yield Finding(
            "VB507",
            Severity.WARNING,
            f"{workload.images} large image(s) can take {worst * workload.images} tokens, more than the "
            f'{workload.context}-token context ("decoder prompt is longer than the maximum model length")',
            fix=f"cap the pixel budget: --max-pixels {pixels} (≈{need} tokens per image), or raise --context",
            evidence=Evidence(value=f"{worst} tokens per image at {budget}"),
        )


def _fit_findings(
    ctx: Context,
    stats: WeightStats,
    geo: ModelGeometry,
    workload: Workload,
    chosen: Estimate,
    table: list[Estimate],
) -> Iterator[Finding]:
    budget = ctx.budget
    device_kind = "cpu" if budget.kind == "cpu" else "cuda"
    where = f"{budget.name} ({budget.detail})" if budget.detail else budget.name
    parts = (
        f"weights {_gb(chosen.weights)} + KV {_gb(chosen.kv_cache)} + activations "
        f"{_gb(chosen.lm_activations + chosen.vision_activations)} + overhead {_gb(chosen.overhead)}"
    )
    evidence = Evidence(value=f"free {budget.free} bytes" if budget.free is not None else budget.detail)
    if budget.free is None:
        yield Finding(
            "VB506",
            Severity.INFO,
            f"device memory unknown ({where}): needs {_gb(chosen.total)} ({parts})",
            fix="pass --gpu-memory SIZE (e.g. 24GiB) to check the fit",
            evidence=evidence,
        )
        return
    free = budget.free
    if chosen.total <= free:
        yield Finding(
            "VB503",
            Severity.INFO,
            f"fits: needs {_gb(chosen.total)} ({parts}) of {_gb(free)} free on {where}",
            evidence=evidence,
        )
        return
    alternative = best_fit(table, free)
    suggestions = []
    if alternative is not None and alternative.option != chosen.option:
        suggestions.append(f"load as {alternative.option} ({_gb(alternative.total)} in all)")
    shorter = max_context_that_fits(stats, geo, workload, chosen.option, free, device_kind=device_kind)
    if shorter >= 1024:
        suggestions.append(f"--context {shorter}")
    if workload.images and workload.max_pixels is None and geo.vision is not None:
        smaller = estimate(
            stats, geo, replace(workload, max_pixels=1024 * 1024), chosen.option, device_kind=device_kind
        )
        if smaller.total <= free:
            suggestions.append("--max-pixels 1048576")
    fix = "; or ".join(suggestions) if suggestions else "use a smaller model or a device with more memory"
    runtime = CUDA_CONTEXT_BYTES if device_kind == "cuda" else 0
    if chosen.weights + runtime > free:
        yield Finding(
            "VB504",
            Severity.ERROR,
            f"does not fit: the weights alone ({_gb(chosen.weights)} as {chosen.option}) exceed the {_gb(free)} "
            f'free on {where} ("CUDA out of memory")',
            fix=fix,
            evidence=evidence,
        )
    else:
        yield Finding(
            "VB505",
            Severity.WARNING,
            f"the requested workload does not fit: needs {_gb(chosen.total)} ({parts}), {_gb(free)} free on {where}",
            fix=fix,
            evidence=evidence,
        )


def _facts(
    stats: WeightStats,
    geo: ModelGeometry,
    workload: Workload,
    chosen: Estimate,
    table: list[Estimate],
    free: int | None,
    device: str,
    device_kind: str,
) -> dict[str, object]:
    return {
        "weights_stored_bytes": stats.stored_bytes,
        "params": stats.params,
        "stored_dtype": stats.stored_float,
        "quantized": stats.quantized,
        "kv_bytes_per_token": chosen.kv_per_token,
        "image_tokens_per_image": chosen.image_tokens,
        "workload": {
            "context": workload.context,
            "images": workload.images,
            "batch": workload.batch,
            "max_pixels": workload.max_pixels,
            "image_size": list(workload.image_size),
            "videos": workload.videos,
            "video_seconds": workload.video_seconds,
            "video_frames": workload.video_frames,
        },
        "video_tokens_per_video": chosen.video_tokens,
        "device": {"name": device, "kind": device_kind, "free_bytes": free},
        "chosen": chosen.to_dict(),
        "options": [e.to_dict() for e in table],
        "max_image_tokens": _worst_tokens(geo, workload),
    }
