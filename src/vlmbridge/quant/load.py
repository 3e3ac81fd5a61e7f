"""The loader's quantization step: from the folder and `LoadOptions` to the extra `from_pretrained` arguments.

- not pre-quantized: `--quantization none|bnb-8bit|bnb-4bit`, or `auto`, which asks `vlmbridge.plan` on the real
  device and logs why it chose;
- pre-quantized (config.json `quantization_config`): the packages it needs must be installed, and where the device
  has no kernels for the format (FP8 below compute capability 8.9, compressed-tensors int formats) the load is
  refused unless `allow_dequantize` — transformers would otherwise dequantize it silently, at 2–4× the memory.

Every refusal is a QuantizationError with the exact fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmbridge.errors import ModelFolderError, QuantizationError
from vlmbridge.folder import ModelFolder, read_safetensors_header
from vlmbridge.memory import format_bytes, weight_stats
from vlmbridge.quant.formats import BnbMethod, PreQuantization, QuantizationName, Runtime, detect, installed, runtime

if TYPE_CHECKING:
    import torch

__all__ = ["BNB_SKIP", "QuantizedLoad", "bnb_config", "prepare_quantization", "quiet_bitsandbytes"]

log = logging.getLogger(__name__)

_BNB_PACKAGES = (("bitsandbytes", "bitsandbytes"), ("accelerate", "accelerate"))
# Kept in bf16, as the public quantized Qwen-VL repos keep them: the output head, and the vision tower (6-7 % of the
# weights, sensitive to quantization; bitsandbytes' CPU nf4 kernel also fails on layers narrower than 64).
BNB_SKIP = ("lm_head", "model.visual", "visual")
# bitsandbytes logs these on every 8-bit matmul / at import on AVX512-BF16 CPUs (suggesting a kernel download
# from the hub); the fallback paths work, and the repeats would bury the server's own log.
_NOISY_BNB = {
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


@dataclass(frozen=True)
class QuantizedLoad:
    """What the loader passes on: `label` for LoadedModel.quantization, `kwargs` for from_pretrained."""

    label: str
    reason: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' per-call log lines (idempotent: one filter per logger)."""
    for name, prefixes in _NOISY_BNB.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


def _not_installed(pips: list[str]) -> str:
    return f"{' and '.join(pips)}, which {'is' if len(pips) == 1 else 'are'} not installed"


def _check_bnb(method: str, device: torch.device) -> None:
    absent = [pip for module, pip in _BNB_PACKAGES if not installed(module)]
    if absent:
        raise QuantizationError(
            f"{method} needs {_not_installed(absent)}",
            fix=f"pip install {' '.join(absent)}  (or pip install 'vlmbridge[quant]')",
        )
    quiet_bitsandbytes()
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # a build for another CUDA fails here with anything from OSError to RuntimeError
        raise QuantizationError(
            f"bitsandbytes fails to import ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})",
            fix="pip install -U bitsandbytes (a build matching your torch and CUDA)",
        ) from None
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})  # bitsandbytes < 0.45 ran on CUDA only
    if device.type not in supported:
        raise QuantizationError(
            f"{method} on {device}: the installed bitsandbytes {getattr(bnb, '__version__', '?')} has no "
            f"{device.type} backend (it supports {', '.join(sorted(supported))})",
            fix="pip install -U bitsandbytes (recent releases have a CPU backend; 0.50 is tested), or load on a "
            "CUDA GPU",
        )


def bnb_config(method: BnbMethod, compute_dtype: torch.dtype, device: torch.device) -> Any:
    """transformers.BitsAndBytesConfig for int8 or nf4 (one fp32 absmax per 64 weights: what the estimate counts)."""
    _check_bnb(method, device)
    from transformers import BitsAndBytesConfig

    if method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(BNB_SKIP))  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=list(BNB_SKIP),
    )


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def _sizes(folder: ModelFolder) -> str:
    """'10.70 GB as stored, about 17.53 GB dequantized to bf16' from the headers ('' if unreadable)."""
    try:
        stats = weight_stats((read_safetensors_header(p) for p in folder.safetensors_files), folder.quantization_config)
    except (OSError, ValueError):
        return ""
    return f" ({format_bytes(stats.stored_bytes)} as stored, about {format_bytes(stats.params * 2)} dequantized)"


