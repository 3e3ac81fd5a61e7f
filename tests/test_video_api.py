"""Video through the real server and the openai client, for every VLM family: the clip reaches the model, its token
count is the processor's, and bad videos are a 400 envelope that leaves the server healthy."""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest

from tests.conftest import VLM_FAMILIES, TinyFactory
from tests.server_utils import MODEL, Server, data_url, running
from tests.video_clips import clip_bytes, video_message, video_uri
from vlmbridge.loader import LoadOptions, load_model
from vlmbridge.media.video import VideoSampling, probe_video

BUDGET = {"fps": 2, "max_frames": 4, "max_pixels": 64 * 64}


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def family_server(request: pytest.FixtureRequest, tiny_model: TinyFactory) -> Iterator[tuple[str, Server]]:
    # Prefix cache off: "the same clip twice gives identical logits" must compare two full prefills.
    with running(tiny_model(request.param), prefix_cache_mb=0, max_new_tokens=4) as server:
        yield request.param, server


def top_logprobs(server: Server, messages: list[dict[str, Any]]) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    r = server.post({"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True,
                     "top_logprobs": 10})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    first = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return [(t["token"], t["logprob"]) for t in first], body["usage"]


def processor_video_tokens(folder: Path, data: bytes) -> int:
    """What the model's own video processor makes of the frames we sample (decoded once more, independently)."""
    loaded = load_model(folder, LoadOptions(device="cpu"))
    frames = probe_video(data).frames(VideoSampling(fps=2, max_frames=4, max_pixels=64 * 64))
    out = loaded.processor.video_processor(
        videos=[np.stack(frames.frames)], do_sample_frames=False, return_tensors="pt",
        size={"shortest_edge": 1024, "longest_edge": 64 * 64 * (len(frames.frames) if "qwen3" in str(folder) else 1)},
    )  # fmt: skip
    merge = loaded.processor.video_processor.merge_size
    return int(out["video_grid_thw"][0].prod()) // merge**2


def test_the_clip_reaches_the_model(family_server: tuple[str, Server], tiny_model: TinyFactory) -> None:
    family, server = family_server
    first, second = clip_bytes(seed=1, frames=20, fps=10), clip_bytes(seed=2, frames=20, fps=10)
    a, usage = top_logprobs(server, video_message(video_uri(first), **BUDGET))
    b, _ = top_logprobs(server, video_message(video_uri(second), **BUDGET))
    a_again, _ = top_logprobs(server, video_message(video_uri(first), **BUDGET))
    assert a != b, "two different clips of the same size, length and fps gave the same logprobs"
    assert a == a_again, "the same clip gave different logprobs"
    details = usage["prompt_tokens_details"]
    assert details["image_tokens"] == 0
    assert details["video_tokens"] == processor_video_tokens(tiny_model(family), first) > 0


def test_longer_clip_same_max_frames_same_tokens(family_server: tuple[str, Server]) -> None:
    _, server = family_server
    _, short = top_logprobs(server, video_message(video_uri(clip_bytes(seed=3, frames=20, fps=10)), **BUDGET))
    _, long = top_logprobs(server, video_message(video_uri(clip_bytes(seed=3, frames=80, fps=10)), **BUDGET))
    assert short["prompt_tokens_details"]["video_tokens"] == long["prompt_tokens_details"]["video_tokens"] > 0


