"""Read a model folder without torch or transformers: config, weight files and their headers.

Everything here touches only small files and the first bytes of safetensors files, so the doctor can use it on
an 8B checkpoint in milliseconds and the loader can fail fast before importing anything heavy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmbridge.errors import ModelFolderError

__all__ = [
    "HEADER_FLOAT_DTYPES",
    "MAX_JSON_BYTES",
    "MAX_SAFETENSORS_HEADER_BYTES",
    "ModelFolder",
    "SafetensorsHeader",
    "read_json_file",
    "read_safetensors_header",
    "stored_dtype_name",
]

# config/tokenizer_config/processor files are kilobytes; anything far larger is not a config.
MAX_JSON_BYTES = 64 * 1024 * 1024
# Real headers are a few MB at most (MoE with thousands of tensors); refuse absurd claims before allocating.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024


def read_json_file(path: Path, *, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file, refusing files over `limit` bytes. Raises OSError or ValueError."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path.name} is {size} bytes, more than the {limit}-byte limit for a config file")
    with path.open("rb") as fh:
        return json.loads(fh.read())


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file: tensor name → (dtype, shape, [begin, end))."""

    path: Path
    header_len: int
    tensors: Mapping[str, tuple[str, tuple[int, ...], tuple[int, int]]]
    metadata: Mapping[str, str]
    file_size: int

    @property
    def data_bytes(self) -> int:
        """Bytes the header says the data section spans."""
        return max((end for _, _, (_, end) in self.tensors.values()), default=0)

    @property
    def expected_file_size(self) -> int:
        return 8 + self.header_len + self.data_bytes


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse only the header of a safetensors file. Raises ValueError with a readable reason."""
    file_size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValueError(f"file is {len(prefix)} bytes, too short to hold a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_SAFETENSORS_HEADER_BYTES:
            raise ValueError(f"header claims {header_len} bytes, more than any real checkpoint's")
        if 8 + header_len > file_size:
            raise ValueError(f"header claims {header_len} bytes but the file has only {file_size - 8} after it")
        raw = fh.read(header_len)
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(parsed, dict):
        raise ValueError("header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
    for name, info in parsed.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor entry {name!r} lacks dtype/shape/data_offsets") from None
        if begin < 0 or end < begin:
            raise ValueError(f"tensor {name!r} has invalid data_offsets [{begin}, {end}]")
        tensors[name] = (dtype, shape, (begin, end))
    return SafetensorsHeader(
        path=path,
        header_len=header_len,
        tensors=tensors,
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
        file_size=file_size,
    )


_CONFIG_DTYPE_ALIASES = {
    "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "float16": "fp16", "torch.float16": "fp16", "half": "fp16",
    "float32": "fp32", "torch.float32": "fp32", "float": "fp32",
}  # fmt: skip
HEADER_FLOAT_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def stored_dtype_name(config: Mapping[str, Any]) -> str | None:
    """bf16/fp16/fp32 as the config records it (`dtype` since 4.56, `torch_dtype` before), or None."""
    for source in (config, config.get("text_config") or {}):
        if not isinstance(source, Mapping):
            continue
        for key in ("dtype", "torch_dtype"):
            value = source.get(key)
            if isinstance(value, str) and value in _CONFIG_DTYPE_ALIASES:
                return _CONFIG_DTYPE_ALIASES[value]
    return None


@dataclass(frozen=True)
class ModelFolder:
    """A validated model folder and its parsed config.json."""

    path: Path
    config: Mapping[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        """Check the folder exists, is a folder, is not empty and has a readable config.json."""
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelFolderError(
                f"model folder {p} does not exist",
                fix="check the path; inside a container use the path it is mounted at (e.g. /models/NAME)",
            )
        if not p.is_dir():
            raise ModelFolderError(
                f"{p} is a file, not a model folder", fix="pass the folder that contains config.json"
            )
        try:
            entries = list(p.iterdir())
        except PermissionError:
            raise ModelFolderError(f"no permission to list {p}", fix=f"make it readable: chmod -R a+rX {p}") from None
        if not entries:
            raise ModelFolderError(f"model folder {p} is empty", fix="download or mount the model files into it")
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise ModelFolderError(
                f"{p} has no config.json — not a transformers model folder",
                fix="pass the folder that holds config.json (often one level deeper, e.g. .../snapshots/<rev>)",
            )
        try:
            config = read_json_file(cfg_path)
        except PermissionError:
            raise ModelFolderError(f"no permission to read {cfg_path}", fix=f"chmod a+r {cfg_path}") from None
        except (OSError, ValueError) as exc:
            raise ModelFolderError(
                f"config.json in {p} is not valid JSON: {exc}", fix="re-download config.json"
            ) from None
        if not isinstance(config, dict):
            raise ModelFolderError(f"config.json in {p} is not a JSON object", fix="re-download config.json")
        return cls(path=p.resolve(), config=config)

    @property
    def model_type(self) -> str | None:
        value = self.config.get("model_type")
        return value if isinstance(value, str) and value else None

    @property
    def architectures(self) -> list[str]:
        value = self.config.get("architectures")
        return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []

    @property
    def auto_map(self) -> Mapping[str, Any]:
        value = self.config.get("auto_map")
        return value if isinstance(value, dict) else {}

    @property
    def quantization_config(self) -> Mapping[str, Any] | None:
        for source in (self.config, self.text_config):  # some VLM exports nest it in text_config
            value = source.get("quantization_config")
            if isinstance(value, dict):
                return value
        return None

    @property
    def text_config(self) -> Mapping[str, Any]:
        """The language-model part of the config: `text_config` for VLMs, the config itself for LLMs."""
        value = self.config.get("text_config")
        return value if isinstance(value, dict) else self.config

    @property
    def stored_dtype(self) -> str | None:
        name = stored_dtype_name(self.config)
        if name is None:
            name = self._dtype_from_first_header()
        return name

    def files(self, pattern: str) -> list[Path]:
        return sorted(f for f in self.path.glob(pattern) if f.is_file())

    @property
    def safetensors_files(self) -> list[Path]:
        return self.files("*.safetensors")

    @property
    def pickle_weight_files(self) -> list[Path]:
        return [f for f in self.files("*.bin") if f.name.startswith(("pytorch_model", "model"))]

    @property
    def python_files(self) -> list[Path]:
        return self.files("*.py")

    def _dtype_from_first_header(self) -> str | None:
        for f in self.safetensors_files[:1]:
            try:
                header = read_safetensors_header(f)
            except (OSError, ValueError):
                return None
            for dtype, _, _ in header.tensors.values():
                if dtype in HEADER_FLOAT_DTYPES:
                    return HEADER_FLOAT_DTYPES[dtype]
        return None
