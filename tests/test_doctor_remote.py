"""Remote code: auto_map → files, hashes, allowlist verdict and the exact setting; no auto_map → not needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from tests.custom_model import build_custom_model
from tests.doctor_cases import doctor, edit_json, errors, explained_by, failure
from vlmbridge.doctor import Severity
from vlmbridge.remote_code import sha256_file


@pytest.fixture
def custom(tiny_model: TinyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return build_custom_model(tmp_path / "custom", tiny_model("qwen2"))


def pins(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.py"))}


def test_built_in_model_needs_no_remote_code(tiny_model: TinyFactory) -> None:
    report = doctor(tiny_model("qwen3_vl"))
    [finding] = [f for f in report.findings if f.code == "VB300"]
    assert "not needed" in finding.message


def test_unused_python_files_are_mentioned(tiny_copy: TinyFactory) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "modeling_extra.py").write_text("raise SystemExit('never runs')\n")
    assert {"VB300", "VB306"} <= set(doctor(folder).codes(Severity.INFO))


def test_remote_code_not_allowlisted_prints_files_hashes_and_setting(custom: Path) -> None:
    report = doctor(custom)
    [finding] = [f for f in report.findings if f.code == "VB301"]
    assert finding.severity == Severity.ERROR and finding.fix is not None
    for name, digest in pins(custom).items():
        assert name in finding.message and digest[:12] in finding.message
        assert digest in finding.fix  # the full pin, ready to paste
    assert "--trust-remote-code" in finding.fix
    import transformers

    explained_by(failure(lambda: transformers.AutoModelForCausalLM.from_pretrained(custom)), "VB301")


def test_allowlisted_with_matching_pins(custom: Path) -> None:
    report = doctor(custom, trust_remote_code={str(custom): pins(custom)})
    assert "VB305" in report.codes(Severity.INFO)
    assert not [c for c in errors(report) if c.startswith("VB3")]


def test_pins_that_no_longer_match(custom: Path) -> None:
    pinned = pins(custom)
    with (custom / "modeling_tinycustom.py").open("a") as fh:
        fh.write("\nimport os  # injected after review\n")
    assert "VB304" in errors(doctor(custom, trust_remote_code={str(custom): pinned}))


def test_cross_repository_reference(custom: Path) -> None:
    edit_json(
        custom / "config.json",
        lambda c: c["auto_map"].update(AutoModelForCausalLM="someone/elsewhere--modeling_x.TinyCustomForCausalLM"),
    )
    assert "VB302" in errors(doctor(custom, trust_remote_code={str(custom): pins(custom)}))


def test_auto_map_module_missing(custom: Path) -> None:
    (custom / "modeling_tinycustom.py").unlink()
    assert "VB303" in errors(doctor(custom))
