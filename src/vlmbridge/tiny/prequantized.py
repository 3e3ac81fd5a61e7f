"""Pre-quantized copies of tiny checkpoints, written the way real quantized repos store them.

The language model's linear projections are really quantized (round-to-nearest from the tiny weights), in each
format's own tensor layout and with its `quantization_config`; the vision tower, embeddings and the output head
stay as they were, as in the public Qwen-VL quantized repos.

| kind | tensors per quantized linear | config |
|---|---|---|
| fp8 | `weight` F8_E4M3 + `weight_scale_inv` F32 per block | `quant_method: fp8`, `weight_block_size` |
| compressed-tensors | `weight_packed` I32 (8 int4 a word) + `weight_scale` + `weight_shape` | `pack-quantized` |
| gptq | `qweight` I32 (packed along inputs) + `qzeros` + `scales` F16 + `g_idx` | `quant_method: gptq` |
| awq | `qweight` I32 (packed along outputs, AWQ order) + `qzeros` + `scales` F16 | `quant_method: awq` |

bitsandbytes copies come from `vlmbridge quantize` itself (`vlmbridge.quant.convert`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["PreQuantKind", "build_prequantized", "pack_int4"]

PreQuantKind = Literal["fp8", "compressed-tensors", "gptq", "awq"]
_FP8_MAX = 448.0  # largest float8_e4m3fn value
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's interleaving of the 8 nibbles of a packed int32
# The decoder's linear projections, in every layout the tiny builder writes (nested 5.x and legacy flat names).
_QUANTIZED = re.compile(r"^model\.(language_model\.)?layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
_SKIP = ["lm_head", "model.visual", "visual"]


def pack_int4(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Pack unsigned 4-bit values (0..15) along the last dim, 8 per int32; nibble k holds element order[k]."""
    import torch

    grouped = values.to(torch.int64).reshape(*values.shape[:-1], -1, 8)[..., list(order)]
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = (grouped << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement wrap


def _fp8(name: str, w: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    import torch

    rows, cols = w.shape
    blocks = w.float().reshape(rows // block, block, cols // block, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / _FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return {name: q, name.removesuffix("weight") + "weight_scale_inv": scale}


def _int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int4: (q in -8..7 as [out, in], scales [out, in/group])."""
    import torch

    rows, cols = w.shape
    grouped = w.float().reshape(rows, cols // group, group)
    scale = (grouped.abs().amax(-1) / 7.5).clamp(min=1e-8)
    q = torch.clamp(torch.round(grouped / scale[..., None]), -8, 7).reshape(rows, cols)
    return q, scale


def _compressed_tensors(name: str, w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    import torch

    q, scale = _int4_groups(w, group)
    base = name.removesuffix("weight")
    return {
        base + "weight_packed": pack_int4(q + 8),
        base + "weight_scale": scale.to(w.dtype),
        base + "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }


def _gptq(name: str, w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    import torch

    q, scale = _int4_groups(w, group)
    rows, cols = w.shape
    base = name.removesuffix("weight")
    zeros = torch.full((cols // group, rows), 7)  # GPTQ v1 stores zero - 1 (symmetric zero point 8)
    return {
        base + "qweight": pack_int4(q + 8).T.contiguous(),  # [in/8, out]: 8 consecutive inputs per word
        base + "qzeros": pack_int4(zeros),
        base + "scales": scale.T.contiguous().to(torch.float16),
        base + "g_idx": torch.arange(cols, dtype=torch.int32) // group,
    }


def _awq(name: str, w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    import torch

    q, scale = _int4_groups(w, group)
    rows, cols = w.shape
    base = name.removesuffix("weight")
    return {
        base + "qweight": pack_int4((q + 8).T.contiguous(), _AWQ_ORDER),  # [in, out/8]
        base + "qzeros": pack_int4(torch.full((cols // group, rows), 8), _AWQ_ORDER),
        base + "scales": scale.T.contiguous().to(torch.float16),
    }


def _quantization_config(kind: PreQuantKind, block: int, group: int) -> dict[str, Any]:
    if kind == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [block, block],
            "modules_to_not_convert": _SKIP,
        }
    if kind == "compressed-tensors":
        weights = {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}, "block_structure": None,
        }  # fmt: skip
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                }
            },
            "ignore": ["lm_head", "re:.*visual.*"],
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }
    if kind == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
                "checkpoint_format": "gptq", "modules_to_not_convert": _SKIP}  # fmt: skip
    return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True,
            "modules_to_not_convert": _SKIP}  # fmt: skip


def build_prequantized(
    src: str | Path, out: str | Path, kind: PreQuantKind, *, block: int = 16, group: int = 32
) -> Path:
    """Copy the tiny checkpoint `src` to `out` with its decoder projections quantized as `kind`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, target = Path(src), Path(out)
    if target.exists():
        raise FileExistsError(f"{target} exists")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    quantize: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] = {
        "fp8": lambda n, w: _fp8(n, w, block),
        "compressed-tensors": lambda n, w: _compressed_tensors(n, w, group),
        "gptq": lambda n, w: _gptq(n, w, group),
        "awq": lambda n, w: _awq(n, w, group),
    }[kind]
    weight_map: dict[str, str] = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = fh.get_tensor(name)
                tensors.update(quantize(name, tensor) if _QUANTIZED.match(name) else {name: tensor})
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    if (source / "model.safetensors.index.json").exists():
        total = sum(t.stat().st_size for t in target.glob("*.safetensors"))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config_path = target / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = _quantization_config(kind, block, group)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return target
