"""Healthy checkpoints are clean; the CLI's exit codes, renderers and JSON schema; codes, docs and catalogue agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ALL_FAMILIES, TinyFactory
from tests.doctor_cases import doctor, problems
from vlmbridge.catalogue import CATALOGUE
from vlmbridge.cli.app import main
from vlmbridge.doctor import CODES, Severity

DOCS = Path(__file__).resolve().parents[1] / "docs" / "doctor.md"


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_healthy_tiny_checkpoints_have_no_error_and_no_warning(
    tiny_model: TinyFactory, family: str, layout: str
) -> None:
    report = doctor(tiny_model(family, layout))
    assert problems(report) == [], [f.message for f in report.findings if f.severity != Severity.INFO]
    assert report.exit_code == 0 and report.verdict == "ok"
    assert report.facts["kind"] == ("text" if family == "qwen2" else "vlm")


def test_healthy_sharded_checkpoint(tiny_model: TinyFactory) -> None:
    assert problems(doctor(tiny_model("qwen3_vl", "official", 3))) == []


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return int(code or 0), capsys.readouterr().out


def test_cli_json_schema(tiny_model: TinyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(["doctor", str(tiny_model("qwen3_vl")), "--json", "--gpu-memory", "24GiB"], capsys)
    data = json.loads(out)
    assert code == 0 and data["schema"] == "vlmbridge.doctor/1"
    assert set(data) == {"schema", "path", "verdict", "loadable", "exit_code", "counts", "facts", "findings",
                         "elapsed_s"}  # fmt: skip
    assert data["loadable"] is True and data["counts"]["error"] == 0
    for finding in data["findings"]:
        assert set(finding) == {"code", "severity", "area", "message", "fix", "evidence"}
        assert finding["code"] in CODES and finding["area"] == str(CODES[finding["code"]].area)
    assert data["facts"]["memory"]["device"]["free_bytes"] == 24 * 1024**3


def test_cli_rich_output_and_exit_code_for_errors(tiny_copy: TinyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tiny_copy("qwen3_vl")
    (folder / "preprocessor_config.json").unlink()
    code, out = _cli(["doctor", str(folder)], capsys)
    assert code == 1
    assert "Image & video processor" in out and "VB130" in out and "fix:" in out
    assert "✗ not loadable — 1 error" in out
    code, out = _cli(["doctor", str(folder.parent / "nope")], capsys)
    assert code == 1 and "VB60" in out


def test_cli_healthy_verdict_line(tiny_model: TinyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(["doctor", str(tiny_model("qwen2_5_vl"))], capsys)
    assert code == 0 and "✓ loadable — 0 errors, 0 warnings" in out and "loading options" in out


def test_cli_bad_memory_size_is_a_usage_error(tiny_model: TinyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _cli(["doctor", str(tiny_model("qwen2")), "--gpu-memory", "16XB"], capsys)
    assert code == 2


def test_cli_parse_errors_exit_2(tiny_model: TinyFactory, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _cli(["doctor", str(tiny_model("qwen2")), "--batch", "0"], capsys)
    assert code == 2


def test_every_code_is_documented_and_no_unknown_code_is() -> None:
    documented = set(re.findall(r"^\| (VB\d{3}) \|", DOCS.read_text(encoding="utf-8"), re.MULTILINE))
    assert documented == set(CODES)


def test_catalogue_points_at_real_doctor_checks() -> None:
    for entry in CATALOGUE:
        for code in entry.doctor_checks:
            assert code in CODES, (entry.code, code)
    assert len({e.code for e in CATALOGUE}) == len(CATALOGUE)


def test_serve_preflight_uses_the_servers_settings(tiny_model: TinyFactory) -> None:
    from vlmbridge.doctor import diagnose
    from vlmbridge.settings import Settings

    report = diagnose(tiny_model("qwen3_vl"), settings=Settings(device="cpu", max_pixels=1024 * 1024))
    assert not report.has_errors
    assert report.facts["memory"]["image_tokens_per_image"] == 1008  # 1920×1080 under the server's 1 Mpx cap
