"""Tensors vs the architecture: the names and shapes config.json implies against the safetensors headers.

transformers fills a missing tensor with random values and only logs it; vlmbridge's loader refuses such a model
("N tensors missing"). This check says so before anything loads, from the headers alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from vlmbridge.doctor.context import INDEX_FILE, Context
from vlmbridge.doctor.expected import (
    VISION_PREFIX,
    Shape,
    TensorSpec,
    canonical_name,
    expected_tensors,
    ignorable,
    stored_naming,
)
from vlmbridge.doctor.findings import Evidence, Finding, Severity
from vlmbridge.folder import SafetensorsHeader

__all__ = ["check_tensors"]

_SHOWN = 5  # names a message lists before "and N more"


@dataclass(frozen=True)
class _Stored:
    shard: str
    shape: Shape


def _listing(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _dims(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _loaded_tensors(ctx: Context) -> dict[str, _Stored] | None:
    """Tensor → (shard, shape) over the shards the loader reads; None when the shard checks already fail (an
    unreadable header, a missing shard, no index), since any comparison would repeat their findings."""
    headers = ctx.headers
    if not headers or any(isinstance(h, str) for h in headers.values()):
        return None
    weight_map = ctx.weight_map
    if ctx.index.present:
        if weight_map is None:
            return None
        shards = sorted(set(weight_map.values()))
    elif "model.safetensors" in headers:
        shards = ["model.safetensors"]  # without an index transformers reads only this file
    else:
        return None
    out: dict[str, _Stored] = {}
    for shard in shards:
        header = headers.get(shard)
        if not isinstance(header, SafetensorsHeader):
            return None
        for name, (_, shape, _) in header.tensors.items():
            out.setdefault(name, _Stored(shard, shape))
    return out


def check_tensors(ctx: Context) -> Iterator[Finding]:
    # Remote code builds its own classes and quantized checkpoints store packed weights and scales: no table.
    if not ctx.config_file.ok or ctx.auto_map or ctx.quantization_config is not None:
        return
    expected = expected_tensors(ctx.config)
    stored = _loaded_tensors(ctx) if expected is not None else None
    if expected is None or not stored:
        return
    model_type = ctx.model_type or ""
    canon = {canonical_name(model_type, name, expected): name for name in stored}
    spell = stored_naming(model_type, stored)
    arch = ctx.family.model_class if ctx.family else model_type

    missing = [spell(n) for n, spec in expected.items() if n not in canon and not _tied_present(spec, canon)]
    listed = set(ctx.weight_map or {})
    missing = [n for n in missing if n not in listed]  # VB107 already names tensors the index lists
    if not any(n.startswith(VISION_PREFIX) for n in canon):  # VB207 already says the whole tower is absent
        vision = {spell(n) for n in expected if n.startswith(VISION_PREFIX)}
        missing = [n for n in missing if n not in vision]
    if missing:
        yield _missing(ctx, arch, missing)

    wrong = [
        (canon[n], spec) for n, spec in expected.items() if n in canon and stored[canon[n]].shape not in spec.shapes
    ]
    if wrong:
        yield _wrong_shape(arch, wrong, stored)

    extra = sorted(s for c, s in canon.items() if c not in expected and not ignorable(s))
    if extra:
        yield Finding(
            "VB119",
            Severity.WARNING,
            f"{len(extra)} tensor(s) in the shards are not part of {arch} as config.json describes it: "
            f"{_listing(extra)}; transformers skips them (another export's leftovers, or weights of another model?)",
            fix="re-export the checkpoint with save_pretrained, or check that config.json belongs to these weights",
            evidence=Evidence(file=stored[extra[0]].shard, value=extra[0]),
        )


def _tied_present(spec: TensorSpec, canon: Mapping[str, str]) -> bool:
    return spec.tied_with is not None and spec.tied_with in canon


def _missing(ctx: Context, arch: str, missing: list[str]) -> Finding:
    where = INDEX_FILE if ctx.index.present else "model.safetensors"
    return Finding(
        "VB117",
        Severity.ERROR,
        f"{len(missing)} tensor(s) {arch} needs for this config.json are in no shard: {_listing(missing)}; "
        f'transformers would initialise them randomly and vlmbridge refuses to load ("{len(missing)} tensors '
        'missing")',
        fix="re-download the checkpoint, shards and index together (huggingface-cli download REPO --local-dir DIR); "
        "if you exported or converted it, re-export it with save_pretrained from a model that loaded",
        evidence=Evidence(file=where, value=missing[0]),
    )


def _wrong_shape(arch: str, wrong: list[tuple[str, TensorSpec]], stored: Mapping[str, _Stored]) -> Finding:
    shown = [f"{name} {_dims(stored[name].shape)} (expected {_dims(spec.shape)})" for name, spec in wrong]
    first, spec = wrong[0]
    shard = stored[first].shard
    return Finding(
        "VB118",
        Severity.ERROR,
        f"{len(wrong)} tensor(s) have another shape than {arch} builds from config.json: {_listing(shown)}; "
        "loading fails with a size mismatch",
        fix=f"config.json and the weights disagree: restore config.json from the model's repository if it was "
        f"edited, else re-download {shard} (or re-convert the checkpoint)",
        evidence=Evidence(file=shard, value=f"{first}: {_dims(stored[first].shape)} != {_dims(spec.shape)}"),
    )
