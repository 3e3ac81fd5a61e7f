"""What the installed transformers knows — model types, Auto classes, processor classes — without importing it.

Importing transformers' auto mappings pulls in torch (~2.5 s), which alone would blow the doctor's time budget.
The mappings are literal `OrderedDict([...])` tables in `transformers/models/auto/*.py`, so we read them with
`ast`; if that yields nothing usable (a future layout), we fall back to importing the real modules.
A test keeps the static reading equal to the imported mappings.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

__all__ = ["TransformersIndex", "load_index"]

_AUTO_FILES = (
    "auto_mappings.py",  # 5.x: generated, pure data
    "configuration_auto.py",
    "modeling_auto.py",
    "image_processing_auto.py",
    "video_processing_auto.py",
    "processing_auto.py",
)
_WANTED = {
    "CONFIG_MAPPING_NAMES",
    "SPECIAL_MODEL_TYPE_TO_MODULE_NAME",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "IMAGE_PROCESSOR_MAPPING_NAMES",
    "VIDEO_PROCESSOR_MAPPING_NAMES",
    "PROCESSOR_MAPPING_NAMES",
}
_MISSING_PREFIX = "MISSING_"  # 5.x keeps hand-written extras in MISSING_<NAME> and merges them with .update()


@dataclass(frozen=True)
class TransformersIndex:
    version: str | None  # None: transformers is not installed
    tables: Mapping[str, Mapping[str, Any]]
    model_classes: frozenset[str]  # every class any MODEL_*_MAPPING_NAMES names
    root: Path | None
    source: Literal["static", "import", "missing"]
    _module_cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def table(self, name: str) -> Mapping[str, Any]:
        return self.tables.get(name, {})

    @property
    def installed(self) -> bool:
        return self.version is not None

    def knows_model_type(self, model_type: str) -> bool:
        return model_type in self.table("CONFIG_MAPPING_NAMES")

    def auto_class_for(self, model_type: str) -> tuple[Literal["vlm", "text"], str] | None:
        """Mirror of the loader's choice: image-text-to-text first, then causal LM."""
        if model_type in self.table("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"):
            return "vlm", "AutoModelForImageTextToText"
        if model_type in self.table("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
            return "text", "AutoModelForCausalLM"
        return None

    def classes_for(self, model_type: str) -> set[str]:
        """Model classes the Auto mappings build for this model_type."""
        out: set[str] = set()
        for name in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
            out.update(_strings(self.table(name).get(model_type)))
        return out

    @cached_property
    def image_processor_classes(self) -> frozenset[str]:
        return frozenset(s for v in self.table("IMAGE_PROCESSOR_MAPPING_NAMES").values() for s in _strings(v))

    @cached_property
    def video_processor_classes(self) -> frozenset[str]:
        return frozenset(s for v in self.table("VIDEO_PROCESSOR_MAPPING_NAMES").values() for s in _strings(v))

    @cached_property
    def processor_classes(self) -> frozenset[str]:
        return frozenset(s for v in self.table("PROCESSOR_MAPPING_NAMES").values() for s in _strings(v))

    def image_processor_resolves(self, name: str) -> bool:
        # 5.x maps legacy "...Fast" names to the base class (AutoImageProcessor's is_legacy_fast path).
        known = self.image_processor_classes
        return name in known or (name.endswith("Fast") and name[:-4] in known) or name == "BaseImageProcessorFast"

    def module_for(self, model_type: str) -> str:
        special = self.table("SPECIAL_MODEL_TYPE_TO_MODULE_NAME").get(model_type)
        return special if isinstance(special, str) else model_type.replace("-", "_")

    def class_defined(self, model_type: str, class_name: str) -> bool:
        """True if the model's own modeling file defines `class_name` (classes outside the Auto mappings)."""
        if class_name in self.model_classes:
            return True
        if self.root is None:
            return False
        module = self.module_for(model_type)
        path = self.root / "models" / module / f"modeling_{module}.py"
        if module not in self._module_cache:
            try:
                self._module_cache[module] = path.read_text(encoding="utf-8")
            except OSError:
                self._module_cache[module] = ""
        return re.search(rf"^class {re.escape(class_name)}\(", self._module_cache[module], re.MULTILINE) is not None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _literal_pairs(node: ast.AST) -> dict[str, Any]:
    """Entries of a literal list of (key, value) pairs or a dict; entries that are not literals are skipped,
    except that a literal key with a computed value is kept (value None) — the key alone says 'known'."""
    out: dict[str, Any] = {}
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values, strict=True):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                out[k.value] = _safe_literal(v)
        return out
    if isinstance(node, ast.List | ast.Tuple):
        for elt in node.elts:
            if isinstance(elt, ast.Tuple) and len(elt.elts) == 2:
                key = elt.elts[0]
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    out[key.value] = _safe_literal(elt.elts[1])
    return out


