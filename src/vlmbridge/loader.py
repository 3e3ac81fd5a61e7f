"""The one loader: a model folder in, model + processor/tokenizer out, with the classes transformers resolves.

VLM or text LLM is decided by looking the config's `model_type` (or its `auto_map`) up in transformers' own
auto mappings — image-text-to-text first, then causal LM — never by guessing from names, and never
`AutoModelForCausalLM` for a VLM (the field report's core bug).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from vlmbridge.errors import (
    DeviceError,
    ModelLoadError,
    UnsafeWeightsError,
    UnsupportedModelError,
    VlmbridgeError,
)
from vlmbridge.families import MIN_TRANSFORMERS
from vlmbridge.folder import ModelFolder
from vlmbridge.quant.load import prepare_quantization
from vlmbridge.remote_code import check_remote_code

if TYPE_CHECKING:
    import torch

    from vlmbridge.settings import ModelSettings

__all__ = ["LoadOptions", "LoadedModel", "ModelKind", "load_model", "resolve_auto_class"]

log = logging.getLogger(__name__)

ModelKind = Literal["vlm", "text"]
_VLM_AUTO = "AutoModelForImageTextToText"
_TEXT_AUTO = "AutoModelForCausalLM"


@dataclass(frozen=True)
class LoadOptions:
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    attn_implementation: str = "sdpa"
    allow_pickle_weights: bool = False
    trust_remote_code: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    quantization: str = "none"  # none | bnb-8bit | bnb-4bit | auto (follow the memory plan on this device)
    allow_dequantize: bool = False  # load a pre-quantized checkpoint dequantized where the device lacks kernels
    context_length: int | None = None  # what `auto` plans for: one request of this context …
    max_pixels: int | None = None  # … with one image under this pixel budget

    @classmethod
    def from_settings(cls, model: ModelSettings) -> LoadOptions:
        return cls(
            dtype=model.dtype,
            device=model.device,
            attn_implementation=model.attn_implementation,
            allow_pickle_weights=model.allow_pickle_weights,
            trust_remote_code=model.trust_remote_code,
            quantization=model.quantization,
            allow_dequantize=model.allow_dequantize,
            context_length=model.context_length,
            max_pixels=model.max_pixels,
        )


@dataclass
class LoadedModel:
    """Everything the engine needs from a loaded folder."""

    folder: ModelFolder
    model: Any  # transformers.PreTrainedModel
    processor: Any | None  # transformers.ProcessorMixin for VLMs, None for text models
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    kind: ModelKind
    auto_class: str
    dtype: torch.dtype
    device: torch.device
    remote_code: bool
    load_seconds: float
    quantization: str = "none"  # none, bnb-8bit, bnb-4bit, or the checkpoint's own (fp8, "fp8 → dequantized", …)
    quantization_reason: str = ""

    @property
    def model_class(self) -> str:
        return type(self.model).__name__

    @property
    def processor_class(self) -> str | None:
        return type(self.processor).__name__ if self.processor is not None else None


def resolve_auto_class(folder: ModelFolder) -> tuple[ModelKind, str]:
    """(kind, Auto class name) from transformers' mappings for the folder's model_type or auto_map."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # type: ignore[attr-defined]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    auto_map = folder.auto_map
    if auto_map:
        if _VLM_AUTO in auto_map:
            return "vlm", _VLM_AUTO
        if _TEXT_AUTO in auto_map:
            return "text", _TEXT_AUTO
        raise UnsupportedModelError(
            f"auto_map in {folder.path / 'config.json'} offers {sorted(auto_map)} but no text-generation class "
            f"({_VLM_AUTO} or {_TEXT_AUTO})",
            fix="vlmbridge serves generative models only",
        )
    model_type = folder.model_type
    if not model_type:
        raise UnsupportedModelError(
            f"config.json in {folder.path} has no model_type",
            fix="re-download config.json from the model's repo",
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        import transformers

        need = MIN_TRANSFORMERS.get(model_type)
        fix = (
            f'pip install -U "transformers>={need}"'
            if need
            else "upgrade transformers (pip install -U transformers), or check model_type in config.json"
        )
        raise UnsupportedModelError(
            f"model_type {model_type!r} is unknown to the installed transformers {transformers.__version__}"
            + (f" (needs >= {need})" if need else ""),
            fix=fix,
        )
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vlm", _VLM_AUTO
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "text", _TEXT_AUTO
    raise UnsupportedModelError(
        f"model_type {model_type!r} is neither an image-text-to-text nor a causal language model",
        fix="vlmbridge serves generative models only",
    )


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but no CUDA GPU is visible", fix="use --device cpu")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible",
                fix=f"use --device cuda:0 … cuda:{torch.cuda.device_count() - 1}",
            )
        return torch.device("cuda", index)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' requested but MPS is not available", fix="use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}", fix="use auto, cpu, cuda or cuda:N")


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def supported_dtypes(device: torch.device) -> set[str]:
    import torch

    if device.type == "cuda":
        return {"fp32", "fp16"} | ({"bf16"} if torch.cuda.is_bf16_supported() else set())
    if device.type == "mps":
        return {"fp32", "fp16", "bf16"}
    # fp16 on CPU falls back to slow reference kernels for many ops; fp32 holds fp16 values exactly.
    return {"fp32", "bf16"}


