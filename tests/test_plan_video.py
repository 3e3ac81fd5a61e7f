"""`plan`/`doctor --videos N --video-seconds S`: clips priced as the server samples them (2 fps, ≤ 32 frames)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_plan import GIB, cli, fake8b  # noqa: F401  (the module-scoped full-size fake)
from vlmbridge.plan import PlanInputs, make_plan


def test_videos_add_tokens_and_vision_memory(fake8b: Path) -> None:  # noqa: F811
    base = make_plan(fake8b, PlanInputs(gpu_memory=80 * GIB, context=16384))
    ten = make_plan(fake8b, PlanInputs(gpu_memory=80 * GIB, context=16384, videos=1, video_seconds=10))
    long = make_plan(fake8b, PlanInputs(gpu_memory=80 * GIB, context=16384, videos=2, video_seconds=600))
    # Qwen3-VL: a 1280×720 frame under 640×360 pixels → 352×640 → 220 tokens per pair of frames.
    assert ten.rows[0].estimate.video_tokens == 10 * 220  # 20 frames at 2 fps
    assert long.rows[0].estimate.video_tokens == 16 * 220  # capped at 32 frames, however long the clip
    assert base.rows[0].estimate.video_tokens == 0
    b, t, lg = (p.rows[0].estimate.vision_activations for p in (base, ten, long))
    assert b < t < lg
    assert ten.workload.video_frames == 20 and long.workload.video_frames == 32


def test_cli_flags(fake8b: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    code, out, err = cli(capsys, "plan", str(fake8b), "--gpu-memory", "80GiB", "--videos", "1", "--video-seconds", "10")
    assert code == 0, err
    assert "1 clip(s) of 10 s → 20 frames → 2200 video tokens each" in out
    code, out, _ = cli(capsys, "plan", str(fake8b), "--gpu-memory", "80GiB", "--videos", "1", "--json")
    data = json.loads(out)
    assert data["video_tokens_per_video"] == 2200 and data["workload"]["videos"] == 1
    code, out, _ = cli(capsys, "doctor", str(fake8b), "--gpu-memory", "80GiB", "--videos", "2", "--json")
    report = json.loads(out)
    assert any(f["code"] == "VB509" for f in report["findings"]), report["findings"]
