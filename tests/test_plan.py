"""`vlmbridge plan`: the full-size Qwen3-VL-8B fake against the facts file, the recommendation, JSON, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from vlmbridge import plan as planning
from vlmbridge.errors import ModelFolderError
from vlmbridge.memory import DeviceBudget
from vlmbridge.plan import PlanInputs, choose_quantization, make_plan
from vlmbridge.tiny.fullsize import build_fullsize_qwen3_vl_8b

GIB = 1024**3


@pytest.fixture(scope="module")
def fake8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fullsize_qwen3_vl_8b(tmp_path_factory.mktemp("fullsize") / "Qwen3-VL-8B-Instruct")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command in-process, as its entry point runs it: (exit code, stdout, stderr)."""
    from vlmbridge.cli.app import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return int(code or 0), captured.out, captured.err


def rows(plan: planning.Plan) -> dict[str, planning.PlanRow]:
    return {r.estimate.option: r for r in plan.rows}


def test_8b_figures_agree_with_the_facts_file(fake8b: Path) -> None:
    plan = make_plan(fake8b, PlanInputs(gpu_memory=16 * GIB, context=8192))
    bf16 = rows(plan)["bf16"].estimate
    assert bf16.weights == pytest.approx(17.53e9, rel=0.001)  # facts: 17.53 GB bf16 weights
    assert bf16.kv_cache == int(1.125 * GIB)  # 144 KiB × 8192 tokens
    assert bf16.image_tokens == 2040  # one 1920×1080 image
    assert [r.estimate.option for r in plan.rows] == ["as-stored", "bf16", "fp16", "bnb-8bit", "bnb-4bit"]


def test_8b_on_16_gib_needs_bitsandbytes(fake8b: Path) -> None:
    plan = make_plan(fake8b, PlanInputs(gpu_memory=16 * GIB, context=8192))
    fits = {o: r.estimate.fits for o, r in rows(plan).items()}
    assert fits == {"as-stored": False, "bf16": False, "fp16": False, "bnb-8bit": True, "bnb-4bit": True}
    rec = plan.recommendation
    assert rec.row is not None and rec.row.estimate.option == "bnb-8bit"  # best quality that fits
    assert rec.row.flags == ("--quantization", "bnb-8bit")
    assert "best quality that fits" in rec.reason and "would need 22.72 GiB" in rec.reason
    assert choose_quantization(plan)[0] == "bnb-8bit"


def test_8b_on_24_gib_fits_in_bf16(fake8b: Path) -> None:
    plan = make_plan(fake8b, PlanInputs(gpu_memory=24 * GIB, context=8192))
    assert all(r.estimate.fits for r in plan.rows)
    rec = plan.recommendation
    assert rec.row is not None and rec.row.estimate.option == "as-stored" and rec.row.flags == ()
    assert choose_quantization(plan) == ("none", "as stored (bf16) fits: needs 22.72 GiB of the 24 GiB budget")


def test_plan_and_doctor_share_the_estimator(fake8b: Path) -> None:
    from tests.doctor_cases import doctor

    report = doctor(fake8b, gpu_memory=16 * GIB, context=8192)
    plan = make_plan(fake8b, PlanInputs(gpu_memory=16 * GIB, context=8192))
    doctor_rows = {o["option"]: o["total"] for o in report.facts["memory"]["options"]}
    assert doctor_rows == {r.estimate.option: r.estimate.total for r in plan.rows}


def test_nothing_fits_offers_a_context(fake8b: Path) -> None:
    plan = make_plan(fake8b, PlanInputs(gpu_memory=10 * GIB, context=131072))
    assert plan.recommendation.row is None
    assert "nothing fits in the 10 GiB budget" in plan.recommendation.reason
    assert "--context" in plan.recommendation.reason
    quantization, why = choose_quantization(plan)
    assert quantization == "bnb-4bit" and "comes closest" in why


def test_cli_table_for_16_and_24_gib(fake8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "plan", str(fake8b), "--gpu-memory", "16GiB", "--context", "8192")
    assert code == 0, err
    assert "17.53 GB as stored (bf16)" in out and "1.125 GiB for 8192 tokens" in out
    assert "→ 2040 image tokens each" in out and "budget: 16 GiB" in out
    assert "recommended: bnb-8bit (int8)" in out and f"vlmbridge serve {fake8b} --quantization bnb-8bit" in out
    code, out, _ = cli(capsys, "plan", str(fake8b), "--gpu-memory", "24GiB", "--context", "8192")
    assert code == 0 and "recommended: as stored (bf16)" in out


