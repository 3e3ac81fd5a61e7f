"""Tensors vs the architecture (VB117–VB119): the doctor's torch-free table of names and shapes is the model
transformers builds, and each mutated checkpoint gets the verdict the loader would give it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ALL_FAMILIES, TinyFactory
from tests.doctor_cases import doctor, edit_json, errors, problems, quiet, rewrite_shard, warns
from vlmbridge.doctor.expected import canonical_name, expected_tensors, stored_naming
from vlmbridge.families import family_for
from vlmbridge.folder import read_safetensors_header

INDEX = "model.safetensors.index.json"
TENSOR_CODES = {"VB117", "VB118", "VB119"}
Config = dict[str, Any]


def _meta_model(config_dir: Path) -> Any:
    """The model the loader would build for this config.json, on the meta device (no memory, no weights)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    fam = family_for(config.model_type)
    assert fam is not None
    auto: Any = transformers.AutoModelForImageTextToText if fam.is_vlm else transformers.AutoModelForCausalLM
    with quiet(), torch.device("meta"):
        return auto.from_config(config)


def _assert_table_is_the_model(config: Config, config_dir: Path) -> None:
    model = _meta_model(config_dir)
    table = expected_tensors(config)
    assert table is not None
    meta = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert {name: spec.shape for name, spec in table.items()} == meta
    ties = {frozenset(pair) for pair in model.get_expanded_tied_weights_keys(all_submodels=True).items()}
    assert {frozenset((n, s.tied_with)) for n, s in table.items() if s.tied_with} == ties


def _stored(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in folder.glob("*.safetensors"):
        shapes.update({name: shape for name, (_, shape, _) in read_safetensors_header(shard).tensors.items()})
    return shapes


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_table_equals_the_model_on_the_meta_device(tiny_model: TinyFactory, family: str, layout: str) -> None:
    folder = tiny_model(family, layout)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    _assert_table_is_the_model(config, folder)
    # Mapped to the checkpoint's own naming, the meta model is exactly what the shards hold, less the tied
    # weights save_pretrained leaves out.
    table = expected_tensors(config)
    assert table is not None
    stored = _stored(folder)
    spell = stored_naming(family, stored)
    meta = {spell(name): tuple(t.shape) for name, t in _meta_model(folder).state_dict().items()}
    tied_out = {spell(n) for n, s in table.items() if s.tied_with and spell(n) not in stored}
    assert {n: shape for n, shape in meta.items() if n not in tied_out} == stored
    assert {canonical_name(family, name, table) for name in stored} <= set(table)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        assert all(
            n.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "visual.", "lm_head.")) for n in stored
        )


def _nested(config: Config) -> Config:
    return config.get("text_config", config)


