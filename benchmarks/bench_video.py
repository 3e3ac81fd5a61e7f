"""Video: time to first token for a 10 s clip sampled at 2 fps, through `vlmbridge serve` (its own process, caches
off so every request decodes, processes and encodes the clip again), on the `small` (~30 M-param) Qwen3-VL
checkpoint; and, in-process, the decode (PyAV: demux, decode, sample, RGB) and the video processor separately.

The clip is made here: H.264 in MP4, 30 fps, 640×360, a moving bar. Prints a table; asserts nothing.

    python benchmarks/bench_video.py [--requests 5] [--seconds 10] [--fps 2] [--family qwen3_vl] [--dtype auto]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from vlmbridge.bench.servers import vlmbridge_serve


def make_clip(seconds: float, fps: int = 30, size: tuple[int, int] = (640, 360)) -> bytes:
    import av

    width, height = size
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            rgb = np.full((height, width, 3), (40, 90, 160), np.uint8)
            top = (7 * i) % (height - 40)
            rgb[top : top + 40, (3 * i) % (width - 80) :][:, :80] = (250, 220, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def through_server(folder: Path, clip: bytes, requests: int, fps: float, dtype: str) -> tuple[list[float], int]:
    """(time to first token per request, video tokens) for streamed one-token answers."""
    import httpx

    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    parts = [{"type": "video_url", "video_url": {"url": url, "fps": fps}}, {"type": "text", "text": "What happens?"}]
    body = {
        "model": "small",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,  # a token's logprob entry marks it: the first chunk may carry only the role
    }
    ttfts, video_tokens = [], 0
    serving = vlmbridge_serve(
        folder, "small", "--dtype", dtype, "--prefix-cache-mb", "0", "--encoder-cache-mb", "0", "--pixel-cache-mb", "0"
    )
    with serving as base, httpx.Client(base_url=base, timeout=300) as client:
        for i in range(requests + 1):
            start = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    choice = chunk["choices"][0] if chunk["choices"] else {}
                    if (choice.get("logprobs") or {}).get("content") and first is None:  # the first real token
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        video_tokens = chunk["usage"]["prompt_tokens_details"]["video_tokens"]
            if i:  # the first request warms the server up
                ttfts.append((first or time.perf_counter()) - start)
    return ttfts, video_tokens


def in_process(folder: Path, clip: bytes, requests: int, fps: float) -> tuple[list[float], list[float], int]:
    """(decode times, video-processor times, frames) for the same clip, sampling and budget as the server's."""
    from vlmbridge.engine.transformers.videos import VideoPixels
    from vlmbridge.engine.types import PixelBudget, VideoPart
    from vlmbridge.loader import LoadOptions, load_model
    from vlmbridge.media.video import VideoSampling, probe_video
    from vlmbridge.settings import Settings

    settings = Settings()
    sampling = VideoSampling(fps, settings.video_max_frames, settings.video_max_pixels)
    processor = load_model(folder, LoadOptions(device="cpu")).processor
    decode, process, frames = [], [], 0
    for _ in range(requests):
        start = time.perf_counter()
        clip_frames = probe_video(clip).frames(sampling)
        decode.append(time.perf_counter() - start)
        frames = len(clip_frames.frames)
        part = VideoPart(probe_video(clip), sampling, PixelBudget(settings.video_max_pixels))
        pixels = VideoPixels(processor, None)
        start = time.perf_counter()
        pixels.process([part])
        process.append(time.perf_counter() - start - decode[-1])  # process() decodes too: subtract it
    return decode, process, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--family", default="qwen3_vl")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import torch

    from vlmbridge.tiny.builder import build_tiny_model

    clip = make_clip(args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "small", args.family, size="small")
        decode, process, frames = in_process(folder, clip, args.requests, args.fps)
        ttfts, video_tokens = through_server(folder, clip, args.requests, args.fps, args.dtype)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:8.1f} ms (min {min(values) * 1000:.1f})"

    print(
        f"small {args.family}, {args.seconds:g} s H.264 clip 640x360 @30 fps ({len(clip) / 1e6:.2f} MB), sampled at "
        f"{args.fps:g} fps → {frames} frames → {video_tokens} video tokens; {args.requests} requests, "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, dtype {args.dtype}"
    )
    print(f"{'decode (PyAV, sample, RGB)':<36}{ms(decode)}")
    print(f"{'video processor (resize, patches)':<36}{ms(process)}")
    print(f"{'time to first token (serve, cold)':<36}{ms(ttfts)}")


if __name__ == "__main__":
    main()
