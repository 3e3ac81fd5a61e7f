"""Architecture & versions: model_type vs the installed transformers, classes, VLM vs text, token ids, rope."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from tests.doctor_cases import (
    doctor,
    edit_json,
    errors,
    explained_by,
    failure,
    generate_with_image,
    load_vlm,
    rewrite_shard,
    warns,
)
from vlmbridge.doctor import DoctorOptions, Severity
from vlmbridge.doctor.checks.architecture import check_architecture
from vlmbridge.doctor.context import Context
from vlmbridge.doctor.tfindex import load_index


def test_static_index_equals_transformers_own_mappings() -> None:
    static, imported = load_index(), load_index(force_import=True)
    assert static.source == "static" and imported.source == "import"
    for name, table in imported.tables.items():
        assert set(static.table(name)) == set(table), name
    assert static.model_classes == imported.model_classes
    assert static.image_processor_classes == imported.image_processor_classes
    assert static.auto_class_for("qwen3_vl") == ("vlm", "AutoModelForImageTextToText")
    assert static.auto_class_for("qwen2") == ("text", "AutoModelForCausalLM")


def test_missing_model_type(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.pop("model_type"))
    assert "VB200" in errors(doctor(folder))
    explained_by(failure(lambda: load_vlm(folder)), "VB200")


def test_unknown_model_type_suggests_the_close_one(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(model_type="qwen3-vl"))
    [finding] = [f for f in doctor(folder).findings if f.code == "VB201"]
    assert 'did you mean "qwen3_vl"' in finding.message
    explained_by(failure(lambda: load_vlm(folder)), "VB201")


@pytest.mark.parametrize(("family", "need"), [("qwen3_vl", "4.57.0"), ("qwen2_5_vl", "4.49.0")])
def test_older_transformers_gets_the_exact_upgrade(tiny_model: TinyFactory, family: str, need: str) -> None:
    # An installed transformers that predates the family: the real index minus the family's model types.
    real = load_index()
    older_types = {k: v for k, v in real.table("CONFIG_MAPPING_NAMES").items() if not k.startswith(family)}
    older = replace(real, version="4.45.0", tables={**real.tables, "CONFIG_MAPPING_NAMES": older_types})
    ctx = Context(tiny_model(family), DoctorOptions())
    ctx.__dict__["tf"] = older
    [finding] = [f for f in check_architecture(ctx) if f.code == "VB201"]
    assert finding.severity == Severity.ERROR
    assert finding.fix == f'pip install -U "transformers>={need}"'


def test_architecture_class_transformers_lacks(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(architectures=["Qwen3VLForVideoChat"]))
    report = doctor(folder)
    assert "VB202" in warns(report) and report.exit_code == 0
    # transformers' Auto classes build from model_type and load it silently; tools that read architectures
    # (vLLM: "Model architectures [...] are not supported") do not.
    load_vlm(folder)


def test_architecture_of_another_family(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(architectures=["Qwen2_5_VLForConditionalGeneration"]))
    assert "VB203" in warns(doctor(folder))
    load_vlm(folder)  # silently fine here, wrong for anything that trusts architectures


def test_vlm_and_text_kinds_name_the_auto_class(tiny_model: TinyFactory) -> None:
    vlm, text = doctor(tiny_model("qwen2_vl")), doctor(tiny_model("qwen2"))
    assert (vlm.facts["kind"], vlm.facts["auto_class"]) == ("vlm", "AutoModelForImageTextToText")
    assert (text.facts["kind"], text.facts["auto_class"]) == ("text", "AutoModelForCausalLM")
    [finding] = [f for f in vlm.findings if f.code == "VB204"]
    assert "AutoModelForCausalLM fails" in finding.message
    import transformers

    folder = tiny_model("qwen2_vl")
    explained_by(failure(lambda: transformers.AutoModelForCausalLM.from_pretrained(folder)), "VB204")


def test_image_token_id_differs_from_the_tokenizer(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(image_token_id=c["image_token_id"] - 3))
    [finding] = [f for f in doctor(folder).findings if f.code == "VB205"]
    assert finding.evidence is not None and finding.evidence.file == "config.json"
    explained_by(failure(lambda: generate_with_image(folder)), "VB205")


def test_legacy_flat_qwen2_vl_config_ids_are_checked_too(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2_vl")
    edit_json(folder / "config.json", lambda c: c.update(vision_start_token_id=1))
    assert "VB205" in errors(doctor(folder))


def test_vocab_size_smaller_than_the_tokenizer(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c["text_config"].update(vocab_size=900))
    assert "VB206" in errors(doctor(folder))
    explained_by(failure(lambda: load_vlm(folder)), "VB206")


def test_text_only_export_of_a_vlm(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    rewrite_shard(folder / "model.safetensors", lambda t: [t.pop(k) for k in [k for k in t if ".visual." in k]])
    assert "VB207" in errors(doctor(folder))
    # transformers loads it and initialises the vision tower randomly; vlmbridge's loader refuses it:
    from vlmbridge.errors import ModelLoadError
    from vlmbridge.loader import LoadOptions, load_model

    with pytest.raises(ModelLoadError) as info:
        load_model(folder, LoadOptions(device="cpu"))
    explained_by(info.value.message, "VB207")


def test_mrope_section_not_matching_head_dim_crashes_qwen2_5(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2_5_vl")
    edit_json(folder / "config.json", lambda c: c["rope_scaling"].update(mrope_section=[4, 2, 3]))
    assert "VB208" in errors(doctor(folder))
    explained_by(failure(lambda: generate_with_image(folder)), "VB208")


def test_mrope_section_not_matching_head_dim_is_silent_in_qwen3(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[4, 2, 3]))
    assert "VB208" in errors(doctor(folder))
    # No error from transformers: Qwen3-VL's interleaved rope slices the sections and just computes wrong
    # image positions — which is why the doctor calls it an error.
    generate_with_image(folder)


def test_generation_config_without_the_turn_end_token(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    tok = json.loads((folder / "tokenizer.json").read_text())
    endoftext = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    edit_json(folder / "generation_config.json", lambda c: c.update(eos_token_id=endoftext))
    [finding] = [f for f in doctor(folder).findings if f.code == "VB209"]
    assert finding.severity == Severity.WARNING and "<|im_end|>" in finding.message


def test_config_from_a_newer_transformers_is_info(tiny_copy: TinyFactory) -> None:
    folder: Path = tiny_copy("qwen3_vl")
    edit_json(folder / "config.json", lambda c: c.update(transformers_version="9.1.0"))
    report = doctor(folder)
    assert "VB210" in report.codes(Severity.INFO) and report.exit_code == 0
