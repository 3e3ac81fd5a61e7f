"""The memory estimator: sizes, token math against transformers' own functions, weights against real models."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from vlmbridge import memory
from vlmbridge.folder import read_safetensors_header

GIB = 1024**3
# Qwen3-VL-8B-Instruct's config values (shared/reference/qwen-vl-facts.md), as config.json writes them.
QWEN3_VL_8B = {
    "model_type": "qwen3_vl",
    "text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                    "max_position_embeddings": 262144},
    "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 4096,
                      "deepstack_visual_indexes": [8, 16, 24]},
}  # fmt: skip
QWEN3_PRE = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "merge_size": 2}
QWEN25_PRE = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16GiB", 16 * GIB), ("24GB", 24 * 10**9), ("24 gb", 24 * 10**9), ("512MiB", 512 * 1024**2),
     ("1.5T", int(1.5e12)), ("8Gi", 8 * GIB), ("1000", 1000)],
)  # fmt: skip
def test_parse_size(text: str, expected: int) -> None:
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "16XB", "GiB", "-1GB", "0", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        memory.parse_size(text)


def test_format_bytes() -> None:
    assert memory.format_bytes(17534247392) == "17.53 GB"
    assert memory.format_bytes(147456, binary=True) == "144 KiB"
    assert memory.format_bytes(999) == "999 B"


def test_smart_resize_equals_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    sides = (1, 27, 28, 31, 64, 200, 480, 640, 1080, 1920, 3000, 4000, 8192)
    limits = ((65536, 16777216, 32), (3136, 12845056, 28), (4096, 1024 * 1024, 32), (3136, 200704, 28))
    for (h, w), (lo, hi, factor) in itertools.product(itertools.product(sides, sides), limits):
        if max(h, w) / min(h, w) > 200:
            continue
        assert memory.smart_resize(h, w, factor, lo, hi) == reference(h, w, factor, lo, hi), (h, w, factor, lo, hi)


@pytest.mark.parametrize(
    ("size", "tokens"), [((1920, 1080), 2040), ((1024, 1024), 1024), ((640, 480), 300), ((4000, 3000), 11750)]
)
def test_qwen3_vl_image_tokens_from_the_facts_file(size: tuple[int, int], tokens: int) -> None:
    geo = memory.geometry_from_config(QWEN3_VL_8B, QWEN3_PRE)
    assert geo.vision is not None
    assert memory.image_tokens(*size, geo.vision) == tokens


def test_qwen2_5_vl_image_tokens_and_flat_pixel_keys(tiny_model: TinyFactory) -> None:
    folder = tiny_model("qwen2_5_vl")
    config = json.loads((folder / "config.json").read_text())
    geo = memory.geometry_from_config(config, QWEN25_PRE)
    assert geo.vision is not None and (geo.vision.min_pixels, geo.vision.max_pixels) == (3136, 12845056)
    assert memory.image_tokens(1920, 1080, geo.vision) == 2691


def test_kv_cache_per_token_of_the_8b() -> None:
    geo = memory.geometry_from_config(QWEN3_VL_8B)
    assert memory.kv_bytes_per_token(geo, 2) == 144 * 1024
    assert memory.kv_bytes_per_token(geo, 2) * 32768 == int(4.5 * GIB)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen2_vl", "qwen2"])
def test_weight_stats_equal_the_real_model(tiny_model: TinyFactory, family: str) -> None:
    import transformers

    folder = tiny_model(family, "official", 3 if family == "qwen3_vl" else 1)
    stats = memory.weight_stats(read_safetensors_header(p) for p in sorted(folder.glob("*.safetensors")))
    auto = transformers.AutoModelForCausalLM if family == "qwen2" else transformers.AutoModelForImageTextToText
    model = auto.from_pretrained(folder)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}.values()  # tied weights are stored once
    assert stats.params == sum(t.numel() for t in unique)
    assert stats.stored_bytes == sum(t.numel() * 2 for t in unique)  # bf16 on disk
    assert stats.stored_float == "bf16" and not stats.quantized
    assert (stats.vision_params > 0) == (family != "qwen2")


def test_quantized_option_weights_order(tiny_model: TinyFactory) -> None:
    folder = tiny_model("qwen3_vl")
    stats = memory.weight_stats([read_safetensors_header(folder / "model.safetensors")])
    geo = memory.geometry_from_config(json.loads((folder / "config.json").read_text()))
    work = memory.Workload(context=1024)
    w = {o: memory.estimate(stats, geo, work, o).weights for o in ("fp32", "bf16", "bnb-8bit", "bnb-4bit")}
    assert w["fp32"] == 2 * w["bf16"] and w["bf16"] > w["bnb-8bit"] > w["bnb-4bit"]


def test_fp8_checkpoint_counts_as_pre_quantized(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(256, 128).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 1),
        "model.norm.weight": torch.ones(128, dtype=torch.bfloat16),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    stats = memory.weight_stats([read_safetensors_header(tmp_path / "model.safetensors")], {"quant_method": "fp8"})
    assert stats.quantized and stats.params == 256 * 128 + 128
    geo = memory.ModelGeometry(layers=1, kv_layers=1, kv_heads=1, head_dim=8, hidden=128, intermediate=256,
                               vocab=10, max_context=64)  # fmt: skip
    options = memory.estimate_options(stats, geo, memory.Workload(context=16), budget=None)
    assert [o.option for o in options] == ["pre-quantized", "bf16"]
    assert options[1].weights == (256 * 128 + 128) * 2  # dequantized: 2 bytes per weight, scales dropped
    assert options[0].weights == stats.stored_bytes


def test_fits_best_fit_and_the_longest_context(tiny_model: TinyFactory) -> None:
    folder = tiny_model("qwen2")
    stats = memory.weight_stats([read_safetensors_header(folder / "model.safetensors")])
    geo = memory.geometry_from_config(json.loads((folder / "config.json").read_text()))
    work = memory.Workload(context=32768, images=0)
    bf16 = memory.estimate(stats, geo, work, "bf16", device_kind="cpu")
    options = memory.estimate_options(stats, geo, work, device_kind="cpu", budget=bf16.total)
    assert options[0].fits and memory.best_fit(options, bf16.total) is options[0]
    assert memory.best_fit(options, 1000) is None
    longest = memory.max_context_that_fits(stats, geo, work, "bf16", bf16.total // 2, device_kind="cpu")
    fits = memory.estimate(stats, geo, memory.Workload(context=longest, images=0), "bf16", device_kind="cpu")
    over = memory.estimate(stats, geo, memory.Workload(context=longest + 256, images=0), "bf16", device_kind="cpu")
    assert fits.total <= bf16.total // 2 < over.total


def test_device_budget() -> None:
    given = memory.device_budget("cuda", "24GiB")
    assert (given.kind, given.free) == ("given", 24 * GIB)
    ram = memory.device_budget("cpu")
    assert ram.kind == "cpu" and ram.free is not None and 0 < ram.free <= (ram.total or ram.free)


def test_estimator_and_doctor_run_without_importing_torch(tiny_model: TinyFactory) -> None:
    folder = tiny_model("qwen3_vl")
    code = (
        "import sys\n"
        "from vlmbridge import memory\n"
        "from vlmbridge.doctor import DoctorOptions, diagnose\n"
        f"report = diagnose({str(folder)!r}, DoctorOptions(device='cpu'))\n"
        "assert report.facts['memory']['image_tokens_per_image'] == 2040, report.facts\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