def _pre_quantized(
    folder: ModelFolder, pre: PreQuantization, requested: str, allow: bool, device: torch.device, remote: bool
) -> QuantizedLoad:
    if requested in ("bnb-8bit", "bnb-4bit"):
        raise QuantizationError(
            f"{folder.path} is already quantized ({pre.method}, {pre.scheme}); --quantization {requested} cannot "
            "quantize it again",
            fix="use --quantization auto or none, or start from the bf16 checkpoint",
        )
    absent = pre.missing
    if absent:
        raise QuantizationError(
            f"{folder.path}: this {pre.method} checkpoint needs {_not_installed(absent)}",
            fix=f"pip install {' '.join(absent)}",
        )
    if not pre.known:
        return QuantizedLoad(pre.method, "a quantization method vlmbridge does not know: left to transformers")
    if pre.method == "bitsandbytes":
        _check_bnb(f"this bitsandbytes ({pre.scheme}) checkpoint", device)
    rt = runtime(pre, device.type, _capability(device))
    if rt.dequantized and not rt.explicit and not allow:
        raise QuantizationError(
            f"{folder.path}: {rt.reason}{_sizes(folder)}; refusing to dequantize silently",
            fix=_dequantize_fix(pre),
        )
    if not rt.dequantized and rt.missing:
        if not allow:
            raise QuantizationError(
                f"{folder.path}: {rt.reason} needs {_not_installed(rt.missing)}",
                fix=f"pip install {' '.join(rt.missing)} (it fetches the kernel from the Hub on first use), or pass "
                "--allow-dequantize to load it dequantized",
            )
        rt = Runtime(True, f"{rt.reason} would need {_not_installed(rt.missing)}", {"dequantize": True})
    label = f"{pre.method} → dequantized" if rt.dequantized else pre.method
    if rt.dequantized:
        log.warning("loading %s dequantized (--allow-dequantize): %s%s", folder.path, rt.reason, _sizes(folder))
    kwargs = _config_overrides(folder, rt, remote) if rt.overrides else {}
    return QuantizedLoad(label, rt.reason, kwargs)


def _dequantize_fix(pre: PreQuantization) -> str:
    if pre.method == "compressed-tensors":
        return (
            "serve it with vLLM (which keeps it compressed), use a bnb-4bit/bnb-8bit load of the bf16 checkpoint, "
            "or pass --allow-dequantize to load it dequantized anyway"
        )
    return (
        "use a GPU with compute capability >= 8.9 (L4, RTX 40xx, H100), the bf16 checkpoint (with --quantization "
        "bnb-8bit/bnb-4bit if it is too big), or pass --allow-dequantize to load it dequantized anyway"
    )


def _config_overrides(folder: ModelFolder, rt: Runtime, remote: bool) -> dict[str, Any]:
    # Editing the config's own quantization_config keeps transformers from warning about a second one passed in.
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder.path, trust_remote_code=remote)
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict):
        config.quantization_config = {**qc, **rt.overrides}
    elif qc is not None:
        for key, value in rt.overrides.items():
            setattr(qc, key, value)
    else:
        return {}
    return {"config": config}


def _auto(
    folder: ModelFolder, device: torch.device, dtype_name: str, context: int | None, max_pixels: int | None
) -> tuple[QuantizationName, str]:
    from vlmbridge.plan import PlanInputs, choose_quantization, make_plan

    try:
        plan = make_plan(folder, PlanInputs(device=str(device), context=context, max_pixels=max_pixels))
    except ModelFolderError as exc:
        return "none", f"no plan ({exc.message}): loading unquantized"
    return choose_quantization(plan, dtype_name)


def prepare_quantization(
    folder: ModelFolder,
    *,
    quantization: str,
    allow_dequantize: bool,
    device: torch.device,
    dtype: torch.dtype,
    dtype_name: str,
    context: int | None = None,
    max_pixels: int | None = None,
    remote: bool = False,
    say: Callable[[str], None] | None = None,
) -> QuantizedLoad:
    """Decide the quantization of this load. Raises QuantizationError with the fix when it cannot happen."""
    if quantization not in ("auto", "none", "bnb-8bit", "bnb-4bit"):
        raise QuantizationError(f"unknown quantization {quantization!r}", fix="use auto, none, bnb-8bit or bnb-4bit")
    pre = detect(folder.config)
    if pre is not None:
        return _pre_quantized(folder, pre, quantization, allow_dequantize, device, remote)
    chosen: QuantizationName = quantization  # type: ignore[assignment]
    reason = ""
    if quantization == "auto":
        chosen, reason = _auto(folder, device, dtype_name, context, max_pixels)
        # A quantized load trades quality for memory: say so where people look, not only at INFO.
        log.log(
            logging.WARNING if chosen != "none" else logging.INFO, "--quantization auto chose %s: %s", chosen, reason
        )
        if say is not None:
            say(f"--quantization auto: {chosen} ({reason})")
    if chosen == "bnb-8bit" or chosen == "bnb-4bit":
        return QuantizedLoad(chosen, reason, {"quantization_config": bnb_config(chosen, dtype, device)})
    return QuantizedLoad("none", reason)
