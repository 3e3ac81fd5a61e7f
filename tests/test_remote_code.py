"""Remote code runs only for allowlisted folders whose every .py file matches its sha256 pin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from tests.custom_model import build_custom_model
from tests.helpers import generate
from vlmbridge.engine.transformers.engine import TransformersEngine
from vlmbridge.engine.types import ChatMessage, GenerationRequest, SamplingParams
from vlmbridge.errors import RemoteCodeRefusedError
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.remote_code import sha256_file
from vlmbridge.settings import Settings


@pytest.fixture
def custom(tiny_model: TinyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # transformers copies remote code into HF_MODULES_CACHE: keep it inside the test's temp dir.
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return build_custom_model(tmp_path / "custom", tiny_model("qwen2"))


def pins(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.py"))}


def test_refused_without_allowlist_naming_files_hashes_and_setting(custom: Path) -> None:
    with pytest.raises(RemoteCodeRefusedError) as info:
        load_model(custom, LoadOptions(device="cpu"))
    err = info.value
    assert "modeling_tinycustom.py" in err.message and "configuration_tinycustom.py" in err.message
    assert err.fix is not None and "--trust-remote-code" in err.fix
    for digest in pins(custom).values():
        assert digest in err.fix


def test_refused_with_a_wrong_hash(custom: Path) -> None:
    wrong = pins(custom)
    wrong["modeling_tinycustom.py"] = "0" * 64
    with pytest.raises(RemoteCodeRefusedError, match="does not match its pins"):
        load_model(custom, LoadOptions(device="cpu", trust_remote_code={str(custom): wrong}))


def test_refused_when_a_file_changes_after_pinning(custom: Path) -> None:
    pinned = pins(custom)
    with (custom / "modeling_tinycustom.py").open("a") as fh:
        fh.write("\nimport os  # injected\n")
    with pytest.raises(RemoteCodeRefusedError, match=r"modeling_tinycustom\.py"):
        load_model(custom, LoadOptions(device="cpu", trust_remote_code={str(custom): pinned}))


def test_refused_when_an_unpinned_py_file_appears(custom: Path) -> None:
    pinned = pins(custom)
    (custom / "helpers.py").write_text("x = 1\n")
    with pytest.raises(RemoteCodeRefusedError, match=r"helpers\.py"):
        load_model(custom, LoadOptions(device="cpu", trust_remote_code={str(custom): pinned}))


def test_refused_when_auto_map_points_to_another_repo(custom: Path) -> None:
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil/repo--modeling_tinycustom.TinyCustomForCausalLM"
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeRefusedError, match="another repository"):
        load_model(custom, LoadOptions(device="cpu", trust_remote_code={str(custom): pins(custom)}))


def test_with_the_right_pin_it_loads_and_generates(custom: Path) -> None:
    loaded = load_model(custom, LoadOptions(device="cpu", trust_remote_code={str(custom): pins(custom)}))
    assert loaded.remote_code and loaded.model_class == "TinyCustomForCausalLM"
    engine = TransformersEngine(loaded, "custom")
    engine.start()
    try:
        chunks = list(
            generate(
                engine,
                GenerationRequest(
                    messages=(ChatMessage("user", "hello"),), sampling=SamplingParams(max_new_tokens=6, temperature=0)
                ),
            )
        )
    finally:
        engine.shutdown()
    assert chunks[-1].error is None
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_the_printed_setting_works_from_the_command_line(custom: Path) -> None:
    spec = f"{custom}=" + ",".join(f"{n}:{h}" for n, h in pins(custom).items())
    settings = Settings(trust_remote_code=[spec])
    assert settings.trust_remote_code == {str(custom): pins(custom)}
    result = subprocess.run(
        [sys.executable, "-m", "vlmbridge", "chat", str(custom), "hello", "--max-tokens", "4",
         "--trust-remote-code", spec],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "TinyCustomForCausalLM" in result.stderr


def test_environment_form_of_the_allowlist(custom: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMBRIDGE_TRUST_REMOTE_CODE", json.dumps({str(custom): pins(custom)}))
    assert Settings().trust_remote_code == {str(custom): pins(custom)}
