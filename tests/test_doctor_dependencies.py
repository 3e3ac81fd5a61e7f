"""Dependencies: quantization packages, FP8 without a capable GPU, flash-attention, torchvision, accelerate.

Missing packages are real: optimum, gptqmodel and flash_attn are not installed here (compressed-tensors, in the
quant extra, is hidden), and the torch/torchvision/accelerate/transformers cases run the doctor in a Python whose
path lacks those packages.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest

import vlmbridge
from tests.conftest import TinyFactory
from tests.custom_model import build_custom_model
from tests.doctor_cases import doctor, edit_json, errors, explained_by, failure, load_vlm, warns
from vlmbridge.doctor import Severity
from vlmbridge.doctor.checks.dependencies import installed

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def test_gptq_checkpoint_without_its_packages(tiny_copy: TinyFactory) -> None:
    assert not installed("optimum") and not installed("gptqmodel")
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(quantization_config=GPTQ))
    report = doctor(folder)
    [finding] = [f for f in report.findings if f.code == "VB400"]
    assert finding.fix == "pip install optimum gptqmodel"
    [tp] = [f for f in report.findings if f.code == "VB407"]  # intermediate 128, group 128: only TP 1 divides
    assert "sizes [1] divide" in tp.message
    explained_by(failure(lambda: load_vlm(folder)), "VB400")


def test_compressed_tensors_checkpoint_without_the_package(
    tiny_copy: TinyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmbridge.doctor.checks import dependencies

    # compressed-tensors is in the quant extra (the quantized-loading tests use it): hide it here.
    monkeypatch.setattr(dependencies, "installed", lambda module: module != "compressed_tensors" and installed(module))
    folder = tiny_copy("qwen3_vl")
    qc = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"group_size": 32}}}}
    edit_json(folder / "config.json", lambda c: c.update(quantization_config=qc))
    report = doctor(folder)
    assert "VB400" in errors(report) and "VB407" in report.codes(Severity.INFO)


def test_fp8_on_cpu_is_dequantized_with_twice_the_memory(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(quantization_config=FP8))
    report = doctor(folder, gpu_memory=None, device="cpu")
    assert "VB401" in report.codes(Severity.INFO) and "VB402" in warns(report)
    assert report.facts["memory"]["chosen"]["option"] == "bf16"  # what transformers will actually hold
    # transformers only logs it — the silent 2× the errors table warns about. Capture its words and explain them.
    import transformers

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    level = transformers.logging.get_verbosity()
    try:
        transformers.logging.set_verbosity_warning()  # type: ignore[no-untyped-call]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.AutoModelForImageTextToText.from_pretrained(folder)
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(level)
    explained_by(buffer.getvalue(), "VB402")


def test_unknown_quantization_method(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(quantization_config={"quant_method": "magic-bits"}))
    assert "VB406" in warns(doctor(folder))


def test_flash_attention_requested_but_not_installed(tiny_model: TinyFactory) -> None:
    assert not installed("flash_attn")
    folder = tiny_model("qwen3_vl")
    assert "VB403" in errors(doctor(folder, attn_implementation="flash_attention_2"))
    assert "VB403" not in doctor(folder).codes()
    import transformers

    explained_by(
        failure(lambda: transformers.AutoModelForImageTextToText.from_pretrained(
            folder, attn_implementation="flash_attention_2")),
        "VB403",
    )  # fmt: skip


def _python_without(tmp_path: Path, hidden: set[str]) -> Path:
    """A site-packages view with every installed package except `hidden` (symlinks; nothing is copied)."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site-view"
    view.mkdir()
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].split(".")[0].lower()
        if stem in hidden or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
            continue
        (view / entry.name).symlink_to(entry)
    return view


def test_missing_runtime_packages_in_a_real_environment(tiny_model: TinyFactory, tmp_path: Path) -> None:
    view = _python_without(tmp_path, {"torch", "torchvision", "accelerate", "transformers"})
    src = Path(vlmbridge.__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path[:0] = [{str(view)!r}, {str(src)!r}]; from vlmbridge.cli.app import main; "
        f"sys.exit(main(['doctor', {str(tiny_model('qwen3_vl'))!r}, '--json', '--gpu-memory', '1TiB']))"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    codes = {f["code"] for f in report["findings"] if f["severity"] == "error"}
    assert {"VB404", "VB405", "VB408"} <= codes, result.stdout[-2000:] + result.stderr[-2000:]
    assert "VB900" not in {f["code"] for f in report["findings"]}  # no transformers: checks that need it step aside
    assert result.returncode == 1
    assert report["facts"]["memory"]["image_tokens_per_image"] == 2040  # the estimate needs no torch


def test_qwen_vl_v1_remote_code_needs_tiktoken(tiny_model: TinyFactory, tmp_path: Path) -> None:
    assert not installed("tiktoken")
    folder = build_custom_model(tmp_path / "qwen-vl-v1", tiny_model("qwen2"))
    edit_json(folder / "config.json", lambda c: c.update(model_type="qwen"))
    assert "VB409" in errors(doctor(folder))


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2"])
def test_nothing_missing_here(tiny_model: TinyFactory, family: str) -> None:
    assert not [c for c in doctor(tiny_model(family)).codes() if c.startswith("VB4")]
