"""Loading pre-quantized checkpoints: refused with the fix where transformers would silently dequantize, loaded
(really dequantizing the stored FP8 / int4 tensors) and generating when allowed, and the missing-package errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import TinyFactory
from tests.helpers import decoded, image_question
from tests.helpers import generate as through_front
from vlmbridge.engine.transformers.engine import TransformersEngine
from vlmbridge.engine.types import GenerationRequest, SamplingParams
from vlmbridge.errors import QuantizationError
from vlmbridge.loader import LoadedModel, LoadOptions, load_model
from vlmbridge.quant.formats import installed
from vlmbridge.tiny.prequantized import PreQuantKind, build_prequantized

UP = "model.language_model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("prequantized-load")
    kinds: tuple[PreQuantKind, ...] = ("fp8", "compressed-tensors", "gptq", "awq")
    yield {kind: build_prequantized(tiny_model("qwen3_vl"), root / kind, kind) for kind in kinds}


@pytest.fixture(scope="module")
def reference(tiny_model: TinyFactory) -> LoadedModel:
    return load_model(tiny_model("qwen3_vl"), LoadOptions(device="cpu", dtype="bf16"))


def generate(loaded: LoadedModel, tokens: int = 6) -> tuple[list[int], int]:
    """Greedy tokens for an image question through the real engine, and the image tokens it counted."""
    engine = TransformersEngine(loaded, "quantized")
    engine.start()
    try:
        request = GenerationRequest(
            messages=image_question(decoded(320, 240, seed=3)),
            sampling=SamplingParams(max_new_tokens=tokens, temperature=0.0),
        )
        chunks = list(through_front(engine, request))
    finally:
        engine.shutdown()
    errors = [c.error for c in chunks if c.error is not None]
    assert not errors, errors
    usage = chunks[-1].usage
    assert usage is not None
    return [t for c in chunks for t in c.token_ids], usage.image_tokens


def weight_of(loaded: LoadedModel, name: str) -> torch.Tensor:
    return loaded.model.get_submodule(name).weight.detach().float()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["fp8", "compressed-tensors"])
def test_dequantizing_on_cpu_is_refused_with_the_fix(prequantized: dict[str, Path], kind: str) -> None:
    if kind == "compressed-tensors" and not installed("compressed_tensors"):
        pytest.skip("compressed-tensors is not installed (pip install 'vlmbridge[quant]')")
    with pytest.raises(QuantizationError) as caught:
        load_model(prequantized[kind], LoadOptions(device="cpu"))
    assert "refusing to dequantize silently" in caught.value.message
    assert "dequantized)" in caught.value.message  # the sizes: stored vs dequantized
    assert caught.value.fix is not None and "--allow-dequantize" in caught.value.fix


def test_fp8_loads_dequantized_and_generates(prequantized: dict[str, Path], reference: LoadedModel) -> None:
    loaded = load_model(prequantized["fp8"], LoadOptions(device="cpu", allow_dequantize=True))
    assert loaded.quantization == "fp8 → dequantized" and "compute capability >= 8.9" in loaded.quantization_reason
    layer = loaded.model.get_submodule(UP)
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.bfloat16
    ours, ref = weight_of(loaded, UP), weight_of(reference, UP)
    # e4m3 keeps 3 mantissa bits: each weight within 1/16 of its block's largest (per 16×16 block scale).
    assert not torch.equal(ours, ref) and (ours - ref).abs().max() <= ref.abs().max() / 16
    tokens, image_tokens = generate(loaded)
    assert len(tokens) > 0 and image_tokens > 0


def test_fp8_dequantizes_into_the_requested_dtype(prequantized: dict[str, Path]) -> None:
    loaded = load_model(prequantized["fp8"], LoadOptions(device="cpu", dtype="fp32", allow_dequantize=True))
    assert loaded.model.get_submodule(UP).weight.dtype == torch.float32


def test_compressed_tensors_loads_dequantized_and_generates(
    prequantized: dict[str, Path], reference: LoadedModel
) -> None:
    pytest.importorskip("compressed_tensors")
    loaded = load_model(prequantized["compressed-tensors"], LoadOptions(device="cpu", allow_dequantize=True))
    assert loaded.quantization == "compressed-tensors → dequantized"
    layer = loaded.model.get_submodule(UP)
    # Dequantized while loading (not lazily on the first forward pass): plain bf16 weights, no packed ints left.
    assert {n for n, _ in layer.named_parameters()} == {"weight"} and layer.weight.dtype == torch.bfloat16
    ours, ref = weight_of(loaded, UP), weight_of(reference, UP)
    # Symmetric int4 per group of 32: each weight within half a step (amax / 7.5 / 2) of the original.
    assert not torch.equal(ours, ref) and (ours - ref).abs().max() <= ref.abs().max() / 15 * 1.01
    tokens, image_tokens = generate(loaded)
    assert len(tokens) > 0 and image_tokens > 0


@pytest.mark.parametrize(("kind", "packages"), [("gptq", "optimum and gptqmodel"), ("awq", "gptqmodel")])
def test_awq_and_gptq_need_gptqmodel(prequantized: dict[str, Path], kind: str, packages: str) -> None:
    if installed("gptqmodel"):
        pytest.skip("gptqmodel is installed here")
    with pytest.raises(QuantizationError) as caught:
        load_model(prequantized[kind], LoadOptions(device="cpu", allow_dequantize=True))
    assert f"this {kind} checkpoint needs {packages}" in caught.value.message
    assert caught.value.fix is not None and caught.value.fix.startswith("pip install ")


def test_a_pre_quantized_checkpoint_is_not_quantized_again(prequantized: dict[str, Path]) -> None:
    with pytest.raises(QuantizationError, match="already quantized") as caught:
        load_model(prequantized["fp8"], LoadOptions(device="cpu", quantization="bnb-4bit"))
    assert caught.value.fix == "use --quantization auto or none, or start from the bf16 checkpoint"


def test_auto_keeps_the_checkpoints_own_quantization(prequantized: dict[str, Path]) -> None:
    loaded = load_model(prequantized["fp8"], LoadOptions(device="cpu", quantization="auto", allow_dequantize=True))
    assert loaded.quantization == "fp8 → dequantized"


def test_missing_compressed_tensors_is_a_clear_error(
    prequantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmbridge.quant import formats

    monkeypatch.setattr(formats, "installed", lambda module: module != "compressed_tensors")
    with pytest.raises(QuantizationError) as caught:
        load_model(prequantized["compressed-tensors"], LoadOptions(device="cpu", allow_dequantize=True))
    assert caught.value.fix == "pip install compressed-tensors"


def test_fp8_on_a_capable_gpu_needs_the_kernels_package(
    prequantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision alone (no GPU here): capability 9.0 keeps FP8, whose matmul transformers 5.24 takes from the
    `kernels` package; without it the load is refused, or dequantized with --allow-dequantize."""
    from vlmbridge.folder import ModelFolder
    from vlmbridge.quant import formats
    from vlmbridge.quant import load as quant_load

    monkeypatch.setattr(quant_load, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(formats, "installed", lambda module: module != "kernels")
    folder = ModelFolder.open(prequantized["fp8"])

    def decide(allow: bool) -> quant_load.QuantizedLoad:
        return quant_load.prepare_quantization(
            folder, quantization="auto", allow_dequantize=allow, device=torch.device("cuda", 0),
            dtype=torch.bfloat16, dtype_name="auto",
        )  # fmt: skip

    with pytest.raises(QuantizationError, match="kernels, which is not installed") as caught:
        decide(False)
    assert caught.value.fix is not None and caught.value.fix.startswith("pip install kernels")
    fallback = decide(True)
    assert fallback.label == "fp8 → dequantized"
    assert fallback.kwargs["config"].quantization_config["dequantize"] is True
    monkeypatch.setattr(formats, "installed", lambda module: True)
    native = decide(False)
    assert native.label == "fp8" and native.kwargs == {} and "kernels" in native.reason
