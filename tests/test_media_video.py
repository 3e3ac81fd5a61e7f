"""media/video.py on its own: header checks before decoding, sampling, timestamps, rotation, frame lists."""

from __future__ import annotations

import time

import pytest

from tests.helpers import decoded
from tests.video_clips import clip_bytes
from vlmbridge.errors import VideoInputError
from vlmbridge.media.framelist import FrameListVideo
from vlmbridge.media.video import VideoLimits, VideoSampling, probe_video, sample_times, sniff_container


def refused(data: bytes, code: str, limits: VideoLimits | None = None) -> VideoInputError:
    with pytest.raises(VideoInputError) as info:
        probe_video(data, limits=limits).frames(VideoSampling())
    assert info.value.code == code, info.value
    return info.value


def test_sampling_at_fps_keeps_timestamps() -> None:
    clip = probe_video(clip_bytes(frames=50, fps=10))  # 5 s
    assert (clip.container, clip.codec, clip.size, clip.duration, clip.source_fps) == (
        "mp4",
        "h264",
        (64, 48),
        5.0,
        10.0,
    )
    frames = clip.frames(VideoSampling(fps=2, max_frames=32))
    assert frames.timestamps == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
    assert frames.size == (64, 48) and frames.frames[0].dtype.name == "uint8"


def test_max_frames_spreads_uniformly_over_the_clip() -> None:
    frames = probe_video(clip_bytes(frames=50, fps=10)).frames(VideoSampling(fps=2, max_frames=4))
    assert len(frames.frames) == 4 and frames.timestamps[0] == 0.0 and frames.timestamps[-1] >= 3.5
    assert sample_times(100, 2, 4) == [0.0, 25.0, 50.0, 75.0]


def test_frames_reduced_to_the_budget() -> None:
    frames = probe_video(clip_bytes(size=(640, 480), frames=2)).frames(VideoSampling(max_pixels=64 * 48))
    w, h = frames.size
    assert w * h <= 2 * 64 * 48 and abs(w / h - 4 / 3) < 0.1


def test_rotation_metadata_is_applied() -> None:
    frames = probe_video(clip_bytes(size=(64, 32), rotation=90)).frames(VideoSampling())
    assert frames.size == (32, 64)  # a portrait phone clip stored landscape


def test_webm_vp9() -> None:
    clip = probe_video(clip_bytes(codec="libvpx-vp9", fmt="webm", frames=20, fps=10))
    assert (clip.container, clip.codec) == ("matroska", "vp9")
    assert clip.frames(VideoSampling(fps=2)).timestamps == (0.0, 0.5, 1.0, 1.5)


