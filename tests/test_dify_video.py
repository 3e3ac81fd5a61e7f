"""Video through Dify's real plugin SDK: our plugin declares `video` and sends Dify's video contents as `video_url`
parts (base64 or Dify's signed file URL), and the answer changes with the clip; the SDK's stock class drops them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import TinyFactory
from tests.dify_support import DifyDriver, ImageHost, dify_python, text, user, video_b64, video_url
from tests.server_utils import MODEL, Server, running
from tests.video_clips import clip_bytes

PARAMS = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(
        tiny_model("qwen3_vl"), allow_image_hosts=["127.0.0.1"], video_max_frames=4, video_max_pixels=4096
    ) as s:
        yield s


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DifyDriver]:
    d = DifyDriver(dify_python(), tmp_path_factory.mktemp("dify-video"))
    yield d
    d.close()


def creds(server: Server, cls: str = "plugin") -> dict[str, str]:
    base = {"endpoint_url": server.v1, "mode": "chat", "context_size": "32768"}
    return base | ({"vision_support": "support", "max_tokens_to_sample": "4096"} if cls == "stock" else {})


def video_tokens(server: Server) -> float:
    return server.metric("vlmbridge_video_tokens_total")


def ask(driver: DifyDriver, server: Server, part: dict[str, object], cls: str = "plugin", **kw: object) -> dict:  # type: ignore[type-arg]
    result: dict = driver.call(  # type: ignore[type-arg]
        "invoke", cls=cls, model=MODEL, credentials=creds(server, cls),
        messages=[user(part, text("What happens in this clip?"))], parameters=PARAMS, **kw,
    )  # fmt: skip
    return result


def test_plugin_sends_the_clip_and_the_answer_changes_with_it(driver: DifyDriver, server: Server) -> None:
    answers = []
    for seed in (1, 2, 3):
        before = video_tokens(server)
        answers.append(ask(driver, server, video_b64(clip_bytes(seed=seed, frames=20, fps=10)))["text"])
        assert video_tokens(server) > before  # the clip reached the model
    assert len(set(answers)) > 1, answers
    again = ask(driver, server, video_b64(clip_bytes(seed=1, frames=20, fps=10)))["text"]
    assert again == answers[0]


def test_plugin_sends_difys_file_url_streaming(driver: DifyDriver, server: Server) -> None:
    host = ImageHost()
    try:
        url = host.put("clip.mp4", clip_bytes(seed=4, frames=20, fps=10))
        before = video_tokens(server)
        streamed = ask(driver, server, video_url(url), stream=True)
        assert video_tokens(server) > before and streamed["finish_reason"] in ("stop", "length")
        assert any(hit.startswith("/files/clip.mp4") for hit in host.hits)
    finally:
        host.close()


def test_schema_declares_video_and_the_stock_class_drops_it(driver: DifyDriver, server: Server) -> None:
    schema = driver.call("schema", cls="plugin", model=MODEL, credentials=creds(server))
    assert "video" in schema["features"] and "vision" in schema["features"]
    off = driver.call("schema", cls="plugin", model=MODEL, credentials=creds(server) | {"video_support": "no_support"})
    assert "video" not in off["features"]
    before = video_tokens(server)
    ask(driver, server, video_b64(clip_bytes(seed=5)), cls="stock")
    assert video_tokens(server) == before  # why the plugin converts video itself


def test_num_tokens_count_the_clip(driver: DifyDriver, server: Server) -> None:
    messages = [user(video_b64(clip_bytes(seed=6, frames=20, fps=10)), text("Describe."))]
    counted = driver.call("num_tokens", model=MODEL, credentials=creds(server), messages=messages)
    used = driver.call("invoke", cls="plugin", model=MODEL, credentials=creds(server), messages=messages,
                       parameters=PARAMS)["usage"]["prompt_tokens"]  # fmt: skip
    assert counted == used


def test_moderation_template_takes_a_clip(driver: DifyDriver, server: Server) -> None:
    from tests.test_dify_templates import load, messages_for

    messages, params = messages_for(load("ugc-moderation"), None)
    messages[-1]["content"].insert(0, video_b64(clip_bytes(seed=7, frames=20, fps=10)))
    before = video_tokens(server)
    answer = driver.call("invoke", cls="plugin", model=MODEL, credentials=creds(server), messages=messages,
                         parameters=params)  # fmt: skip
    assert video_tokens(server) > before and answer["usage"]["completion_tokens"] >= 1
