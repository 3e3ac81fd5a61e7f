"""What the pool serves: one `ModelSpec` per model, from a models file, `NAME=PATH` arguments or one folder.

A models file (YAML):

    models:
      - name: moderation
        path: /models/Qwen2.5-VL-3B-Instruct
        aliases: [mod]
        load: startup          # or on-demand (the default)
        keep_alive: 5m         # seconds, 30s, 5m, 1h; -1 = never unload (default); 0 = unload as soon as idle
        pinned: true           # never evicted to make room
        max_pixels: 401408     # any per-model setting (vlmbridge.settings.ModelSettings), under its field name

Per-model settings not given in an entry come from the server's own (flags, environment). Unknown keys and bad
values are refused here, before anything loads, with the entry and the key named; a folder that is broken is not
(the pool reports that model `failed` and serves the others).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from vlmbridge.errors import ModelsFileError
from vlmbridge.settings import ModelSettings, Settings

__all__ = ["LoadPolicy", "ModelSpec", "parse_keep_alive", "read_models_file", "single_folder", "specs_from_pairs"]

LoadPolicy = Literal["startup", "on-demand"]

# Keys of an entry that are not ModelSettings fields; `model` and `served_model_name` are `path` and `name` here.
_POOL_KEYS = frozenset({"name", "path", "aliases", "load", "keep_alive", "pinned"})
_REPLACED = {"model": "path", "served_model_name": "name"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$")
_DURATION = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class ModelSpec:
    """One configured model. `keep_alive` None = never unload when idle; `doctor` = run the doctor before loading
    (the single-folder `serve DIR` ran it already, before starting)."""

    name: str
    path: Path
    settings: ModelSettings
    aliases: tuple[str, ...] = ()
    load: LoadPolicy = "on-demand"
    keep_alive: float | None = None
    pinned: bool = False
    doctor: bool = True
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", (self.name, *self.aliases))


def parse_keep_alive(value: object) -> float | None:
    """Seconds as a number or `30s`/`5m`/`1h`/`250ms`; -1 → None (never); 0 → unload as soon as idle."""
    if isinstance(value, bool):
        raise ValueError("keep_alive is seconds (or 30s, 5m, 1h), not true/false")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        raise ValueError(f"keep_alive {value!r} is not a duration; use seconds, 30s, 5m, 1h or -1 (never)")
    if seconds < 0:
        if seconds != -1:
            raise ValueError(f"keep_alive {value!r}: the only negative value is -1 (never unload)")
        return None
    return seconds


def single_folder(settings: Settings, path: Path) -> ModelSpec:
    """`vlmbridge serve DIR`: one model, loaded at start-up, pinned, never unloaded."""
    model = settings.model_settings()
    return ModelSpec(name=model.served_name(path), path=path, settings=model, load="startup", pinned=True, doctor=False)


def specs_from_pairs(settings: Settings, pairs: list[str]) -> list[ModelSpec]:
    """`vlmbridge serve a=/models/x b=/models/y`: one on-demand entry per pair, with the server's settings."""
    entries: list[dict[str, Any]] = []
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ModelsFileError(f"argument {pair!r} is not NAME=PATH", fix="vlmbridge serve a=/models/x b=/models/y")
        entries.append({"name": name, "path": path})
    return _specs(settings, entries, "the command line")


def read_models_file(settings: Settings, file: Path) -> list[ModelSpec]:
    """The models file's entries, validated; relative paths are relative to the file's folder."""
    import yaml

    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsFileError(f"cannot read the models file {file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ModelsFileError(f"{file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) != {"models"} or not isinstance(data["models"], list):
        raise ModelsFileError(f"{file}: expected one key, `models:`, holding a list of entries")
    return _specs(settings, data["models"], str(file), base=file.parent)


def _specs(settings: Settings, entries: list[Any], where: str, base: Path | None = None) -> list[ModelSpec]:
    if not entries:
        raise ModelsFileError(f"{where}: no models")
    defaults = settings.model_settings().model_dump()
    specs: list[ModelSpec] = []
    taken: dict[str, str] = {}
    for index, raw in enumerate(entries, 1):
        spec = _entry(raw, f"{where}: entry {index}", defaults, base)
        for name in spec.names:
            if name in taken:
                raise ModelsFileError(f"{where}: the name {name!r} is used by both {taken[name]!r} and {spec.name!r}")
            taken[name] = spec.name
        specs.append(spec)
    return specs


def _entry(raw: Any, where: str, defaults: dict[str, Any], base: Path | None) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ModelsFileError(f"{where}: expected a mapping with name and path, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModelsFileError(f"{where}: `name` must be a model name (letters, digits, . _ - : / @ +), got {name!r}")
    where = f"{where} ({name!r})"
    for key in raw:
        if key in _REPLACED:
            raise ModelsFileError(f"{where}: unknown key {key!r}; an entry says `{_REPLACED[key]}` instead")
        if key not in _POOL_KEYS and key not in ModelSettings.model_fields:
            raise ModelsFileError(f"{where}: unknown key {key!r}", fix="see docs/models.md for an entry's keys")
    path_value = raw.get("path")
    if not isinstance(path_value, str) or not path_value:
        raise ModelsFileError(f"{where}: `path` (the model folder) is required")
    path = Path(path_value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and _NAME.match(a) for a in aliases):
        raise ModelsFileError(f"{where}: `aliases` must be a list of model names")
    load = raw.get("load", "on-demand")
    if load not in ("startup", "on-demand"):
        raise ModelsFileError(f"{where}: `load` must be startup or on-demand, got {load!r}")
    pinned = raw.get("pinned", False)
    if not isinstance(pinned, bool):
        raise ModelsFileError(f"{where}: `pinned` must be true or false, got {pinned!r}")
    try:
        keep_alive = parse_keep_alive(raw.get("keep_alive", -1))
    except ValueError as exc:
        raise ModelsFileError(f"{where}: {exc}") from None
    overrides = {k: v for k, v in raw.items() if k not in _POOL_KEYS}
    try:
        settings = ModelSettings.model_validate({**defaults, **overrides, "model": path, "served_model_name": name})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first.get("loc", ())) or "?"
        raise ModelsFileError(f"{where}: bad value for {key!r}: {first.get('msg')}") from None
    return ModelSpec(
        name=name,
        path=path,
        settings=settings,
        aliases=tuple(aliases),
        load=load,
        keep_alive=keep_alive,
        pinned=pinned,
    )
