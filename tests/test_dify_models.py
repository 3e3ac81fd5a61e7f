"""`vlmbridge dify config` for several models: one provider entry per model, from a models file or from a running
server's /v1/models (which lists every configured model, loaded or not, with its context from the config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import TinyFactory
from tests.dify_support import run_cli
from tests.server_utils import running_models


def models_file(tiny_model: TinyFactory, tmp_path: Path) -> Path:
    file = tmp_path / "models.yaml"
    file.write_text(
        f"""
models:
  - name: tagger
    path: {tiny_model("qwen3_vl")}
    context_length: 8192
  - name: followup
    path: {tiny_model("qwen2")}
"""
    )
    return file


def entries(*args: str) -> list[dict[str, Any]]:
    result = run_cli("dify", "config", "--json", *args)
    assert result.returncode == 0, result.stderr
    models: list[dict[str, Any]] = json.loads(result.stdout)["models"]
    return models


def test_one_entry_per_model_of_a_models_file(tiny_model: TinyFactory, tmp_path: Path) -> None:
    tagger, followup = (e["fields"] for e in entries("--models", str(models_file(tiny_model, tmp_path))))
    assert (tagger["Model Name"], tagger["Model context size"], tagger["Vision Support"]) == (
        "tagger",
        "8192",
        "Support",
    )
    assert (followup["Model Name"], followup["Model context size"]) == ("followup", "32768")
    assert followup["Vision Support"] == "Not Support"


def test_one_entry_per_model_a_running_server_lists(tiny_model: TinyFactory, tmp_path: Path) -> None:
    with running_models(models_file(tiny_model, tmp_path)) as s:
        listed = entries("--server", s.v1)
        assert s.pool.slots["followup"].state == "unloaded"  # listed without loading it
    names = [(e["fields"]["Model Name"], e["fields"]["Model context size"]) for e in listed]
    assert names == [("tagger", "8192"), ("followup", "32768")]
    text = run_cli("dify", "config", "--models", str(tmp_path / "models.yaml"))
    assert text.returncode == 0 and "(model 2 of 2)" in text.stdout