def test_tokenize_counts_what_generation_uses(family_server: tuple[str, Server]) -> None:
    _, server = family_server
    messages = video_message(video_uri(clip_bytes(seed=4, frames=20, fps=10)), **BUDGET)
    _, usage = top_logprobs(server, messages)
    r = httpx.post(f"{server.v1}/tokenize", json={"model": MODEL, "messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == usage["prompt_tokens"]
    assert r.json()["video_tokens"] == usage["prompt_tokens_details"]["video_tokens"]


def test_frame_list_and_webm(family_server: tuple[str, Server]) -> None:
    _, server = family_server
    frames = [data_url(64, 48, seed=s) for s in (1, 2, 3, 4)]
    part = {"type": "video", "video": frames}
    a, usage = top_logprobs(server, [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])
    part = {"type": "video", "video": frames[::-1]}
    b, _ = top_logprobs(server, [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])
    assert a != b and usage["prompt_tokens_details"]["video_tokens"] > 0
    webm = clip_bytes(seed=5, codec="libvpx-vp9", fmt="webm", frames=10)
    _, usage = top_logprobs(server, video_message(video_uri(webm, "video/webm"), **BUDGET))
    assert usage["prompt_tokens_details"]["video_tokens"] > 0


# --- bad videos: 400 with the envelope, nothing fetched, the server still healthy -----------------------------
class _Counting(BaseHTTPRequestHandler):
    hits: ClassVar[Counter[str]] = Counter()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).hits[self.path] += 1
        body = clip_bytes(seed=9)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def loopback() -> Iterator[tuple[str, Counter[str]]]:
    hits: Counter[str] = Counter()
    handler = type("Handler", (_Counting,), {"hits": hits})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen2_vl"), max_video_frames=16, max_new_tokens=2) as srv:
        yield srv


def _bad(server: Server, url: str, code: str, **budget: Any) -> dict[str, Any]:
    r = server.post({"model": MODEL, "messages": video_message(url, **budget), "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code, err
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    return dict(err)


def test_bad_videos_are_400_and_the_server_stays_healthy(server: Server, loopback: tuple[str, Counter[str]]) -> None:
    base, hits = loopback
    whole = clip_bytes(frames=20)
    _bad(server, video_uri(b"\x00garbage" * 100), "unsupported_video_format")
    _bad(server, video_uri(whole[: len(whole) // 2]), "invalid_video")
    _bad(server, video_uri(clip_bytes(codec="ffv1", fmt="matroska"), "video/x-matroska"), "unsupported_video_codec")
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{base}/seg0.ts\n#EXT-X-ENDLIST\n".encode()
    concat = f"ffconcat version 1.0\nfile '{base}/a.mp4'\n".encode()
    for listing in (playlist, concat):
        _bad(server, video_uri(listing), "unsupported_video_format")
    _bad(server, video_uri(clip_bytes(times=[0, 36000])), "video_too_long")
    _bad(server, video_uri(clip_bytes(size=(7680, 4320), frames=1)), "video_too_large")
    _bad(server, video_uri(whole), "too_many_frames", max_frames=17)
    frames = {"type": "video", "video": [data_url(32, 32, seed=i) for i in range(17)]}
    r = server.post({"model": MODEL, "messages": [{"role": "user", "content": [frames]}], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_frames"
    _bad(server, f"{base}/clip.mp4", "video_url_refused")  # loopback is not allow-listed
    _bad(server, "data:image/png;base64," + base64.b64encode(b"x").decode(), "unsupported_video_type")
    assert sum(hits.values()) == 0
    r = server.post({"model": MODEL, "messages": video_message(video_uri(whole)), "max_tokens": 1})
    assert r.status_code == 200, r.text  # and a good clip still works


def test_allowed_host_url_is_fetched_once(tiny_model: TinyFactory, loopback: tuple[str, Counter[str]]) -> None:
    base, hits = loopback
    hits.clear()
    with running(tiny_model("qwen2_vl"), allow_image_hosts=["127.0.0.1"], max_new_tokens=1) as srv:
        r = srv.post({"model": MODEL, "messages": video_message(f"{base}/clip.mp4", **BUDGET), "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["video_tokens"] > 0
    assert hits["/clip.mp4"] == 1


# --- caches and batching: clips keyed by content, each prompt keeps its own clip ----------------------------
def _close(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [t for t, _ in a[:3]] == [t for t, _ in b[:3]] and all(
        abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_follow_up_reuses_the_clip(tiny_model: TinyFactory, family: str) -> None:
    clips = [video_uri(clip_bytes(seed=s, frames=20, fps=10)) for s in (6, 7)]
    with running(tiny_model(family), max_new_tokens=2, batch_wait_ms=200) as srv:
        alone = [top_logprobs(srv, video_message(c, "Describe the clip in detail please.", **BUDGET))[0] for c in clips]
        again, usage = top_logprobs(srv, video_message(clips[0], "Describe the clip in detail please.", **BUDGET))
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # the clip's KV came from the prefix cache
        assert _close(again, alone[0])
        assert srv.slot.engine.stats().caches["pixel"].hits >= 1  # nor decoded and processed again


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_clips_prefilled_together_match_alone(tiny_model: TinyFactory, family: str) -> None:
    from vlmbridge.engine.types import ChatMessage, GenerationRequest, PixelBudget, SamplingParams, TextPart, VideoPart

    parts = [
        VideoPart(probe_video(clip_bytes(seed=s, frames=20, fps=10, size=(64 + 32 * s, 48))),
                  VideoSampling(2, 4, 64 * 64), PixelBudget(64 * 64))
        for s in (0, 1)
    ]  # fmt: skip
    with running(tiny_model(family), prefix_cache_mb=0, encoder_cache_mb=0, batch_wait_ms=300) as srv:
        engine: Any = srv.slot.engine

        def request(part: VideoPart) -> Any:
            sampling = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5)
            return engine.prepare(GenerationRequest((ChatMessage("user", (part, TextPart("What?"))),), sampling))

        def first_choice(stream: Any) -> Any:
            outs = list(stream)
            assert all(o.error is None for o in outs), outs
            return next(o.choices[0] for o in outs if o.choices)

        def prefills() -> int:
            """The prefill counter once it stopped moving (it counts just after a request's last output)."""
            seen = engine.stats().prefill_batches
            while True:
                time.sleep(0.1)
                now = engine.stats().prefill_batches
                if now == seen:
                    return int(now)
                seen = now

        alone = [first_choice(engine.submit(request(p))) for p in parts]
        before = prefills()
        prepared = [request(p) for p in parts]  # prepared first, then queued back to back: one left-padded prefill
        streams = [engine.submit(p) for p in prepared]
        together = [first_choice(s) for s in streams]
        assert prefills() == before + 1
        for a, b in zip(alone, together, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3
        assert alone[0].top != alone[1].top


def test_clips_cross_to_the_worker_process(tiny_model: TinyFactory) -> None:
    """The default engine_worker=process: a clip's bytes and header facts cross the pipe, frames decode there."""
    with running(tiny_model("qwen2_5_vl"), engine_worker="process", max_new_tokens=2) as srv:
        _, usage = top_logprobs(srv, video_message(video_uri(clip_bytes(seed=1, frames=20, fps=10)), **BUDGET))
        assert usage["prompt_tokens_details"]["video_tokens"] > 0
        frames = {"type": "video", "video": [data_url(64, 48, seed=s) for s in range(3)]}
        _, usage = top_logprobs(srv, [{"role": "user", "content": [frames]}])
        assert usage["prompt_tokens_details"]["video_tokens"] > 0


def test_picture_and_clip_in_one_prompt(family_server: tuple[str, Server]) -> None:
    _, server = family_server
    clip = {"type": "video_url", "video_url": {"url": video_uri(clip_bytes(seed=8, frames=20, fps=10)), **BUDGET}}
    picture = {"type": "image_url", "image_url": {"url": data_url(64, 64, seed=1)}}
    other = {"type": "image_url", "image_url": {"url": data_url(64, 64, seed=2)}}
    question = {"type": "text", "text": "Compare them."}
    a, usage = top_logprobs(server, [{"role": "user", "content": [picture, clip, question]}])
    b, _ = top_logprobs(server, [{"role": "user", "content": [other, clip, question]}])
    details = usage["prompt_tokens_details"]
    assert details["image_tokens"] > 0 and details["video_tokens"] > 0 and a != b