def resolve_dtype(requested: str, stored: str | None, device: torch.device) -> torch.dtype:
    import torch

    supported = supported_dtypes(device)
    if requested == "auto":
        want = stored or "fp32"
        if want not in supported:
            nearest = {"bf16": "fp16", "fp16": "fp32"}.get(want, "fp32")
            chosen = nearest if nearest in supported else "fp32"
            log.info("stored dtype %s is not supported on %s; loading as %s", want, device, chosen)
            want = chosen
        return getattr(torch, _DTYPES[want])  # type: ignore[no-any-return]
    if requested not in _DTYPES:
        raise DeviceError(f"unknown dtype {requested!r}", fix="use auto, bf16, fp16 or fp32")
    if requested not in supported:
        alt = "fp16" if device.type == "cuda" else "fp32"
        raise DeviceError(f"{requested} is not supported on {device}", fix=f"use --dtype {alt} or --dtype auto")
    return getattr(torch, _DTYPES[requested])  # type: ignore[no-any-return]


def _weights_kwargs(folder: ModelFolder, allow_pickle: bool) -> dict[str, Any]:
    if folder.safetensors_files:
        return {"use_safetensors": True}
    if folder.pickle_weight_files:
        if not allow_pickle:
            names = ", ".join(f.name for f in folder.pickle_weight_files[:3])
            raise UnsafeWeightsError(
                f"{folder.path} has only pickle weights ({names}); pickle can run arbitrary code when loaded",
                fix="convert them to safetensors, or after reviewing the source pass --allow-pickle-weights",
            )
        return {"use_safetensors": False}
    raise ModelLoadError(
        f"{folder.path} has no weight files (*.safetensors or pytorch_model*.bin)",
        fix="download the weight shards into the folder",
        cause="weights-missing",
    )


