"""Pre-quantized tiny checkpoints of every kind: detected with the right needs, sized right, planned right.

The checkpoints carry real quantized tensors (vlmbridge.tiny.prequantized); bitsandbytes ones come from
`vlmbridge quantize` (tests/test_quantization_bnb.py). Nothing here loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from vlmbridge import plan as planning
from vlmbridge.folder import read_safetensors_header
from vlmbridge.memory import weight_stats
from vlmbridge.plan import PlanInputs, choose_quantization, make_plan
from vlmbridge.quant import formats
from vlmbridge.quant.formats import detect, installed, runtime
from vlmbridge.tiny.prequantized import PreQuantKind, build_prequantized, pack_int4

KINDS: tuple[PreQuantKind, ...] = ("fp8", "compressed-tensors", "gptq", "awq")
BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "_load_in_4bit": True}


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prequantized")
    return {kind: build_prequantized(tiny_model("qwen3_vl"), root / kind, kind) for kind in KINDS}


def config(folder: Path) -> dict[str, object]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("kind", "method", "needs", "scheme"),
    [
        ("fp8", "fp8", ["accelerate"], "FP8 e4m3, 16×16 blocks"),
        ("compressed-tensors", "compressed-tensors", ["compressed-tensors"], "int4, group 32 (pack-quantized)"),
        ("gptq", "gptq", ["optimum", "gptqmodel"], "int4, group 32"),
        ("awq", "awq", ["gptqmodel", "accelerate"], "int4, group 32"),
    ],
)
def test_each_kind_is_detected_with_its_needs(
    prequantized: dict[str, Path], kind: str, method: str, needs: list[str], scheme: str
) -> None:
    pre = detect(config(prequantized[kind]))
    assert pre is not None and pre.known
    assert (pre.method, pre.scheme) == (method, scheme)
    assert [pip for _, pip in pre.needs] == needs


def test_bitsandbytes_config_is_detected() -> None:
    pre = detect({"model_type": "qwen3_vl", "quantization_config": BNB_4BIT})
    assert pre is not None and (pre.method, pre.scheme, pre.bits) == ("bitsandbytes", "nf4", 4)
    assert [pip for _, pip in pre.needs] == ["bitsandbytes", "accelerate"]
    eight = detect({"quantization_config": {"load_in_8bit": True}})  # older exports omit quant_method
    assert eight is not None and (eight.method, eight.scheme) == ("bitsandbytes", "int8")


def test_unknown_and_absent() -> None:
    assert detect({"model_type": "qwen3_vl"}) is None
    odd = detect({"quantization_config": {"quant_method": "magic-bits"}})
    assert odd is not None and not odd.known and odd.needs == ()
    nested = detect({"text_config": {"quantization_config": {"quant_method": "fp8"}}})
    assert nested is not None and nested.method == "fp8"


def test_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "installed", lambda module: module == "accelerate")
    pre = detect({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert pre is not None and pre.missing == ["optimum", "gptqmodel"]


@pytest.mark.parametrize("kind", KINDS)
def test_stored_tensors_are_really_quantized(prequantized: dict[str, Path], kind: str) -> None:
    header = read_safetensors_header(prequantized[kind] / "model.safetensors")
    names = {n: dtype for n, (dtype, _, _) in header.tensors.items()}
    up = "model.language_model.layers.0.mlp.up_proj."
    expected = {
        "fp8": {"weight": "F8_E4M3", "weight_scale_inv": "F32"},
        "compressed-tensors": {"weight_packed": "I32", "weight_scale": "BF16", "weight_shape": "I64"},
        "gptq": {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"},
        "awq": {"qweight": "I32", "qzeros": "I32", "scales": "F16"},
    }[kind]
    assert {k: names.get(up + k) for k in expected} == expected
    assert names["model.visual.blocks.0.attn.qkv.weight"] == "BF16"  # the vision tower stays as it was
    assert names["lm_head.weight"] == "BF16"


@pytest.mark.parametrize("kind", KINDS)
def test_weight_stats_count_the_logical_parameters(
    prequantized: dict[str, Path], tiny_model: TinyFactory, kind: str
) -> None:
    original = weight_stats([read_safetensors_header(tiny_model("qwen3_vl") / "model.safetensors")])
    folder = prequantized[kind]
    qc = config(folder)["quantization_config"]
    assert isinstance(qc, dict)
    stats = weight_stats([read_safetensors_header(folder / "model.safetensors")], qc)
    assert stats.quantized and stats.params == original.params
    assert stats.stored_bytes < original.stored_bytes


def test_int4_packing_matches_compressed_tensors() -> None:
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    values = torch.randint(-8, 8, (16, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_int4(values + 8), helpers.pack_to_int32(values, 4))


def test_awq_nibble_order() -> None:
    torch = pytest.importorskip("torch")
    packed = pack_int4(torch.arange(8).reshape(1, 8), (0, 2, 4, 6, 1, 3, 5, 7))
    assert int(packed) == sum(v << (4 * k) for k, v in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))


@pytest.mark.parametrize(
    ("method", "device", "capability", "dequantized"),
    [
        ("fp8", "cpu", None, True),
        ("fp8", "cuda", (8, 0), True),  # A100: no FP8 kernels
        ("fp8", "cuda", (8, 9), False),  # L4 / RTX 40xx
        ("fp8", "cuda", (9, 0), False),  # H100
        ("fp8", "cuda", None, False),  # a --gpu-memory budget: the GPU is not known
        ("compressed-tensors", "cuda", (9, 0), True),  # int4: no transformers kernels anywhere
        ("gptq", "cpu", None, False),
        ("awq", "cuda", (8, 0), False),
    ],
)
def test_runtime_rules(
    prequantized: dict[str, Path], method: str, device: str, capability: tuple[int, int] | None, dequantized: bool
) -> None:
    pre = detect(config(prequantized[method]))
    assert pre is not None
    rt = runtime(pre, device, capability)
    assert rt.dequantized is dequantized
    assert rt.overrides == ({"dequantize": True} if dequantized else {})


def test_compressed_tensors_fp8_uses_the_fp8_kernels() -> None:
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}  # fmt: skip
    pre = detect({"quantization_config": qc})
    assert pre is not None and pre.scheme == "fp8, per channel (float-quantized)"
    assert runtime(pre, "cuda", (9, 0)).overrides == {"use_optimized_inference": True}
    assert runtime(pre, "cpu").dequantized


def test_config_asking_for_dequantization_is_explicit() -> None:
    pre = detect({"quantization_config": {"quant_method": "fp8", "dequantize": True}})
    assert pre is not None and runtime(pre, "cpu").explicit


def test_plan_of_an_fp8_checkpoint(prequantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    on_cpu = make_plan(prequantized["fp8"], PlanInputs(device="cpu", gpu_memory=1 << 40))
    own, dequantized = on_cpu.rows
    assert own.estimate.option == "pre-quantized" and own.label == "fp8 as stored (FP8 e4m3, 16×16 blocks)"
    assert own.blocker.startswith("not here: FP8 kernels need")
    assert dequantized.available and dequantized.flags == ("--allow-dequantize",)
    assert on_cpu.recommendation.row is dequantized
    assert choose_quantization(on_cpu)[0] == "none"  # a pre-quantized checkpoint is never re-quantized

    def with_kernels(module: str) -> bool:
        return module == "kernels" or installed(module)

    monkeypatch.setattr(planning, "installed", with_kernels)
    on_gpu = make_plan(prequantized["fp8"], PlanInputs(gpu_memory=1 << 40))
    assert on_gpu.recommendation.row is on_gpu.rows[0] and on_gpu.rows[1].blocker.startswith("not needed")
    data = on_gpu.to_dict()["quantization"]
    assert data["method"] == "fp8" and data["needs"] == ["accelerate"] and data["dequantized_here"] is False
    # transformers 5.24 runs FP8 matmuls with a Triton kernel that the `kernels` package fetches from the Hub.
    monkeypatch.setattr(planning, "installed", lambda module: module != "kernels" and installed(module))
    without = make_plan(prequantized["fp8"], PlanInputs(gpu_memory=1 << 40))
    assert without.rows[0].blocker == "needs kernels (pip install kernels)"