VARIANTS: dict[str, tuple[str, str, Callable[[Config], object]]] = {
    # (family, layout of the tiny config to start from, edit)
    "qwen2-untied-own-head-dim": ("qwen2", "transformers", lambda c: c.update(tie_word_embeddings=False, head_dim=32)),
    "qwen2_5_vl-legacy-flat-tied": ("qwen2_5_vl", "official", lambda c: c.update(tie_word_embeddings=True)),
    "qwen2_5_vl-tie-only-in-text-config": (
        "qwen2_5_vl",
        "transformers",
        lambda c: c["text_config"].update(tie_word_embeddings=True),
    ),
    "qwen2_vl-head-dim-key-ignored": ("qwen2_vl", "transformers", lambda c: c["text_config"].update(head_dim=8)),
    "qwen2_vl-mlp-ratio": ("qwen2_vl", "official", lambda c: c["vision_config"].update(mlp_ratio=2)),
    "qwen3_vl-attention-bias-default-head-dim": (
        "qwen3_vl",
        "transformers",
        lambda c: (c["text_config"].update(attention_bias=True), c["text_config"].pop("head_dim")),
    ),
    "qwen3_vl-text-tie-not-forwarded": (
        "qwen3_vl",
        "transformers",
        lambda c: c["text_config"].update(tie_word_embeddings=True),
    ),
    "qwen3_vl-tied": ("qwen3_vl", "transformers", lambda c: c.update(tie_word_embeddings=True)),
    "qwen3_vl-one-deepstack-merger": (
        "qwen3_vl",
        "official",
        lambda c: c["vision_config"].update(deepstack_visual_indexes=[1]),
    ),
    "qwen3_vl_moe-dense-layers-and-experts-key": (
        "qwen3_vl_moe",
        "transformers",
        lambda c: (
            c["text_config"].update(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=3),
            c["text_config"].pop("num_local_experts"),
        ),
    ),
    "qwen3_vl_moe-derived-head-dim": ("qwen3_vl_moe", "official", lambda c: c["text_config"].pop("head_dim")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_table_equals_the_model_for_config_variants(tiny_model: TinyFactory, tmp_path: Path, variant: str) -> None:
    family, layout, edit = VARIANTS[variant]
    config = json.loads((tiny_model(family, layout) / "config.json").read_text(encoding="utf-8"))
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    _assert_table_is_the_model(config, tmp_path)


# Almost nothing set: every size comes from the config classes' defaults (one layer keeps the meta model small).
DEFAULTS: dict[str, Config] = {
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 1},
    "qwen2_vl": {"model_type": "qwen2_vl", "num_hidden_layers": 1, "vision_config": {"depth": 1}},
    "qwen2_5_vl": {"model_type": "qwen2_5_vl", "num_hidden_layers": 1, "vision_config": {"depth": 1}},
    "qwen3_vl": {"model_type": "qwen3_vl", "text_config": {"num_hidden_layers": 1}, "vision_config": {"depth": 1}},
    "qwen3_vl_moe": {
        "model_type": "qwen3_vl_moe",
        "text_config": {"num_hidden_layers": 1},
        "vision_config": {"depth": 1},
    },
}


@pytest.mark.parametrize("family", list(DEFAULTS))
def test_table_defaults_are_the_config_classes_defaults(tmp_path: Path, family: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(DEFAULTS[family]), encoding="utf-8")
    _assert_table_is_the_model(DEFAULTS[family], tmp_path)


def test_table_equals_the_full_size_qwen3_vl_8b(tmp_path: Path) -> None:
    from vlmbridge.tiny.fullsize import qwen3_vl_8b_config

    qwen3_vl_8b_config().save_pretrained(tmp_path)
    _assert_table_is_the_model(json.loads((tmp_path / "config.json").read_text(encoding="utf-8")), tmp_path)


def _load(folder: Path) -> Any:
    from vlmbridge.loader import LoadOptions, load_model

    with quiet():
        return load_model(folder, LoadOptions(device="cpu", dtype="fp32"))


def _finding(report: Any, code: str) -> Any:
    [finding] = [f for f in report.findings if f.code == code]
    return finding


def _drop_from_shard_and_index(folder: Path, victim: str) -> None:
    shard = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"][victim]
    rewrite_shard(folder / shard, lambda tensors: tensors.pop(victim))
    edit_json(folder / INDEX, lambda d: d["weight_map"].pop(victim))


@pytest.mark.parametrize(
    ("family", "shards", "victim"),
    [
        ("qwen3_vl", 3, "model.language_model.layers.1.mlp.down_proj.weight"),
        ("qwen2_5_vl", 2, "model.layers.1.self_attn.k_proj.bias"),  # legacy naming, named as stored
        ("qwen3_vl_moe", 2, "model.visual.deepstack_merger_list.1.linear_fc2.weight"),
    ],
)
def test_tensor_removed_from_its_shard_and_the_index_is_an_error(
    tiny_copy: TinyFactory, family: str, shards: int, victim: str
) -> None:
    folder = tiny_copy(family, "official", shards)
    _drop_from_shard_and_index(folder, victim)
    report = doctor(folder)
    assert errors(report) == ["VB117"] and report.exit_code == 1, [f.message for f in report.findings]
    finding = _finding(report, "VB117")
    assert "1 tensor(s)" in finding.message and victim in finding.message and "re-download" in (finding.fix or "")
    assert finding.evidence is not None and finding.evidence.value == victim
    # The loader agrees: transformers would fill the tensor randomly, vlmbridge refuses.
    from vlmbridge.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="1 tensors missing"):
        _load(folder)


