"""The command line: real subprocesses, one clear red line and a non-zero exit for bad input, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyFactory
from tests.helpers import png_bytes


def vlmbridge(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vlmbridge", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_missing_folder(tmp_path: Path) -> None:
    assert_one_clear_line(vlmbridge("chat", str(tmp_path / "nope"), "hi"), "does not exist")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert_one_clear_line(vlmbridge("chat", str(f), "hi"), "is a file")


def test_empty_folder(tmp_path: Path) -> None:
    assert_one_clear_line(vlmbridge("chat", str(tmp_path), "hi"), "empty")


def test_unreadable_image(tiny_model: TinyFactory, tmp_path: Path) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"this is not a picture")
    assert_one_clear_line(vlmbridge("chat", str(tiny_model("qwen3_vl")), "hi", "--image", str(bad)), "photo.jpg")


def test_missing_image(tiny_model: TinyFactory, tmp_path: Path) -> None:
    result = vlmbridge("chat", str(tiny_model("qwen3_vl")), "hi", "--image", str(tmp_path / "nope.png"))
    assert_one_clear_line(result, "does not exist")


def test_image_for_a_text_model(tiny_model: TinyFactory, tmp_path: Path) -> None:
    img = tmp_path / "p.png"
    img.write_bytes(png_bytes())
    result = vlmbridge("chat", str(tiny_model("qwen2")), "hi", "--image", str(img))
    assert result.returncode == 1
    assert "text-only" in result.stderr and "Traceback" not in result.stderr


def test_unknown_family(tmp_path: Path) -> None:
    assert_one_clear_line(vlmbridge("tiny-model", str(tmp_path / "x"), "--family", "llama9"), "unknown family")


def test_bad_setting_from_environment(tiny_model: TinyFactory) -> None:
    result = vlmbridge("chat", str(tiny_model("qwen2")), "hi", env={"VLMBRIDGE_DEVICE": "tpu"})
    assert result.returncode == 2
    assert_one_clear_line(result, "device")


def test_tiny_model_command_and_chat_with_image(tmp_path: Path) -> None:
    out = tmp_path / "m"
    built = vlmbridge("tiny-model", str(out), "--family", "qwen2_5_vl", "--shards", "2")
    assert built.returncode == 0, built.stderr
    assert (out / "model.safetensors.index.json").exists()
    img = tmp_path / "p.png"
    img.write_bytes(png_bytes())
    result = vlmbridge(
        "chat", str(out), "What is this?", "--image", str(img), "--max-tokens", "5", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert "Qwen2_5_VLForConditionalGeneration" in result.stderr
    assert "image)" in result.stderr and "(0 image)" not in result.stderr


@pytest.mark.parametrize("args", [["demo"], ["demo", "--max-tokens", "3"]])
def test_demo_exits_by_itself(tmp_path: Path, args: list[str]) -> None:
    result = vlmbridge(*args, env={"XDG_CACHE_HOME": str(tmp_path)}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "vlmbridge" / "demo-qwen3_vl" / "config.json").exists()


def test_serve_warns_when_exposed_without_an_api_key(tiny_model: TinyFactory) -> None:
    """Binding beyond loopback without a key starts, but says loudly that anyone can use the model."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmbridge", "serve", str(tiny_model("qwen2")), "--host", "0.0.0.0", "--port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = ""
        for line in proc.stderr:
            seen += line
            if "WARNING" in line or "serving" in line:
                break
        assert "without an API key" in seen
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
