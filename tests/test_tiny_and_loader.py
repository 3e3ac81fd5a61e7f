"""Tiny checkpoints: exact file sets, and the loader picks the classes of the facts file and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ALL_FAMILIES, TinyFactory
from tests.helpers import generate
from vlmbridge.engine.transformers.engine import TransformersEngine
from vlmbridge.engine.types import ChatMessage, GenerationRequest, SamplingParams
from vlmbridge.errors import ModelLoadError, UnsafeWeightsError, UnsupportedModelError
from vlmbridge.loader import LoadOptions, load_model, resolve_dtype

# From shared/reference/qwen-vl-facts.md.
EXPECTED_CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "AutoModelForImageTextToText"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "AutoModelForImageTextToText"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "AutoModelForImageTextToText"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "AutoModelForImageTextToText"),
    "qwen2": ("Qwen2ForCausalLM", None, "AutoModelForCausalLM"),
}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}
OFFICIAL_SMALL_FILES = {
    "qwen3_vl": {"config.json", "generation_config.json", "chat_template.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", *TOKENIZER_FILES},
    "qwen3_vl_moe": {"config.json", "generation_config.json", "chat_template.json", "preprocessor_config.json",
                     "video_preprocessor_config.json", *TOKENIZER_FILES},
    "qwen2_5_vl": {"config.json", "generation_config.json", "chat_template.json", "preprocessor_config.json",
                   *TOKENIZER_FILES},
    "qwen2_vl": {"config.json", "generation_config.json", "chat_template.json", "preprocessor_config.json",
                 *TOKENIZER_FILES},
    "qwen2": {"config.json", "generation_config.json", *TOKENIZER_FILES},
}  # fmt: skip


def _weights(shards: int) -> set[str]:
    if shards == 1:
        return {"model.safetensors"}
    return {
        "model.safetensors.index.json",
        *(f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)),
    }


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("layout", ["official", "transformers"])
@pytest.mark.parametrize("shards", [1, 3])
def test_every_family_layout_and_sharding_loads_and_generates(
    tiny_model: TinyFactory, family: str, layout: str, shards: int
) -> None:
    folder = tiny_model(family, layout, shards)
    names = {p.name for p in folder.iterdir()}
    if layout == "official":
        assert names == OFFICIAL_SMALL_FILES[family] | _weights(shards)
    else:
        expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
        if family != "qwen2":
            expected |= {"processor_config.json", "chat_template.jinja"}
        else:
            expected |= {"chat_template.jinja"}
        assert names == expected | _weights(shards)
    assert not any(n.endswith((".py", ".bin")) or n == "special_tokens_map.json" for n in names)

    loaded = load_model(folder, LoadOptions(device="cpu"))
    model_class, processor_class, auto_class = EXPECTED_CLASSES[family]
    assert loaded.model_class == model_class
    assert loaded.processor_class == processor_class
    assert loaded.auto_class == auto_class
    assert loaded.dtype == torch.bfloat16  # auto = the stored dtype, which CPUs support
    assert not loaded.remote_code

    engine = TransformersEngine(loaded, "t")
    engine.start(warm_up=False)
    try:
        chunks = list(
            generate(
                engine,
                GenerationRequest(
                    messages=(ChatMessage("user", "Hello"),),
                    sampling=SamplingParams(max_new_tokens=5, temperature=0),
                ),
            )
        )
    finally:
        engine.shutdown()
    last = chunks[-1]
    assert last.error is None
    assert last.usage is not None and last.usage.completion_tokens >= 1
    assert last.finish_reason in ("stop", "length")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_special_token_ids_are_wired_into_the_config(tiny_model: TinyFactory, family: str) -> None:
    from transformers import AutoTokenizer

    folder = tiny_model(family, "official")
    config = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    if family != "qwen2":
        for key, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]:
            assert config[key] == tok.convert_tokens_to_ids(token)
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
    assert vocab >= len(tok)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_official_qwen2_vl_layout_is_the_legacy_format(tiny_model: TinyFactory, family: str) -> None:
    """Public Qwen2/2.5-VL repos have a flat config, min/max_pixels keys and pre-4.52 tensor names."""
    folder = tiny_model(family, "official")
    config = json.loads((folder / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert {"min_pixels", "max_pixels"} <= set(pre) and "size" not in pre
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    assert any(n.startswith("visual.") for n in names)
    assert not any(n.startswith("model.language_model.") for n in names)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_both_layouts_hold_the_same_model(tiny_model: TinyFactory, family: str) -> None:
    """Same seed, two layouts: identical logits, so legacy names/configs are really loaded (not re-initialised)."""
    logits = []
    for layout in ("official", "transformers"):
        loaded = load_model(tiny_model(family, layout), LoadOptions(device="cpu", dtype="fp32"))
        ids = loaded.tokenizer("The quick brown fox", return_tensors="pt").input_ids
        with torch.no_grad():
            logits.append(loaded.model(input_ids=ids).logits[0, -1])
    assert torch.equal(logits[0], logits[1])


def test_vlm_is_never_loaded_as_causal_lm(tiny_model: TinyFactory) -> None:
    """The field report's bug is real with plain transformers; the loader avoids it."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model("qwen3_vl")
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert load_model(folder, LoadOptions(device="cpu")).auto_class == "AutoModelForImageTextToText"


def test_pickle_only_weights_are_refused_unless_allowed(tiny_copy: TinyFactory) -> None:
    from safetensors.torch import load_file

    folder = tiny_copy("qwen2")
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load_model(folder, LoadOptions(device="cpu"))
    loaded = load_model(folder, LoadOptions(device="cpu", allow_pickle_weights=True))
    assert loaded.model_class == "Qwen2ForCausalLM"


def test_missing_tensors_are_an_error_not_random_weights(tiny_copy: TinyFactory) -> None:
    from safetensors.torch import load_file, save_file

    folder = tiny_copy("qwen3_vl")
    state = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in state if "layers.1.mlp" in k)
    del state[dropped]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing") as info:
        load_model(folder, LoadOptions(device="cpu"))
    assert info.value.cause == "weights-mismatch"


def test_unknown_model_type_names_the_upgrade(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen9_vl"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="qwen9_vl"):
        load_model(folder, LoadOptions(device="cpu"))


def test_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", "bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", None, cpu) == torch.float32
    assert resolve_dtype("auto", "fp16", cpu) == torch.float32  # nearest CPU-supported dtype
    assert resolve_dtype("fp32", "bf16", cpu) == torch.float32


def test_generation_defaults_come_from_generation_config(tiny_model: TinyFactory) -> None:
    loaded = load_model(tiny_model("qwen3_vl"), LoadOptions(device="cpu"))
    gen = loaded.model.generation_config
    assert (gen.temperature, gen.top_p, gen.top_k, gen.do_sample) == (0.7, 0.8, 20, True)


def test_folder_path_can_be_relative(tiny_model: TinyFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_model("qwen2")
    monkeypatch.chdir(folder.parent)
    assert load_model(Path(folder.name), LoadOptions(device="cpu")).folder.path == folder.resolve()