def test_many_missing_tensors_name_the_first_five_and_the_count(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    parts = ("mlp.up_proj.weight", "mlp.gate_proj.weight", "input_layernorm.weight")
    victims = [f"model.language_model.layers.{i}.{p}" for i in (0, 1) for p in parts]
    rewrite_shard(folder / "model.safetensors", lambda tensors: [tensors.pop(v) for v in victims])
    finding = _finding(doctor(folder), "VB117")
    assert finding.message.startswith("6 tensor(s)") and "and 1 more" in finding.message
    assert sum(v in finding.message for v in victims) == 5


def test_untied_lm_head_missing_is_an_error_and_tied_is_not(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2_5_vl")
    rewrite_shard(folder / "model.safetensors", lambda tensors: tensors.pop("lm_head.weight"))
    assert "lm_head.weight" in _finding(doctor(folder), "VB117").message
    edit_json(folder / "config.json", lambda c: c.update(tie_word_embeddings=True))  # as Qwen2.5-VL-3B
    assert problems(doctor(folder)) == []


@pytest.mark.parametrize(
    ("family", "victim", "shape"),
    [
        ("qwen3_vl", "model.language_model.layers.0.self_attn.q_norm.weight", (8,)),
        ("qwen2_vl", "visual.blocks.1.mlp.fc1.weight", (64, 32)),
        ("qwen3_vl_moe", "model.language_model.layers.1.mlp.experts.down_proj", (4, 64, 16)),
    ],
)
def test_tensor_with_a_wrong_shape_is_an_error(
    tiny_copy: TinyFactory, family: str, victim: str, shape: tuple[int, ...]
) -> None:
    folder = tiny_copy(family)
    rewrite_shard(folder / "model.safetensors", lambda tensors: tensors.__setitem__(victim, torch.zeros(shape)))
    report = doctor(folder)
    assert errors(report) == ["VB118"], [f.message for f in report.findings]
    finding = _finding(report, "VB118")
    assert victim in finding.message and f"[{', '.join(map(str, shape))}] (expected" in finding.message
    assert finding.evidence is not None and finding.evidence.file == "model.safetensors"
    from vlmbridge.errors import VlmbridgeError

    with pytest.raises(VlmbridgeError):
        _load(folder)


def test_extra_tensor_is_a_warning_and_the_model_still_loads(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    extra = "model.language_model.layers.0.mlp.adapter_proj.weight"
    rewrite_shard(folder / "model.safetensors", lambda tensors: tensors.__setitem__(extra, torch.zeros(4, 4)))
    report = doctor(folder)
    assert warns(report) == ["VB119"] and errors(report) == [] and report.exit_code == 0
    assert extra in _finding(report, "VB119").message
    _load(folder)  # transformers skips it; the loader only logs it


def test_old_exports_rotary_buffers_are_not_flagged(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2")
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_shard(folder / "model.safetensors", lambda tensors: tensors.__setitem__(buffer, torch.zeros(8)))
    assert problems(doctor(folder)) == []


def test_moe_experts_stored_transposed_like_the_official_repos(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl_moe")

    def transpose(tensors: dict[str, Any]) -> None:
        for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            tensors[name] = tensors[name].transpose(1, 2).contiguous()

    rewrite_shard(folder / "model.safetensors", transpose)
    assert problems(doctor(folder)) == []
    loaded = _load(folder)  # transformers transposes them back on load
    assert tuple(loaded.model.model.language_model.layers[0].mlp.experts.down_proj.shape) == (4, 64, 32)


def test_qwen2_5_vl_saved_with_nested_names_is_accepted(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2_5_vl")

    def nest(tensors: dict[str, Any]) -> None:
        for name in list(tensors):
            new = "model.visual." + name[7:] if name.startswith("visual.") else name
            new = (
                "model.language_model." + new[6:]
                if new.startswith("model.") and not new.startswith("model.visual.")
                else new
            )
            tensors[new] = tensors.pop(name)

    rewrite_shard(folder / "model.safetensors", nest)
    assert problems(doctor(folder)) == []
    _load(folder)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda c: c.update(auto_map={"AutoConfig": "configuration_x.XConfig"}), id="remote-code"),
        pytest.param(lambda c: c.update(quantization_config={"quant_method": "fp8"}), id="pre-quantized"),
        pytest.param(lambda c: c.update(model_type="llama"), id="unknown-family"),
        pytest.param(lambda c: c["text_config"].update(hidden_size="64"), id="garbage-size"),
        pytest.param(lambda c: c["text_config"].update(num_attention_heads=0, head_dim=None), id="zero-heads"),
        pytest.param(lambda c: c["text_config"].update(num_hidden_layers=10**12), id="absurd-layer-count"),
    ],
)
def test_no_table_no_finding(tiny_copy: TinyFactory, edit: Callable[[Config], object]) -> None:
    folder = tiny_copy("qwen3_vl")
    rewrite_shard(folder / "model.safetensors", lambda tensors: tensors.pop("model.language_model.norm.weight"))
    edit_json(folder / "config.json", edit)
    report = doctor(folder)
    assert not TENSOR_CODES & set(report.codes()) and "VB900" not in report.codes()


def test_broken_shards_are_left_to_the_shard_checks(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl", "official", 3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    codes = doctor(folder).codes()
    assert "VB103" in codes and not TENSOR_CODES & set(codes)


def test_tensor_only_the_index_lists_stays_vb107(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl", "official", 3)
    weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
    victim, shard = next((n, s) for n, s in weight_map.items() if "layers.1" in n)
    rewrite_shard(folder / shard, lambda tensors: tensors.pop(victim))
    assert errors(doctor(folder)) == ["VB107"]


def test_the_full_size_8b_fake_is_clean(tmp_path: Path) -> None:
    from vlmbridge.tiny.fullsize import build_fullsize_qwen3_vl_8b

    report = doctor(build_fullsize_qwen3_vl_8b(tmp_path / "Qwen3-VL-8B-Instruct"))
    assert not TENSOR_CODES & set(report.codes()) and report.exit_code == 0
