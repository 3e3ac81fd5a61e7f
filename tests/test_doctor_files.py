"""Files & integrity: each broken folder is a mutated tiny checkpoint; where transformers fails on it, the test shows
the real failure and that `explain` maps its traceback to the same doctor check."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TinyFactory
from tests.doctor_cases import doctor, edit_json, errors, explained_by, failure, load_vlm, rewrite_shard, warns
from vlmbridge.doctor import Severity
from vlmbridge.doctor.checks.weights import refused_globals

SHARD2 = "model-00002-of-00003.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def sharded(tiny_copy: TinyFactory) -> Path:
    return tiny_copy("qwen3_vl", "official", 3)


def test_truncated_shard_names_the_shard_and_the_missing_bytes(sharded: Path) -> None:
    shard = sharded / SHARD2
    os.truncate(shard, shard.stat().st_size - 1000)
    report = doctor(sharded)
    [finding] = [f for f in report.findings if f.code == "VB105"]
    assert finding.evidence is not None and finding.evidence.file == SHARD2
    assert "1,000 bytes" in finding.message and "truncated" in finding.message
    assert report.exit_code == 1
    explained_by(failure(lambda: load_vlm(sharded)), "VB105")


def test_shard_with_bytes_appended_is_also_caught(sharded: Path) -> None:
    with (sharded / SHARD2).open("ab") as fh:
        fh.write(b"\0" * 64)
    report = doctor(sharded)
    assert "VB105" in errors(report)
    assert "64 bytes longer" in next(f.message for f in report.findings if f.code == "VB105")
    explained_by(failure(lambda: load_vlm(sharded)), "VB105")


def test_index_names_a_shard_that_is_missing(sharded: Path) -> None:
    (sharded / "model-00003-of-00003.safetensors").unlink()
    report = doctor(sharded)
    assert "VB103" in errors(report)
    explained_by(failure(lambda: load_vlm(sharded)), "VB103")


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(lambda data: data[:8] + os.urandom(64) + data[72:], id="binary-junk-in-header"),
        pytest.param(lambda data: struct.pack("<Q", 5 * 10**12) + data[8:], id="header-claims-5-terabytes"),
        pytest.param(lambda data: b"<!DOCTYPE html><html>rate limited</html>", id="html-error-page"),
    ],
)
def test_unreadable_header(sharded: Path, prefix: object) -> None:
    shard = sharded / SHARD2
    shard.write_bytes(prefix(shard.read_bytes()))  # type: ignore[operator]
    report = doctor(sharded)
    assert "VB104" in errors(report)
    assert "VB900" not in report.codes()
    explained_by(failure(lambda: load_vlm(sharded)), "VB104")


def test_unreadable_index(sharded: Path) -> None:
    (sharded / INDEX).write_text('{"weight_map": ')
    assert "VB106" in errors(doctor(sharded))
    explained_by(failure(lambda: load_vlm(sharded)), "VB106")


def test_index_lists_a_tensor_no_shard_has(sharded: Path) -> None:
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    victim = next(name for name, shard in weight_map.items() if shard == SHARD2)
    rewrite_shard(sharded / SHARD2, lambda tensors: tensors.pop(victim))
    assert "VB107" in errors(doctor(sharded))
    # transformers loads it anyway and fills the tensor with random values — a silently broken model.
    import transformers

    with torch.no_grad():
        loaded: Any = transformers.AutoModelForImageTextToText.from_pretrained(sharded, output_loading_info=True)
    assert victim in loaded[1]["missing_keys"]


def test_index_disagreeing_with_headers_is_a_warning(sharded: Path) -> None:
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    moved = next(name for name, shard in weight_map.items() if shard == SHARD2)
    edit_json(sharded / INDEX, lambda d: d["weight_map"].__setitem__(moved, "model-00001-of-00003.safetensors"))
    report = doctor(sharded)
    assert "VB108" in warns(report) and report.exit_code == 0
    # transformers 5 reads whole shards and loads fine, but a reader that trusts the index does not find it:
    load_vlm(sharded)
    from safetensors import safe_open

    with safe_open(str(sharded / "model-00001-of-00003.safetensors"), framework="pt") as fh:
        assert moved not in fh.keys()  # noqa: SIM118


def test_shards_without_index(sharded: Path) -> None:
    (sharded / INDEX).unlink()
    assert "VB109" in errors(doctor(sharded))
    explained_by(failure(lambda: load_vlm(sharded)), "VB109")


def test_stray_shard_is_a_warning(tiny_copy: TinyFactory, tiny_model: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl", "official", 3)
    (folder / "model-00001-of-00002.safetensors").write_bytes((folder / SHARD2).read_bytes())
    report = doctor(folder)
    assert "VB110" in warns(report) and report.exit_code == 0
    # transformers loads only what the index names: the stray file (another export's shard) is silently ignored,
    # so the folder is not what its owner thinks it is.
    load_vlm(folder)


def test_duplicate_tensor_in_two_shards(sharded: Path) -> None:
    from safetensors.torch import load_file

    first = load_file(str(sharded / "model-00001-of-00003.safetensors"))
    name, tensor = next(iter(first.items()))
    rewrite_shard(sharded / SHARD2, lambda tensors: tensors.__setitem__(name, torch.zeros_like(tensor)))
    report = doctor(sharded)
    assert "VB111" in warns(report)
    # transformers loads both shards; which copy wins depends on the order it reads them — here a zero tensor
    # could silently replace the real one.
    load_vlm(sharded)


def test_no_weights_at_all(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "model.safetensors").unlink()
    assert "VB102" in errors(doctor(folder))
    explained_by(failure(lambda: load_vlm(folder)), "VB102")


def _to_pickle(folder: Path, extra: object | None = None) -> None:
    from safetensors.torch import load_file

    tensors: dict[str, object] = dict(load_file(str(folder / "model.safetensors")))
    if extra is not None:
        tensors["training_args"] = extra
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_pickle_only_weights_are_refused_by_default(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    _to_pickle(folder)
    assert "VB112" in errors(doctor(folder))
    assert "VB112" in warns(doctor(folder, allow_pickle_weights=True))
    assert "VB113" not in doctor(folder).codes()  # a plain state dict passes torch's weights_only loader
    from vlmbridge.errors import UnsafeWeightsError
    from vlmbridge.loader import LoadOptions, load_model

    with pytest.raises(UnsafeWeightsError):
        load_model(folder, LoadOptions(device="cpu"))


def test_pickle_with_objects_torch_refuses(tiny_copy: TinyFactory) -> None:
    import argparse

    folder = tiny_copy("qwen3_vl")
    _to_pickle(folder, extra=argparse.Namespace(lr=1e-4))
    assert refused_globals(folder / "pytorch_model.bin") == {"argparse.Namespace"}
    assert "VB113" in errors(doctor(folder, allow_pickle_weights=True))
    explained_by(failure(lambda: load_vlm(folder)), "VB113")


def test_both_pickle_and_safetensors_is_info(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    report = doctor(folder)
    assert "VB114" in report.codes(Severity.INFO) and report.exit_code == 0


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_symlinks(sharded: Path, kind: str) -> None:
    shard = sharded / SHARD2
    shard.unlink()
    if kind == "dangling":  # a Hugging Face cache copied without its blobs
        shard.symlink_to("../../blobs/5f2c0a")
    else:
        (sharded / "other").symlink_to(shard.name)
        shard.symlink_to("other")
    report = doctor(sharded)
    assert "VB115" in errors(report) and "VB900" not in report.codes()
    explained_by(failure(lambda: load_vlm(sharded)), "VB115")


def test_gguf_files_are_explained(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "Qwen3-VL-8B-Instruct-Q4_K_M.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    report = doctor(folder)
    assert "VB116" in warns(report)
    (folder / "model.safetensors").unlink()
    assert {"VB102", "VB116"} <= set(doctor(folder).codes())


def test_missing_config(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "config.json").unlink()
    assert "VB100" in errors(doctor(folder))
    import transformers

    explained_by(failure(lambda: transformers.AutoConfig.from_pretrained(folder)), "VB100")


@pytest.mark.parametrize("content", [b'{"model_type": "qwen3_vl",,\x00\xff', b"[1, 2, 3]"], ids=["junk", "list"])
def test_unusable_config(tiny_copy: TinyFactory, content: bytes) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "config.json").write_bytes(content)
    report = doctor(folder)
    assert "VB101" in errors(report) and "VB900" not in report.codes()
    if content.startswith(b"{"):
        import transformers

        explained_by(failure(lambda: transformers.AutoConfig.from_pretrained(folder)), "VB101")


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from vlmbridge.cli.app import main

    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return int(code or 0), capsys.readouterr().out


@pytest.mark.parametrize("kind", ["loop", "notes.txt"])
def test_broken_unrelated_symlink_is_a_warning(
    tiny_copy: TinyFactory, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    folder = tiny_copy("qwen3_vl")
    link = folder / kind
    if kind == "loop":
        link.symlink_to(kind)  # points at itself: ELOOP
    else:
        link.symlink_to("../elsewhere/notes.txt")  # dangling
    report = doctor(folder)
    assert warns(report) == ["VB115"] and errors(report) == [] and report.exit_code == 0
    [finding] = [f for f in report.findings if f.code == "VB115"]
    assert str(link) in finding.message and finding.evidence is not None and finding.evidence.file == kind
    code, out = _cli(["doctor", str(folder), "--device", "cpu", "--gpu-memory", "1TiB"], capsys)
    assert code == 0 and "VB115" in out and "✓ loadable — 0 errors, 1 warning" in out


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "chat_template.json", "preprocessor_config.json"])
def test_broken_symlink_to_a_file_the_loader_needs_is_an_error(tiny_copy: TinyFactory, name: str) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / name).unlink()
    (folder / name).symlink_to(f"../../blobs/{name}")
    report = doctor(folder)
    assert "VB115" in errors(report) and report.exit_code == 1 and "VB900" not in report.codes()
