"""`vlmbridge chat MODEL --video clip.mp4 "..."`: a real subprocess, the clip's tokens reported; a bad clip is one
clear line."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import TinyFactory
from tests.test_cli import assert_one_clear_line, vlmbridge
from tests.video_clips import clip_bytes


def test_chat_with_a_video(tiny_model: TinyFactory, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(clip_bytes(seed=1, frames=20, fps=10))
    result = vlmbridge(
        "chat", str(tiny_model("qwen3_vl")), "What happens?", "--video", str(clip), "--max-tokens", "3",
        "--temperature", "0", "--video-max-frames", "4", "--video-max-pixels", "4096",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = re.search(r"\((\d+) image, (\d+) video\)", result.stderr)
    assert found is not None and int(found.group(2)) > 0, result.stderr


def test_chat_with_a_bad_video(tiny_model: TinyFactory, tmp_path: Path) -> None:
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"not a video")
    assert_one_clear_line(vlmbridge("chat", str(tiny_model("qwen3_vl")), "hi", "--video", str(bad)), "clip.mp4", "MP4")