def test_garbage_truncated_and_foreign_codecs_are_refused() -> None:
    refused(b"", "invalid_video")
    refused(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 200, "invalid_video")
    refused(b"hello, this is not a video at all", "unsupported_video_format")
    whole = clip_bytes(frames=20)
    with pytest.raises(VideoInputError):  # cut in half: its index (moov) is at the end
        probe_video(whole[: len(whole) // 2]).frames(VideoSampling())
    refused(clip_bytes(codec="ffv1", fmt="matroska"), "unsupported_video_codec")


@pytest.mark.parametrize(
    "text",
    [
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/seg0.ts\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile 'http://127.0.0.1:9/a.mp4'\nfile '/etc/passwd'\n",
    ],
)
def test_playlists_never_reach_ffmpeg(text: bytes) -> None:
    assert sniff_container(text) is None  # so FFmpeg is never asked to guess (hls/concat would open the links)
    refused(text, "unsupported_video_format")


def test_ten_hour_clip_refused_from_its_header() -> None:
    data = clip_bytes(times=[0, 36000])  # two frames ten hours apart: a 2 KB file
    started = time.perf_counter()
    err = refused(data, "video_too_long")
    assert "36000" in str(err) or "36001" in str(err)
    assert time.perf_counter() - started < 2


def test_8k_refused_from_its_header() -> None:
    err = refused(clip_bytes(size=(7680, 4320), frames=1), "video_too_large")
    assert "7680×4320" in str(err)


def test_frame_count_and_decode_time_bounds() -> None:
    refused(clip_bytes(frames=30, fps=10), "video_too_long", VideoLimits(max_source_frames=20))
    clip = probe_video(clip_bytes(frames=30, fps=10), limits=VideoLimits(decode_timeout=1e-9))
    with pytest.raises(VideoInputError) as info:
        clip.frames(VideoSampling())
    assert info.value.code == "video_decode_timeout"


def test_frame_list_is_a_clip() -> None:
    pictures = tuple(decoded(64, 48, seed=i) for i in range(6))
    clip = FrameListVideo(pictures, fps=2.0)
    frames = clip.frames(VideoSampling(max_frames=3))
    assert len(frames.frames) == 3 and frames.timestamps == (0.0, 1.0, 2.5)
    assert clip.digest != FrameListVideo(pictures[::-1], fps=2.0).digest
    assert clip.digest != FrameListVideo(pictures, fps=1.0).digest


def test_pickles_without_frames() -> None:
    import pickle

    clip = probe_video(clip_bytes())
    again = pickle.loads(pickle.dumps(clip))
    assert (
        again.digest == clip.digest
        and again.frames(VideoSampling()).timestamps == clip.frames(VideoSampling()).timestamps
    )


def test_frame_list_frames_are_reduced_to_the_budget() -> None:
    pictures = (decoded(640, 480, seed=1), decoded(320, 200, seed=2))
    frames = FrameListVideo(pictures, fps=1.0).frames(VideoSampling(max_pixels=64 * 48))
    assert frames.size[0] * frames.size[1] <= 2 * 64 * 48
    assert frames.frames[0].shape == frames.frames[1].shape


def test_clips_reserve_their_frames_on_the_pixel_gate() -> None:
    from vlmbridge.engine.types import ChatMessage, GenerationRequest, PixelBudget, TextPart, VideoPart
    from vlmbridge.errors import QueueFullError
    from vlmbridge.media.inflight import PixelGate
    from vlmbridge.server.convert import hold_images, video_pixels

    part = VideoPart(probe_video(clip_bytes()), VideoSampling(2, 8, 4096), PixelBudget(4096))
    request = GenerationRequest((ChatMessage("user", (part, TextPart("?"))),))
    assert video_pixels(request) == 8 * 2 * 4096
    gate = PixelGate(100_000)
    with hold_images(gate, request):
        assert gate.in_flight == 65536
        with pytest.raises(QueueFullError):
            hold_images(gate, request)  # a second clip would pass the bound: 429, retry later
    assert gate.in_flight == 0


def test_long_clips_are_sampled_by_seeking_with_the_same_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from vlmbridge.media import video

    clip = probe_video(clip_bytes(frames=600, fps=5, gop=10))  # 2 minutes, a keyframe every 2 s
    sampling = VideoSampling(fps=2, max_frames=4)
    seeking = clip.frames(sampling)
    assert seeking.timestamps == (0.0, 30.0, 60.0, 90.0)
    assert seeking.decoded < 60  # a few frames per target, not 600
    monkeypatch.setattr(video, "SEEK_GAP_S", float("inf"))
    walking = clip.frames(sampling)
    assert walking.decoded > 400 and walking.timestamps == seeking.timestamps
    assert all(np.array_equal(a, b) for a, b in zip(seeking.frames, walking.frames, strict=True))


def test_sparse_keyframes_stop_the_seeking() -> None:
    clip = probe_video(clip_bytes(frames=300, fps=5, gop=300))  # one keyframe for the whole minute
    frames = clip.frames(VideoSampling(fps=2, max_frames=6))
    assert len(frames.frames) == 6 and frames.decoded < 2 * 300  # never back to the start again and again
