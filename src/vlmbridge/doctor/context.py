"""What the checks share: the options and a lazily-read view of the folder, each file read at most once.

Reading is defensive: only regular files are opened (a FIFO named config.json must not hang the doctor), JSON is
size-capped, and every failure is kept as a reason string for a check to turn into a finding.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vlmbridge.doctor.tfindex import TransformersIndex, load_index
from vlmbridge.families import Family, family_for
from vlmbridge.folder import (
    MAX_JSON_BYTES,
    ModelFolder,
    SafetensorsHeader,
    read_json_file,
    read_safetensors_header,
)
from vlmbridge.memory import DeviceBudget, device_budget

if TYPE_CHECKING:
    from vlmbridge.settings import Settings

__all__ = ["INDEX_FILE", "Context", "DoctorOptions", "FolderEntry", "JsonFile"]

INDEX_FILE = "model.safetensors.index.json"
_MAX_ENTRIES = 20_000  # a model folder with more entries than this is not one; stop listing


@dataclass(frozen=True)
class DoctorOptions:
    """Doctor inputs besides the folder. Memory options mean the same as `vlmbridge plan`'s."""

    device: str = "auto"
    gpu_memory: int | None = None  # bytes; overrides the device's free memory
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    quantization: str = "none"  # none | bnb-8bit | bnb-4bit | auto (the loader's choice on this device)
    context: int | None = None  # tokens per sequence; default min(model maximum, 32768)
    images: int = 1  # images per sequence
    max_pixels: int | None = None  # per-image pixel cap; default the processor's own limit
    batch: int = 1
    videos: int = 0  # video clips per sequence, sampled as the server samples them
    video_seconds: float = 10.0
    attn_implementation: str = "sdpa"
    allow_pickle_weights: bool = False
    trust_remote_code: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    in_container: bool | None = None  # None: detect

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> DoctorOptions:
        """The options `vlmbridge serve` would run with: its device, dtype, context and per-image pixel cap."""
        values: dict[str, Any] = {
            "device": settings.device,
            "dtype": settings.dtype,
            "quantization": settings.quantization,
            "context": settings.context_length,
            "max_pixels": settings.max_pixels,
            "batch": settings.max_batch_size,
            "attn_implementation": settings.attn_implementation,
            "allow_pickle_weights": settings.allow_pickle_weights,
            "trust_remote_code": settings.trust_remote_code,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class FolderEntry:
    """One directory entry, classified without following anything twice."""

    name: str
    kind: Literal["file", "dir", "other", "broken-link"]
    size: int
    is_link: bool
    error: str | None = None


@dataclass(frozen=True)
class JsonFile:
    name: str
    present: bool
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.present and self.error is None

    @property
    def mapping(self) -> Mapping[str, Any]:
        return self.value if self.ok and isinstance(self.value, dict) else {}


class Context:
    """The folder as the checks see it. Cached per run; nothing here raises for a bad folder."""

    def __init__(self, path: Path, options: DoctorOptions) -> None:
        self.path = path
        self.options = options
        self.facts: dict[str, Any] = {}  # figures checks establish for the report (memory, model kind)
        self._json: dict[str, JsonFile] = {}

    # --- listing ---------------------------------------------------------------------------------------
    @cached_property
    def entries(self) -> dict[str, FolderEntry]:
        out: dict[str, FolderEntry] = {}
        try:
            with os.scandir(self.path) as it:
                for item in it:
                    if len(out) >= _MAX_ENTRIES:
                        break
                    out[item.name] = _classify(item)
        except OSError:
            pass  # the environment check reports an unlistable folder
        return out

    def file(self, name: str) -> FolderEntry | None:
        entry = self.entries.get(name)
        return entry if entry is not None and entry.kind == "file" else None

    def names(self, suffix: str) -> list[str]:
        return sorted(n for n, e in self.entries.items() if e.kind == "file" and n.endswith(suffix))

    # --- JSON files ------------------------------------------------------------------------------------
    def json(self, name: str, limit: int = MAX_JSON_BYTES) -> JsonFile:
        if name not in self._json:
            self._json[name] = self._read_json(name, limit)
        return self._json[name]

    def _read_json(self, name: str, limit: int) -> JsonFile:
        entry = self.entries.get(name)
        if entry is None:
            return JsonFile(name, present=False)
        if entry.kind != "file":
            return JsonFile(name, present=True, error=entry.error or f"{name} is not a regular file")
        try:
            return JsonFile(name, present=True, value=read_json_file(self.path / name, limit=limit))
        except PermissionError:
            return JsonFile(name, present=True, error=f"permission denied reading {name}")
        except (OSError, ValueError, RecursionError, MemoryError) as exc:
            return JsonFile(name, present=True, error=f"{type(exc).__name__}: {str(exc)[:200]}")

    @property
    def config_file(self) -> JsonFile:
        return self.json("config.json")

    @property
    def config(self) -> Mapping[str, Any]:
        return self.config_file.mapping

    @property
    def folder(self) -> ModelFolder:
        """The config through the loader's own accessors, so doctor and loader never read it differently."""
        return ModelFolder(path=self.path, config=self.config)

    @property
    def text_config(self) -> Mapping[str, Any]:
        return self.folder.text_config

    @property
    def model_type(self) -> str | None:
        return self.folder.model_type

    @property
    def family(self) -> Family | None:
        return family_for(self.model_type)

    @property
    def architectures(self) -> list[str]:
        return self.folder.architectures

    @property
    def auto_map(self) -> Mapping[str, Any]:
        return self.folder.auto_map

    @property
    def quantization_config(self) -> Mapping[str, Any] | None:
        return self.folder.quantization_config

    @cached_property
    def is_vlm(self) -> bool:
        """A vision-language model by transformers' mapping, by our family table, or by a vision_config."""
        mt = self.model_type
        if mt and self.tf.auto_class_for(mt) is not None:
            return self.tf.auto_class_for(mt) == ("vlm", "AutoModelForImageTextToText")
        fam = self.family
        if fam is not None:
            return fam.is_vlm
        return isinstance(self.config.get("vision_config"), dict) or "AutoModelForImageTextToText" in self.auto_map

    # --- weights ---------------------------------------------------------------------------------------
    @cached_property
    def headers(self) -> dict[str, SafetensorsHeader | str]:
        """Shard name → parsed header, or the reason it could not be parsed."""
        out: dict[str, SafetensorsHeader | str] = {}
        for name in self.names(".safetensors"):
            try:
                out[name] = read_safetensors_header(self.path / name)
            except PermissionError:
                out[name] = "permission denied"
            except (OSError, ValueError, RecursionError, MemoryError) as exc:
                out[name] = str(exc)[:300] or type(exc).__name__
        return out

    @property
    def good_headers(self) -> list[SafetensorsHeader]:
        return [h for h in self.headers.values() if isinstance(h, SafetensorsHeader)]

    @property
    def index(self) -> JsonFile:
        return self.json(INDEX_FILE)

    @property
    def weight_map(self) -> dict[str, str] | None:
        wm = self.index.mapping.get("weight_map")
        if not isinstance(wm, dict):
            return None
        return {str(k): str(v) for k, v in wm.items()}

    # --- tokenizer -------------------------------------------------------------------------------------
    @cached_property
    def vocab(self) -> dict[str, int]:
        """Token → id as the tokenizer files define it (tokenizer.json, else vocab.json + added tokens)."""
        ids: dict[str, int] = {}
        tok = self.json("tokenizer.json").mapping
        model = tok.get("model")
        if isinstance(model, dict) and isinstance(model.get("vocab"), dict):
            ids.update({str(k): v for k, v in model["vocab"].items() if isinstance(v, int)})
        elif not tok:
            ids.update({str(k): v for k, v in self.json("vocab.json").mapping.items() if isinstance(v, int)})
        added = tok.get("added_tokens")
        for item in added if isinstance(added, list) else []:
            if isinstance(item, dict) and isinstance(item.get("content"), str) and isinstance(item.get("id"), int):
                ids[item["content"]] = item["id"]
        decoder = self.json("tokenizer_config.json").mapping.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for key, item in decoder.items():
                if isinstance(item, dict) and isinstance(item.get("content"), str) and str(key).isdigit():
                    ids.setdefault(item["content"], int(key))
        return ids

    # --- processors ------------------------------------------------------------------------------------
    def processor_section(self, kind: Literal["image", "video"]) -> tuple[str, Mapping[str, Any]] | None:
        """(file, settings) of the image or video processor in either layout (official or save_pretrained)."""
        flat = "preprocessor_config.json" if kind == "image" else "video_preprocessor_config.json"
        if self.json(flat).ok:
            return flat, self.json(flat).mapping
        nested = self.json("processor_config.json").mapping.get(f"{kind}_processor")
        if isinstance(nested, dict):
            return "processor_config.json", nested
        return None

    @cached_property
    def tf(self) -> TransformersIndex:
        return load_index()

    @cached_property
    def budget(self) -> DeviceBudget:
        """Free memory (and compute capability) of the device the model would load on."""
        return device_budget(self.options.device, self.options.gpu_memory)


def _classify(item: os.DirEntry[str]) -> FolderEntry:
    try:
        is_link = item.is_symlink()
        st = item.stat()  # follows links: ELOOP / ENOENT mean a loop or a dangling link
    except OSError as exc:
        return FolderEntry(item.name, "broken-link", 0, True, error=exc.strerror or str(exc))
    if stat.S_ISREG(st.st_mode):
        return FolderEntry(item.name, "file", st.st_size, is_link)
    if stat.S_ISDIR(st.st_mode):
        return FolderEntry(item.name, "dir", 0, is_link)
    return FolderEntry(item.name, "other", 0, is_link, error="not a regular file")
