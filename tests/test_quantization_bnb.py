"""bitsandbytes: runtime int8/nf4 on the CPU backend (bitsandbytes 0.50 tested), `--quantization auto`, the settings and
flags that carry it, and `vlmbridge quantize` copies that load without re-quantizing. GPU variants are marked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import TinyFactory
from tests.test_quantization_load import UP, generate
from vlmbridge import plan as planning
from vlmbridge.errors import ModelFolderError, QuantizationError
from vlmbridge.folder import read_safetensors_header
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.memory import DeviceBudget
from vlmbridge.quant.convert import quantize_checkpoint
from vlmbridge.quant.formats import detect
from vlmbridge.settings import Settings
from vlmbridge.tiny.prequantized import build_prequantized

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'vlmbridge[quant]')")
CPU_BACKEND = "cpu" in getattr(bnb, "supported_torch_devices", set())
cpu_bnb = pytest.mark.skipif(not CPU_BACKEND, reason="the installed bitsandbytes has no CPU backend")
MIB = 1024**2


def linear_class(loaded: object, name: str = UP) -> str:
    if not hasattr(loaded.model.model, "language_model"):  # type: ignore[attr-defined]
        name = name.replace("model.language_model.", "model.")  # the text-only Qwen2
    return type(loaded.model.get_submodule(name)).__name__  # type: ignore[attr-defined]


@cpu_bnb
@pytest.mark.parametrize(("method", "cls"), [("bnb-8bit", "Linear8bitLt"), ("bnb-4bit", "Linear4bit")])
def test_runtime_quantization_on_cpu_generates(tiny_model: TinyFactory, method: str, cls: str) -> None:
    loaded = load_model(tiny_model("qwen3_vl"), LoadOptions(device="cpu", quantization=method))
    assert loaded.quantization == method and linear_class(loaded) == cls
    # The output head and the vision tower stay in bf16, as in the public quantized Qwen-VL repos.
    assert linear_class(loaded, "lm_head") == linear_class(loaded, "model.visual.blocks.0.attn.qkv") == "Linear"
    tokens, image_tokens = generate(loaded)
    assert len(tokens) > 0 and image_tokens > 0


@cpu_bnb
def test_bnb_8bit_matmul_log_lines_are_dropped(tiny_model: TinyFactory, caplog: pytest.LogCaptureFixture) -> None:
    loaded = load_model(tiny_model("qwen2"), LoadOptions(device="cpu", quantization="bnb-8bit"))
    with caplog.at_level(logging.WARNING):
        loaded.model(torch.tensor([[1, 2, 3]]))
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]


@cpu_bnb
def test_auto_quantizes_when_bf16_does_not_fit(
    tiny_model: TinyFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tiny_model("qwen2")
    roomy = planning.make_plan(folder, planning.PlanInputs(device="cpu", gpu_memory=1 << 40, context=4096))
    sizes = {r.estimate.option: r.estimate.total for r in roomy.rows}
    between = (sizes["bnb-4bit"] + sizes["as-stored"]) // 2  # 4-bit fits, bf16 does not
    budget = DeviceBudget(kind="cpu", name="RAM", free=between, total=between, detail="test budget")
    monkeypatch.setattr(planning, "device_budget", lambda device, size: budget)
    with caplog.at_level(logging.INFO, logger="vlmbridge"):
        loaded = load_model(folder, LoadOptions(device="cpu", quantization="auto", context_length=4096))
    # On the CPU int8 is skipped: its matmul buffers cost more than it saves (benchmarks/bench_memory.py).
    assert loaded.quantization == "bnb-4bit" and linear_class(loaded) == "Linear4bit"
    assert loaded.quantization_reason.startswith("as stored (bf16) needs")
    [record] = [r for r in caplog.records if "--quantization auto chose" in r.getMessage()]
    assert record.levelno == logging.WARNING and "bnb-4bit (nf4) needs" in record.getMessage()


def test_auto_leaves_a_fitting_model_alone(tiny_model: TinyFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vlmbridge"):
        loaded = load_model(tiny_model("qwen2"), LoadOptions(device="cpu", quantization="auto"))
    assert loaded.quantization == "none" and "fits" in loaded.quantization_reason
    assert any("--quantization auto chose none" in r.getMessage() for r in caplog.records)


def test_settings_and_environment_carry_the_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().quantization == "auto"
    monkeypatch.setenv("VLMBRIDGE_QUANTIZATION", "bnb-4bit")
    monkeypatch.setenv("VLMBRIDGE_ALLOW_DEQUANTIZE", "1")
    options = LoadOptions.from_settings(Settings(context_length=4096))
    assert (options.quantization, options.allow_dequantize, options.context_length) == ("bnb-4bit", True, 4096)
    monkeypatch.setenv("VLMBRIDGE_QUANTIZATION", "int3")
    with pytest.raises(ValueError, match="quantization"):
        Settings()


def test_doctor_judges_the_fit_of_the_chosen_quantization(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.doctor_cases import doctor
    from vlmbridge.doctor import DoctorOptions
    from vlmbridge.tiny.fullsize import build_fullsize_qwen3_vl_8b

    fake = build_fullsize_qwen3_vl_8b(tmp_path_factory.mktemp("fullsize-q") / "Qwen3-VL-8B-Instruct")
    tight = {"gpu_memory": 16 * 1024**3, "context": 8192, "device": "cuda"}
    assert "VB504" in doctor(fake, **tight).codes()  # bf16 does not fit
    for quantization in ("bnb-8bit", "auto"):
        report = doctor(fake, quantization=quantization, **tight)
        assert report.facts["memory"]["chosen"]["option"] == "bnb-8bit" and "VB503" in report.codes()
    assert DoctorOptions.from_settings(Settings(quantization="bnb-4bit")).quantization == "bnb-4bit"


@cpu_bnb
@pytest.mark.parametrize(
    ("method", "weight_dtype", "state"), [("bnb-4bit", "U8", "weight.absmax"), ("bnb-8bit", "I8", "SCB")]
)
def test_quantize_writes_a_copy_that_loads_without_requantizing(
    tiny_model: TinyFactory, tmp_path: Path, method: str, weight_dtype: str, state: str
) -> None:
    source = tiny_model("qwen3_vl")
    result = quantize_checkpoint(source, tmp_path / "q", method, device="cpu")  # type: ignore[arg-type]
    assert result.out_bytes < result.source_bytes and result.device == "cpu"
    config = json.loads((result.out / "config.json").read_text())
    pre = detect(config)  # the bitsandbytes kind of pre-quantized checkpoint, with its needs
    assert pre is not None and (pre.method, pre.scheme) == ("bitsandbytes", "nf4" if method == "bnb-4bit" else "int8")
    assert [pip for _, pip in pre.needs] == ["bitsandbytes", "accelerate"] and result.scheme == pre.scheme
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", "model.visual", "visual"]
    tensors = read_safetensors_header(result.out / "model.safetensors").tensors
    assert tensors[f"{UP}.weight"][0] == weight_dtype and f"{UP}.{state}" in tensors
    assert (result.out / "processor_config.json").exists() and (result.out / "chat_template.jinja").exists()

    fresh = load_model(source, LoadOptions(device="cpu", quantization=method))
    saved = load_model(result.out, LoadOptions(device="cpu", quantization="auto"))
    assert saved.quantization == "bitsandbytes" and linear_class(saved) == linear_class(fresh)
    # The stored integers are used as they are: the same quantized weights as quantizing afresh.
    assert torch.equal(saved.model.get_submodule(UP).weight.data, fresh.model.get_submodule(UP).weight.data)
    tokens, image_tokens = generate(saved)
    assert len(tokens) > 0 and image_tokens > 0


def test_quantize_refuses_what_it_cannot_do(tiny_model: TinyFactory, tmp_path: Path) -> None:
    fp8 = build_prequantized(tiny_model("qwen3_vl"), tmp_path / "fp8", "fp8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_checkpoint(fp8, tmp_path / "out", "bnb-4bit", device="cpu")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ModelFolderError, match="not empty"):
        quantize_checkpoint(tiny_model("qwen2"), tmp_path / "taken", "bnb-4bit", device="cpu")
    with pytest.raises(ModelFolderError, match="source folder"):
        quantize_checkpoint(tiny_model("qwen2"), tiny_model("qwen2"), "bnb-4bit", device="cpu")


@cpu_bnb
def test_quantize_and_chat_commands(
    tiny_model: TinyFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlmbridge.cli.app import main

    def cli(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return int(code or 0), captured.out, captured.err

    code, out, err = cli("quantize", str(tiny_model("qwen2")), str(tmp_path / "q8"), "--method", "bnb-8bit")
    assert code == 0, err
    assert "bnb-8bit (int8) copy written to" in out and "vlmbridge serve" in out
    code, _, err = cli("quantize", str(tiny_model("qwen2")), str(tmp_path / "q3"), "--method", "bnb-3bit")
    assert code == 1 and "unknown method 'bnb-3bit'" in err
    code, out, err = cli("chat", str(tmp_path / "q8"), "hello", "--max-tokens", "3", "--device", "cpu")
    assert code == 0, err
    code, out, err = cli("chat", str(tiny_model("qwen2")), "hi", "--max-tokens", "3", "--quantization", "bnb-4bit")
    assert code == 0, err
    code, _, err = cli("chat", str(tiny_model("qwen2")), "hi", "--quantization", "int3")
    assert code == 2 and "quantization" in err


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["bnb-8bit", "bnb-4bit"])
def test_bnb_on_cuda(tiny_model: TinyFactory, tmp_path: Path, method: str) -> None:
    loaded = load_model(tiny_model("qwen3_vl"), LoadOptions(device="cuda", quantization=method))
    assert loaded.device.type == "cuda" and linear_class(loaded) in ("Linear8bitLt", "Linear4bit")
    tokens, image_tokens = generate(loaded)
    assert len(tokens) > 0 and image_tokens > 0
    result = quantize_checkpoint(tiny_model("qwen3_vl"), tmp_path / "q", method, device="cuda")  # type: ignore[arg-type]
    saved = load_model(result.out, LoadOptions(device="cuda"))
    assert saved.quantization == "bitsandbytes" and generate(saved)[0]


@pytest.mark.gpu
def test_fp8_on_cuda_runs_in_fp8_or_refuses(tiny_model: TinyFactory, tmp_path: Path) -> None:
    from vlmbridge.quant.formats import installed

    fp8 = build_prequantized(tiny_model("qwen3_vl"), tmp_path / "fp8", "fp8")
    if torch.cuda.get_device_capability() >= (8, 9) and not installed("kernels"):
        with pytest.raises(QuantizationError, match="kernels"):
            load_model(fp8, LoadOptions(device="cuda"))
    elif torch.cuda.get_device_capability() >= (8, 9):
        loaded = load_model(fp8, LoadOptions(device="cuda"))
        assert loaded.quantization == "fp8" and linear_class(loaded) == "FP8Linear"
        assert generate(loaded)[0]
    else:
        with pytest.raises(QuantizationError, match=r"compute capability >= 8\.9"):
            load_model(fp8, LoadOptions(device="cuda"))