def load_model(
    path: str | Any,
    options: LoadOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a model folder. Raises only VlmbridgeError subclasses (library failures become ModelLoadError)."""
    options = options or LoadOptions()
    say = progress or (lambda _stage: None)
    started = time.perf_counter()

    folder = path if isinstance(path, ModelFolder) else ModelFolder.open(path)
    remote = check_remote_code(folder, options.trust_remote_code)
    kind, auto_name = resolve_auto_class(folder)
    weights = _weights_kwargs(folder, options.allow_pickle_weights)

    say("importing torch and transformers")
    import transformers

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, folder.stored_dtype, device)
    auto_cls = getattr(transformers, auto_name)

    try:
        quant = prepare_quantization(
            folder,
            quantization=options.quantization,
            allow_dequantize=options.allow_dequantize,
            device=device,
            dtype=dtype,
            dtype_name=options.dtype,
            context=options.context_length,
            max_pixels=options.max_pixels,
            remote=remote,
            say=say,
        )
        say("loading processor" if kind == "vlm" else "loading tokenizer")
        processor = None
        if kind == "vlm":
            processor = transformers.AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                folder.path, trust_remote_code=remote
            )
            tokenizer = getattr(processor, "tokenizer", None)
            if getattr(processor, "image_processor", None) is None or tokenizer is None:
                raise ModelLoadError(
                    f"{folder.path}: {type(processor).__name__} has no image processor or tokenizer — "
                    "processor files are missing",
                    fix="add preprocessor_config.json (or processor_config.json) and the tokenizer files",
                    cause="processor-missing",
                )
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder.path, trust_remote_code=remote)

        as_quantized = "" if quant.label == "none" else f", {quant.label}"
        say(f"loading weights as {str(dtype).removeprefix('torch.')}{as_quantized} on {device}")
        load_kwargs: dict[str, Any] = dict(
            dtype=dtype,
            device_map={"": device},
            trust_remote_code=remote,
            output_loading_info=True,
            **weights,
            **quant.kwargs,
        )
        try:
            model, info = auto_cls.from_pretrained(
                folder.path, attn_implementation=options.attn_implementation, **load_kwargs
            )
        except ValueError as exc:
            # Architectures without an SDPA path (often remote code) still run with eager attention.
            if options.attn_implementation != "sdpa" or "does not support an attention implementation" not in str(exc):
                raise
            log.warning("%s does not support sdpa attention; using eager", folder.path)
            model, info = auto_cls.from_pretrained(folder.path, attn_implementation="eager", **load_kwargs)
        model.eval()
        _check_loading_info(folder, info)
    except VlmbridgeError:
        raise
    except Exception as exc:  # transformers raises anything from OSError to KeyError: classify it once here
        raise _classified(exc, folder) from exc

    elapsed = time.perf_counter() - started
    log.info(
        "loaded %s (%s via %s) from %s as %s (quantization: %s) on %s in %.2fs",
        type(model).__name__,
        kind,
        auto_name,
        folder.path,
        dtype,
        quant.label,
        device,
        elapsed,
    )
    return LoadedModel(
        folder=folder,
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        kind=kind,
        auto_class=auto_name,
        dtype=dtype,
        device=device,
        remote_code=remote,
        load_seconds=elapsed,
        quantization=quant.label,
        quantization_reason=quant.reason,
    )


def _check_loading_info(folder: ModelFolder, info: Mapping[str, Any]) -> None:
    # transformers fills missing tensors with random values and only logs it: a silently broken model.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        names = ", ".join((missing or [str(m[0]) for m in mismatched])[:3])
        raise ModelLoadError(
            f"{folder.path}: {len(missing)} tensors missing and {len(mismatched)} of the wrong shape for "
            f"{folder.architectures[0] if folder.architectures else 'this architecture'} (e.g. {names})",
            fix="the weights do not match config.json: re-download the checkpoint or check it was converted "
            "for this transformers version",
            cause="weights-mismatch",
        )
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s: %d tensors in the checkpoint are not used by the model", folder.path, len(unexpected))


def _classified(exc: Exception, folder: ModelFolder) -> ModelLoadError:
    from vlmbridge.catalogue import classify

    text = f"{type(exc).__name__}: {exc}"
    match = classify(text)
    first_line = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    if match is None:
        return ModelLoadError(
            f"loading {folder.path} failed: {first_line}",
            fix=f"run `vlmbridge doctor {folder.path}` for a full diagnosis",
            cause="unknown",
        )
    return ModelLoadError(
        f"loading {folder.path} failed: {match.cause} ({first_line})", fix=match.fix, cause=match.code
    )
