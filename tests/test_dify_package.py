"""`vlmbridge dify package`: the .difypkg holds a manifest and provider yaml that parse and reference existing files,
loads with the SDK's own plugin loader, and is found both in a source checkout and in an installed wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dify_support import PLUGIN_DIR, REPO, dify_python, load_folder, run_cli
from vlmbridge.integrations.dify import build_package, package_files, plugin_dir, plugin_version


def _yaml(zf: zipfile.ZipFile, name: str) -> Any:
    return yaml.safe_load(zf.read(name))


def test_package_command_builds_a_complete_plugin(tmp_path: Path) -> None:
    out = tmp_path / "vlmbridge.difypkg"
    result = run_cli("dify", "package", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out) and "FORCE_VERIFYING_SIGNATURE=false" in result.stderr

    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        manifest = _yaml(zf, "manifest.yaml")
        assert manifest["type"] == "plugin" and manifest["name"] == "vlmbridge"
        assert manifest["author"] == "vlmbridge"  # lowercase, and not langgenius (reserved for official plugins)
        assert manifest["version"] == plugin_version(PLUGIN_DIR)
        assert f"_assets/{manifest['icon']}" in names and manifest["privacy"] in names
        assert f"{manifest['meta']['runner']['entrypoint']}.py" in names
        assert manifest["meta"]["runner"]["language"] == "python"
        assert "dify_plugin==0.7.4" in zf.read("requirements.txt").decode().split()

        (provider_file,) = manifest["plugins"]["models"]
        provider = _yaml(zf, provider_file)
        assert provider["provider"] == "vlmbridge" and provider["supported_model_types"] == ["llm"]
        assert provider["configurate_methods"] == ["customizable-model"]
        assert f"_assets/{provider['icon_small']['en_US']}" in names
        sources = [provider["extra"]["python"]["provider_source"], *provider["extra"]["python"]["model_sources"]]
        assert all(source in names for source in sources) and "models/llm/vlmbridge_api.py" in names

        fields = {f["variable"]: f for f in provider["model_credential_schema"]["credential_form_schemas"]}
        assert {"endpoint_url", "api_key", "context_size", "max_tokens_to_sample", "vision_support"} <= set(fields)
        assert fields["vision_support"]["default"] == "support"  # vision on by default
        assert fields["video_support"]["default"] == "support"  # and video: Dify drops clips for models without it
        assert fields["endpoint_url"]["required"] is True and fields["api_key"]["type"] == "secret-input"

        assert not any(n.startswith("templates/") or "__pycache__" in n or n.endswith(".pyc") for n in names)


def test_packaged_plugin_loads_with_the_sdks_loader(tmp_path: Path) -> None:
    python = dify_python()
    package = build_package(tmp_path / "p.difypkg")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(package) as zf:
        zf.extractall(unpacked)
    found = load_folder(python, unpacked, tmp_path / "work")
    assert found["name"] == "vlmbridge" and found["author"] == "vlmbridge" and "icon.svg" in found["assets"]
    assert found["providers"]["vlmbridge"] == {
        "provider_class": "VlmbridgeProvider",
        "methods": ["customizable-model"],
        "credentials": [
            "endpoint_url", "api_key", "endpoint_model_name", "display_name", "mode", "context_size",
            "max_tokens_to_sample", "vision_support", "video_support", "function_calling_type",
            "stream_function_calling",
        ],
        "models": {"llm": "VlmbridgeLargeLanguageModel"},
        "llm_module": "models.llm.llm",  # 3 dotted parts: the SDK's error mapping needs them
    }  # fmt: skip


def test_package_is_reproducible_and_honours_difyignore(tmp_path: Path) -> None:
    first = build_package(tmp_path / "a.difypkg").read_bytes()
    assert build_package(tmp_path / "b.difypkg").read_bytes() == first

    folder = tmp_path / "plugin"
    shutil.copytree(PLUGIN_DIR, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "models" / "llm" / "__pycache__").mkdir()
    (folder / "models" / "llm" / "__pycache__" / "llm.cpython-311.pyc").write_bytes(b"x")
    (folder / "notes").mkdir()
    (folder / "notes" / "draft.md").write_text("x")
    (folder / ".difyignore").write_text("templates/\n/notes/draft.md\n*.log\n")
    (folder / "debug.log").write_text("x")
    names = [name for name, _ in package_files(folder)]
    assert "manifest.yaml" in names and "models/llm/llm.py" in names
    assert not [n for n in names if n.startswith(("templates/", "notes/")) or n.endswith((".pyc", ".log"))]


def test_package_refuses_an_incomplete_folder(tmp_path: Path) -> None:
    folder = tmp_path / "plugin"
    shutil.copytree(PLUGIN_DIR, folder)
    (folder / "main.py").unlink()
    result = run_cli(
        "dify", "package", "--out", str(tmp_path / "x.difypkg"), env={"VLMBRIDGE_DIFY_PLUGIN_DIR": str(folder)}
    )
    assert result.returncode == 1 and "missing main.py" in result.stderr and "Traceback" not in result.stderr


def test_plugin_dir_in_a_checkout() -> None:
    assert plugin_dir() == PLUGIN_DIR.resolve()
    link = REPO / "src" / "vlmbridge" / "integrations" / ".dify_plugin"
    assert link.is_symlink() and link.resolve() == PLUGIN_DIR.resolve()  # what wheels copy the files through


def test_plugin_dir_in_an_installed_wheel(tmp_path: Path) -> None:
    """A wheel built from the checkout carries the plugin and templates; `vlmbridge dify` finds them there."""
    setuptools = pytest.importorskip("setuptools", reason="building a wheel needs setuptools (a dev extra)")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} cannot build wheels on its own; the dev extras have 70.1+")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "src", source / "src", symlinks=True, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    shutil.copytree(PLUGIN_DIR, source / "integrations" / "dify", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("vlmbridge-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert "vlmbridge/integrations/.dify_plugin/manifest.yaml" in zf.namelist()
        assert "vlmbridge/integrations/.dify_plugin/templates/homework-intake.yml" in zf.namelist()
        zf.extractall(installed)

    env = {"PYTHONPATH": str(installed), "VLMBRIDGE_DIFY_PLUGIN_DIR": ""}
    probe = "import vlmbridge.integrations.dify as d; print(d.__file__); print(d.plugin_dir())"
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    module_file, folder = shown.stdout.split()
    assert module_file.startswith(str(installed)) and folder == str(installed / "vlmbridge/integrations/.dify_plugin")
    result = run_cli("dify", "package", "--out", str(tmp_path / "from-wheel.difypkg"), env=env)
    assert result.returncode == 0, result.stderr
    with (
        zipfile.ZipFile(tmp_path / "from-wheel.difypkg") as ours,
        zipfile.ZipFile(build_package(tmp_path / "c")) as ref,
    ):
        assert sorted(ours.namelist()) == sorted(ref.namelist())


def test_plugin_code_is_lint_clean() -> None:
    """The plugin runs under Dify's Python, outside the project's mypy run: keep it to the project's lint rules."""
    pytest.importorskip("ruff", reason="ruff is a dev extra")
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, str(PLUGIN_DIR)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