def _safe_literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _mapping_from_call(node: ast.AST, known: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """`OrderedDict([...])`, `OrderedDict(**{...}, **NAME)`, `{...}` or `NAME` → its entries, else None."""
    if isinstance(node, ast.Name):
        return dict(known.get(node.id, {})) if node.id in known else None
    if isinstance(node, ast.Dict):
        return _literal_pairs(node)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("OrderedDict", "dict")):
        return None
    out: dict[str, Any] = {}
    for arg in node.args:
        out.update(_literal_pairs(arg) if not isinstance(arg, ast.Name) else known.get(arg.id, {}))
    for kw in node.keywords:
        if kw.arg is None:
            sub = _mapping_from_call(kw.value, known)
            out.update(sub or {})
    return out


def _scan(tree: ast.AST, tables: dict[str, dict[str, Any]]) -> None:
    """Follow assignments and `.update()` calls to the wanted tables, in source order, at any nesting depth."""
    for node in _in_order(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in _WANTED or name.startswith(_MISSING_PREFIX):
                mapping = _mapping_from_call(node.value, tables)
                if mapping is not None:
                    tables[name] = mapping
        elif (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "update"
            and isinstance(node.value.func.value, ast.Name)
            and node.value.args
        ):
            target = node.value.func.value.id
            mapping = _mapping_from_call(node.value.args[0], tables)
            if mapping is not None and (target in _WANTED or target.startswith(_MISSING_PREFIX)):
                tables.setdefault(target, {}).update(mapping)


def _in_order(tree: ast.AST) -> Iterator[ast.AST]:
    # Statements in source order, descending into if/else/try blocks (ast.walk is breadth-first).
    body = getattr(tree, "body", [])
    for stmt in body:
        yield stmt
        for attr in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(stmt, attr, []) or []:
                yield from _in_order(ast.Module(body=[child], type_ignores=[]))


def _static(root: Path) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    model_classes: set[str] = set()
    for name in _AUTO_FILES:
        path = root / "models" / "auto" / name
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            continue
        _scan(tree, tables)
        if name == "modeling_auto.py":
            for node in _in_order(tree):
                if not isinstance(node, ast.Assign) or not isinstance(node.targets[0], ast.Name):
                    continue
                if node.targets[0].id.startswith("MODEL_") and node.targets[0].id.endswith("_NAMES"):
                    values = (_mapping_from_call(node.value, {}) or {}).values()
                    model_classes.update(s for v in values for s in _strings(v))
    tables["__model_classes__"] = {c: c for c in model_classes}
    return tables


def _imported() -> dict[str, dict[str, Any]]:
    from transformers.models.auto import (
        configuration_auto,
        image_processing_auto,
        modeling_auto,
        processing_auto,
        video_processing_auto,
    )

    tables: dict[str, dict[str, Any]] = {}
    for module in (configuration_auto, modeling_auto, image_processing_auto, video_processing_auto, processing_auto):
        for name in _WANTED:
            value = getattr(module, name, None)
            if isinstance(value, Mapping):
                tables[name] = dict(value)
    classes = {
        s
        for name in dir(modeling_auto)
        if name.startswith("MODEL_") and name.endswith("_NAMES")
        for v in getattr(modeling_auto, name).values()
        for s in _strings(v)
    }
    tables["__model_classes__"] = {c: c for c in classes}
    return tables


def load_index(*, force_import: bool = False) -> TransformersIndex:
    """Read what the installed transformers knows. Never raises: a missing transformers gives source='missing'."""
    try:
        version: str | None = importlib.metadata.version("transformers")
        spec = importlib.util.find_spec("transformers")
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        version, spec = None, None
    if version is None or spec is None or not spec.submodule_search_locations:
        return TransformersIndex(version=None, tables={}, model_classes=frozenset(), root=None, source="missing")
    root = Path(next(iter(spec.submodule_search_locations)))
    source: Literal["static", "import"] = "static"
    tables = {} if force_import else _static(root)
    if len(tables.get("CONFIG_MAPPING_NAMES", {})) < 50 or not tables.get("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        try:
            tables, source = _imported(), "import"
        except Exception:  # a broken transformers install: keep what the static pass found
            source = "static"
    model_classes = frozenset(tables.pop("__model_classes__", {}))
    public = {k: v for k, v in tables.items() if k in _WANTED}
    return TransformersIndex(version=version, tables=public, model_classes=model_classes, root=root, source=source)
