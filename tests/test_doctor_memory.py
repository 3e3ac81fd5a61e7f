"""Memory findings, and the full-size Qwen3-VL-8B-Instruct fake: the doctor's figures against the facts file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from tests.doctor_cases import doctor, errors, problems, warns
from vlmbridge.doctor import Severity
from vlmbridge.folder import read_safetensors_header
from vlmbridge.tiny.fullsize import build_fullsize_qwen3_vl_8b

GIB = 1024**3


@pytest.fixture(scope="module")
def fake8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fullsize_qwen3_vl_8b(tmp_path_factory.mktemp("fullsize") / "Qwen3-VL-8B-Instruct")


def test_fake_is_sparse_with_transformers_own_tensor_names(fake8b: Path) -> None:
    shards = sorted(fake8b.glob("*.safetensors"))
    assert [s.name for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    apparent = sum(s.stat().st_size for s in shards)
    allocated = sum(s.stat().st_blocks * 512 for s in shards)
    assert apparent > 17e9 and allocated < 50e6  # 17.5 GB of weights in a few kB of disk
    tensors = {n: t for s in shards for n, t in read_safetensors_header(s).tensors.items()}
    assert len(tensors) == 750
    assert tensors["lm_head.weight"][1] == (151936, 4096)
    assert tensors["model.visual.patch_embed.proj.weight"][1] == (1152, 3, 2, 16, 16)
    assert "model.visual.deepstack_merger_list.2.linear_fc2.weight" in tensors
    index = json.loads((fake8b / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)


def test_fake_8b_figures_match_the_facts_file(fake8b: Path) -> None:
    report = doctor(fake8b, context=8192)
    memory = report.facts["memory"]
    assert memory["weights_stored_bytes"] == pytest.approx(17.53e9, rel=0.02)  # facts: 17.53 GB bf16
    assert memory["params"] == pytest.approx(8.77e9, rel=0.01)
    assert memory["kv_bytes_per_token"] == 144 * 1024  # 2 × 36 × 8 × 128 × 2 bytes
    assert memory["chosen"]["kv_cache"] == pytest.approx(1.125 * GIB)  # 8k tokens
    assert memory["image_tokens_per_image"] == 2040  # 1920×1080
    assert memory["max_image_tokens"] == 16384
    [weights] = [f for f in report.findings if f.code == "VB500"]
    assert "17.53 GB as stored" in weights.message
    [kv] = [f for f in report.findings if f.code == "VB501"]
    assert "144 KiB per token" in kv.message
    [images] = [f for f in report.findings if f.code == "VB502"]
    assert "1920×1080 image → 2040 image tokens" in images.message


def test_fake_8b_is_otherwise_healthy(fake8b: Path) -> None:
    report = doctor(fake8b, context=32768)
    assert not errors(report) and not warns(report), [f.message for f in report.findings if f.severity != "info"]


def test_fake_8b_on_24_and_16_gib(fake8b: Path) -> None:
    fits = doctor(fake8b, gpu_memory=24 * GIB, context=8192)
    assert "VB503" in fits.codes(Severity.INFO) and fits.exit_code == 0
    tight = doctor(fake8b, gpu_memory=16 * GIB, context=8192)
    [finding] = [f for f in tight.findings if f.code == "VB504"]
    assert finding.fix is not None and finding.fix.startswith("load as bnb-8bit")
    options = {o["option"]: o["fits"] for o in tight.facts["memory"]["options"]}
    assert options == {"as-stored": False, "bf16": False, "fp16": False, "bnb-8bit": True, "bnb-4bit": True}


def test_pixel_budget_changes_the_image_tokens(fake8b: Path) -> None:
    report = doctor(fake8b, max_pixels=1024 * 1024)
    assert report.facts["memory"]["image_tokens_per_image"] == 1008  # 1920×1080 → 768×1344 under 1 Mpx
    assert report.facts["memory"]["max_image_tokens"] == 1024


def test_tiny_fits_and_the_options_table(tiny_model: TinyFactory) -> None:
    report = doctor(tiny_model("qwen2_5_vl"))
    assert "VB503" in report.codes(Severity.INFO)
    assert [o["option"] for o in report.facts["memory"]["options"]] == [
        "as-stored", "bf16", "fp16", "bnb-8bit", "bnb-4bit",
    ]  # fmt: skip


def test_weights_alone_do_not_fit(tiny_model: TinyFactory) -> None:
    assert "VB504" in errors(doctor(tiny_model("qwen3_vl"), gpu_memory=100_000))


def test_workload_does_not_fit_and_a_shorter_context_is_offered(tiny_model: TinyFactory) -> None:
    report = doctor(tiny_model("qwen2"), gpu_memory=600 * 1024**2, context=1 << 20)
    [finding] = [f for f in report.findings if f.code == "VB505"]
    assert finding.fix is not None and "--context" in finding.fix


def test_unknown_device_memory(tiny_model: TinyFactory) -> None:
    report = doctor(tiny_model("qwen2"), gpu_memory=None, device="cuda:7")
    assert "VB506" in report.codes(Severity.INFO)


def test_images_overflowing_a_short_context(tiny_model: TinyFactory) -> None:
    report = doctor(tiny_model("qwen3_vl"), context=4096)
    [finding] = [f for f in report.findings if f.code == "VB507"]
    assert finding.fix is not None and "--max-pixels" in finding.fix
    assert "VB507" not in doctor(tiny_model("qwen3_vl"), context=4096, max_pixels=1024 * 1024).codes()


def test_text_model_has_no_image_figures(tiny_model: TinyFactory) -> None:
    report = doctor(tiny_model("qwen2"))
    assert "VB502" not in report.codes() and report.facts["memory"]["image_tokens_per_image"] == 0


def test_no_estimate_without_headers(tiny_copy: TinyFactory) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tiny_copy("qwen2")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    report = doctor(folder, allow_pickle_weights=True)
    assert "VB508" in report.codes(Severity.INFO) and problems(report) == ["VB112"]