def test_cli_json_schema(fake8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "plan", str(fake8b), "--gpu-memory", "16GiB", "--context", "8192", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "vlmbridge.plan/1"
    assert data["kv_bytes_per_token"] == 144 * 1024 and data["image_tokens_per_image"] == 2040
    assert data["device"] == {"name": "--gpu-memory", "kind": "cuda", "free_bytes": 16 * GIB, "total_bytes": 16 * GIB,
                              "compute_capability": None, "detail": "as given"}  # fmt: skip
    assert data["recommendation"]["option"] == "bnb-8bit"
    assert data["recommendation"]["flags"] == ["--quantization", "bnb-8bit"]
    first = data["options"][0]
    assert {"option", "label", "weights", "kv_cache", "image_tokens", "vision_activations", "overhead", "total",
            "fits", "available", "blocker", "flags", "quantization"} <= set(first)  # fmt: skip


def test_cli_exit_codes(fake8b: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "plan", str(fake8b), "--gpu-memory", "4GiB")
    assert code == 1 and "no recommendation: nothing fits" in out
    code, _, err = cli(capsys, "plan", str(fake8b), "--gpu-memory", "16XB")
    assert code == 2 and "--gpu-memory" in err
    code, _, err = cli(capsys, "plan", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in err


def test_plan_runs_without_importing_torch(fake8b: Path) -> None:
    code = (
        "import sys\n"
        "from vlmbridge.plan import PlanInputs, make_plan\n"
        f"plan = make_plan({str(fake8b)!r}, PlanInputs(device='cpu', gpu_memory=1 << 40))\n"
        "assert plan.recommendation.row is not None\n"
        "assert not [m for m in ('torch', 'transformers') if m in sys.modules]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cpu_plan_marks_fp16_and_missing_packages(tiny_model: TinyFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "installed", lambda module: module != "bitsandbytes")
    plan = make_plan(tiny_model("qwen3_vl"), PlanInputs(device="cpu", gpu_memory=1 << 40))
    by_option = rows(plan)
    assert by_option["fp16"].blocker.startswith("the loader refuses fp16 on the CPU")
    assert by_option["bnb-4bit"].blocker == "needs bitsandbytes (pip install bitsandbytes)"
    monkeypatch.setattr(planning, "installed", lambda module: True)
    with_bnb = rows(make_plan(tiny_model("qwen3_vl"), PlanInputs(device="cpu", gpu_memory=1 << 40)))
    assert with_bnb["bnb-8bit"].blocker.startswith("on the CPU bitsandbytes' int8 matmul")
    assert with_bnb["bnb-4bit"].available
    assert plan.device_kind == "cpu" and plan.rows[0].estimate.overhead < 512 * 1024**2  # no CUDA context on CPU


def test_auto_skips_a_missing_bitsandbytes_and_says_so(
    tiny_model: TinyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planning, "installed", lambda module: module != "bitsandbytes")
    plan = make_plan(tiny_model("qwen2"), PlanInputs(device="cpu", gpu_memory=1024))
    quantization, why = choose_quantization(plan)
    assert quantization == "none" and "needs bitsandbytes" in why


def test_unknown_memory_gives_no_recommendation(tiny_model: TinyFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = DeviceBudget(kind="cuda", name="cuda:7", free=None, total=None, detail="no such CUDA device")
    monkeypatch.setattr(planning, "device_budget", lambda device, size: unknown)
    plan = make_plan(tiny_model("qwen2"), PlanInputs(device="cuda:7"))
    assert plan.recommendation.row is None and "--gpu-memory" in plan.recommendation.reason
    assert all(r.estimate.fits is None for r in plan.rows)
    assert choose_quantization(plan)[0] == "none"


def test_pickle_only_folder_cannot_be_planned(tiny_copy: TinyFactory) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tiny_copy("qwen2")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="no safetensors weights"):
        make_plan(folder)


def test_tensor_and_pipeline_parallel_plan_one_gpus_share(fake8b: Path) -> None:
    """engine: vllm with TP×PP: weights and KV split over the GPUs, each row fits against one GPU."""
    whole = rows(make_plan(fake8b, PlanInputs(gpu_memory=16 * GIB, context=8192)))["bf16"].estimate
    split = rows(make_plan(fake8b, PlanInputs(gpu_memory=16 * GIB, context=8192, tensor_parallel=2)))["bf16"].estimate
    assert whole.fits is False and split.fits is True
    assert split.weights == -(-whole.weights // 2) and split.kv_cache == -(-whole.kv_cache // 2)
    assert split.total == whole.total - whole.weights - whole.kv_cache + split.weights + split.kv_cache
    assert "per GPU of 2" in split.note
    four = rows(make_plan(fake8b, PlanInputs(context=8192, tensor_parallel=2, pipeline_parallel=2)))["bf16"].estimate
    assert four.weights == -(-whole.weights // 4)


def test_plan_cli_takes_the_parallel_layout(fake8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "plan", str(fake8b), "--gpu-memory", "16GiB", "--context", "8192",
                       "--tensor-parallel-size", "2", "--json")  # fmt: skip
    data = json.loads(out)
    bf16 = next(r for r in data["options"] if r["option"] == "bf16")
    assert code == 0 and bf16["fits"] is True and "per GPU of 2" in bf16["note"]


def test_the_pool_counts_vllms_share_of_the_gpu_not_the_models_plan(tiny_model: TinyFactory) -> None:
    from vlmbridge.pool.prepare import planned_bytes
    from vlmbridge.settings import ModelSettings

    folder = tiny_model("qwen3_vl")
    h200 = DeviceBudget(kind="cuda", name="H200", free=140 * GIB, total=140 * GIB, detail="a GPU of 140 GiB")
    plan = planned_bytes(ModelSettings(), folder, h200)  # the transformers engine: what the model needs
    assert plan < GIB
    # vLLM fills gpu_memory_utilization of the GPU at start-up (its KV cache takes what the weights leave).
    assert planned_bytes(ModelSettings(engine="vllm"), folder, h200) == int(0.9 * 140 * GIB)
    half = ModelSettings(engine="vllm", gpu_memory_utilization=0.5)
    assert planned_bytes(half, folder, h200) == 70 * GIB
    ram = DeviceBudget(kind="cpu", name="RAM", free=20 * GIB, total=24 * GIB, detail="RAM")
    on_cpu = ModelSettings(engine="vllm", vllm_cpu_kv_cache_gib=2)
    assert planned_bytes(on_cpu, folder, ram) == plan + 2 * GIB  # on a CPU: the plan and the KV space set apart
