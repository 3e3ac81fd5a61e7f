"""Tokenizer, chat template and image/video processor checks, on mutated tiny checkpoints of both layouts."""

from __future__ import annotations

import json
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
    load_processor,
    warns,
)


def test_no_tokenizer_files_fails_only_at_the_first_image(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (folder / name).unlink()
    assert "VB120" in errors(doctor(folder))
    # transformers builds an empty tokenizer without complaint; the failure comes with the first image.
    explained_by(failure(lambda: generate_with_image(folder)), "VB120")


def test_vocab_and_merges_without_added_tokens_loses_the_image_token(tiny_copy: TinyFactory) -> None:
    # The tiny official layout keeps the special tokens only in tokenizer.json (the real repos also list them in
    # tokenizer_config.json's added_tokens_decoder); without it the tokenizer has no <|image_pad|>.
    folder = tiny_copy("qwen3_vl")
    (folder / "tokenizer.json").unlink()
    report = doctor(folder)
    assert "VB120" not in report.codes() and "VB205" in errors(report)
    explained_by(failure(lambda: generate_with_image(folder)), "VB205")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.json"])
def test_unreadable_tokenizer_files(tiny_copy: TinyFactory, name: str) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / name).write_text("{not json")
    report = doctor(folder)
    assert "VB121" in errors(report) and "VB900" not in report.codes()
    if name == "tokenizer.json":
        import transformers

        explained_by(failure(lambda: transformers.AutoTokenizer.from_pretrained(folder)), "VB121")


def test_missing_tokenizer_config_is_a_warning(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "tokenizer_config.json").unlink()
    report = doctor(folder)
    assert "VB122" in warns(report)
    # It loads, but the tokenizer no longer knows that <|im_end|> ends a turn.
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token != "<|im_end|>"


@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_vlm_without_a_processor_chat_template(tiny_copy: TinyFactory, layout: str) -> None:
    folder = tiny_copy("qwen3_vl", layout)
    (folder / ("chat_template.json" if layout == "official" else "chat_template.jinja")).unlink()
    report = doctor(folder)
    [finding] = [f for f in report.findings if f.code == "VB123"]
    if layout == "official":  # tokenizer_config.json still has one, which the processor does not read
        assert "does not read it there" in finding.message
    explained_by(failure(lambda: generate_with_image(folder)), "VB123")


def test_text_model_without_chat_template(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2")
    edit_json(folder / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    assert "VB123" in errors(doctor(folder))
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "hi"}]
    explained_by(failure(lambda: tok.apply_chat_template(messages, tokenize=False)), "VB123")


@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_no_image_processor(tiny_copy: TinyFactory, layout: str) -> None:
    folder = tiny_copy("qwen2_5_vl", layout)
    if layout == "official":
        (folder / "preprocessor_config.json").unlink()
    else:
        edit_json(folder / "processor_config.json", lambda c: c.pop("image_processor"))
    assert "VB130" in errors(doctor(folder))
    explained_by(failure(lambda: load_processor(folder)), "VB130")


@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_early_qwen2_5_vl_image_processor_type(tiny_copy: TinyFactory, layout: str) -> None:
    folder = tiny_copy("qwen2_5_vl", layout)
    if layout == "official":
        edit_json(
            folder / "preprocessor_config.json", lambda c: c.update(image_processor_type="Qwen2_5_VLImageProcessor")
        )
    else:
        edit_json(
            folder / "processor_config.json",
            lambda c: c["image_processor"].update(image_processor_type="Qwen2_5_VLImageProcessor"),
        )
    report = doctor(folder)
    [finding] = [f for f in report.findings if f.code == "VB131"]
    assert finding.fix is not None and '"image_processor_type": "Qwen2VLImageProcessor"' in finding.fix
    explained_by(failure(lambda: load_processor(folder)), "VB131")


def test_legacy_fast_image_processor_name_still_resolves(tiny_model: TinyFactory) -> None:
    # Official Qwen3-VL files say Qwen2VLImageProcessorFast; transformers 5 maps it to Qwen2VLImageProcessor.
    folder = tiny_model("qwen3_vl")
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"].endswith("Fast")
    assert "VB131" not in doctor(folder).codes()


def test_unknown_processor_class_silently_drops_images(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen2_5_vl")
    edit_json(folder / "preprocessor_config.json", lambda c: c.update(processor_class="Qwen9VLProcessor"))
    assert "VB131" in errors(doctor(folder))
    # transformers returns a bare tokenizer instead of a processor: no error, and no image processor either.
    processor = load_processor(folder)
    assert getattr(processor, "image_processor", None) is None


def test_unknown_video_processor_type(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    edit_json(folder / "video_preprocessor_config.json", lambda c: c.update(video_processor_type="Qwen9VideoProcessor"))
    assert "VB131" in errors(doctor(folder))
    explained_by(failure(lambda: load_processor(folder)), "VB131")


@pytest.mark.parametrize(
    "size",
    [{"min_pixels": 3136, "max_pixels": 12845056}, {"height": 448, "width": 448}],
    ids=["min-max-inside-size", "height-width"],
)
def test_old_style_size_keys(tiny_copy: TinyFactory, size: dict[str, int]) -> None:
    folder = tiny_copy("qwen2_5_vl")

    def change(c: dict[str, object]) -> None:
        c.pop("min_pixels")
        c.pop("max_pixels")
        c["size"] = size

    edit_json(folder / "preprocessor_config.json", change)
    report = doctor(folder)
    [finding] = [f for f in report.findings if f.code == "VB132"]
    assert finding.fix is not None and "shortest_edge" in finding.fix
    # The processor loads; the first image fails.
    explained_by(failure(lambda: generate_with_image(folder)), "VB132")


def test_flat_min_max_pixels_of_the_official_qwen2_5_files_are_fine(tiny_model: TinyFactory) -> None:
    folder = tiny_model("qwen2_5_vl")
    assert "min_pixels" in json.loads((folder / "preprocessor_config.json").read_text())
    assert "VB132" not in doctor(folder).codes()


def test_qwen3_vl_without_its_video_config(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "video_preprocessor_config.json").unlink()
    report = doctor(folder)
    assert "VB133" in warns(report) and report.exit_code == 0
    # It loads, with the image budget standing in for the official video budget (4096…25165824 pixels).
    video = load_processor(folder).video_processor
    assert video.size["shortest_edge"] != 4096


def test_qwen2_5_vl_ships_no_video_config_and_that_is_fine(tiny_model: TinyFactory) -> None:
    folder = tiny_model("qwen2_5_vl")
    assert not (folder / "video_preprocessor_config.json").exists()
    assert "VB133" not in doctor(folder).codes()


def test_unreadable_preprocessor_config(tiny_copy: TinyFactory) -> None:
    folder: Path = tiny_copy("qwen3_vl")
    (folder / "preprocessor_config.json").write_text("{oops")
    assert "VB134" in errors(doctor(folder))
    explained_by(failure(lambda: load_processor(folder)), "VB134")
