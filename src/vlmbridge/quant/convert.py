"""`vlmbridge quantize`: write a bitsandbytes-quantized copy of a checkpoint that loads without re-quantizing.

The copy is made the way it will be used: loaded through the one loader with `--quantization bnb-*`, saved with
transformers' own `save_pretrained` (which records `quantization_config` in config.json and stores the int8 /
packed-nf4 tensors with their scales), into a staging folder renamed into place only when complete.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmbridge.errors import ModelFolderError, QuantizationError
from vlmbridge.folder import ModelFolder, read_safetensors_header
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.memory import weight_stats
from vlmbridge.quant.formats import BnbMethod, detect

__all__ = ["QuantizeResult", "quantize_checkpoint"]

# Files people keep beside the weights that save_pretrained does not write.
_KEEP = ("README.md", "LICENSE", "LICENSE.txt", "NOTICE", "NOTICE.txt")


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    method: BnbMethod
    scheme: str  # as the copy's config.json declares it: "nf4" or "int8"
    source_bytes: int
    out_bytes: int
    device: str


def _stored_bytes(folder: Path) -> int:
    headers = [read_safetensors_header(p) for p in sorted(folder.glob("*.safetensors"))]
    return weight_stats(headers).stored_bytes


def _check_paths(source: ModelFolder, out: Path, overwrite: bool) -> None:
    if out.resolve() == source.path:
        raise ModelFolderError(f"{out} is the source folder", fix="write the quantized copy to another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ModelFolderError(f"{out} exists and is not empty", fix="choose a new folder, or pass --overwrite")
        if not out.is_dir():
            raise ModelFolderError(f"{out} is a file", fix="choose a folder path")


def quantize_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    method: BnbMethod,
    *,
    device: str = "auto",
    overwrite: bool = False,
    trust_remote_code: dict[str, dict[str, str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize `model_dir` with bitsandbytes on `device` and save it to `out`. Raises VlmbridgeError subclasses."""
    say = progress or (lambda _stage: None)
    source = ModelFolder.open(model_dir)
    target = Path(out).expanduser()
    pre = detect(source.config)
    if pre is not None:
        raise QuantizationError(
            f"{source.path} is already quantized ({pre.method}, {pre.scheme})",
            fix="quantize the bf16 (or fp32) checkpoint instead",
        )
    _check_paths(source, target, overwrite)
    options = LoadOptions(device=device, quantization=method, trust_remote_code=trust_remote_code or {})
    loaded = load_model(source, options, progress=say)
    quantizer = getattr(loaded.model, "hf_quantizer", None)
    if quantizer is None or not quantizer.is_serializable():
        raise QuantizationError(
            f"the installed transformers/bitsandbytes cannot save {method} weights",
            fix="pip install -U transformers bitsandbytes",
        )
    say(f"saving the {method} copy to {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staging = Path(tmp) / "out"
        loaded.model.save_pretrained(staging)
        (loaded.processor if loaded.processor is not None else loaded.tokenizer).save_pretrained(staging)
        for name in _KEEP:
            if (source.path / name).is_file() and not (staging / name).exists():
                shutil.copy2(source.path / name, staging / name)
        written = detect(ModelFolder.open(staging).config)
        if written is None or written.method != "bitsandbytes":
            raise QuantizationError(
                f"transformers saved {target} without a bitsandbytes quantization_config",
                fix="pip install -U transformers bitsandbytes",
            )
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        staging.rename(target)
    return QuantizeResult(
        out=target.resolve(),
        method=method,
        scheme=written.scheme,
        source_bytes=_stored_bytes(source.path),
        out_bytes=_stored_bytes(target),
        device=str(loaded.device),
    )
