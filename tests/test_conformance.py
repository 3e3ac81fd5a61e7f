"""The API's conformance suite: HTTP-only tests (the `openai` client and plain HTTP, nothing of the engine) that
every engine must pass. `engine_server` runs each module once per engine: the transformers engine always, the vLLM
engine where its venv is (VLMBRIDGE_VLLM_PYTHON; `./vb test` creates it).

Both engines serve the same `tiny-vllm` checkpoint (32-dim heads: vLLM's CPU attention refuses 16) in float32, so
their answers can also be compared (tests/test_vllm_engine.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import TinyFactory
from tests.server_utils import MODEL, Server, data_url, image_message, running

pytestmark = pytest.mark.conformance

ENGINES = ("transformers", "vllm")
VLLM_PYTHON_ENV = "VLMBRIDGE_VLLM_PYTHON"


def engine_settings(engine: str) -> dict[str, object]:
    """Settings that run `engine` on a CPU the same way for every test module."""
    common: dict[str, object] = {"dtype": "fp32", "context_length": 8192, "max_new_tokens": 64}
    if engine == "transformers":
        return common
    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        pytest.skip(f"engine vllm: {VLLM_PYTHON_ENV} is not set (./vb test creates the vLLM venv and sets it)")
    return {
        **common,
        "engine": "vllm",
        "engine_worker": "process",  # vLLM runs in its own interpreter
        "vllm_python": python,
        "vllm_cpu_kv_cache_gib": 1,
    }


@pytest.fixture(scope="module", params=ENGINES)
def engine_server(request: pytest.FixtureRequest, tiny_model: TinyFactory) -> Iterator[Server]:
    folder: Path = tiny_model("qwen3_vl", size="tiny-vllm")
    with running(folder, **engine_settings(request.param)) as server:
        yield server


def ask(server: Server, url: str, **kwargs: object) -> openai.types.chat.ChatCompletion:
    body: dict[str, object] = {"max_tokens": 6, "temperature": 0, **kwargs}
    with server.openai() as client:
        return client.chat.completions.create(model=MODEL, messages=image_message(url), **body)  # type: ignore[call-overload, no-any-return]


def test_different_pictures_reach_the_model(engine_server: Server) -> None:
    a = ask(engine_server, data_url(seed=1), logprobs=True, top_logprobs=3)
    b = ask(engine_server, data_url(seed=2), logprobs=True, top_logprobs=3)
    la, lb = a.choices[0].logprobs, b.choices[0].logprobs
    assert la is not None and la.content and lb is not None and lb.content
    first_a = [(t.token, round(t.logprob, 4)) for t in la.content[0].top_logprobs]
    first_b = [(t.token, round(t.logprob, 4)) for t in lb.content[0].top_logprobs]
    assert first_a != first_b, "two different pictures gave the same first-token distribution"
    again = ask(engine_server, data_url(seed=1))
    assert again.choices[0].message.content == a.choices[0].message.content  # greedy: the same picture, same answer


def test_usage_reports_image_tokens_as_tokenize_counts_them(engine_server: Server) -> None:
    url = data_url(320, 240, seed=3)
    r = ask(engine_server, url)
    usage = r.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    counted = httpx.post(
        f"{engine_server.v1}/tokenize", json={"model": MODEL, "messages": image_message(url)}, timeout=60
    ).json()
    assert usage.prompt_tokens == counted["count"]
    assert usage.prompt_tokens_details.image_tokens == counted["image_tokens"] > 0  # type: ignore[attr-defined]
    assert usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage_on_the_last_chunk(engine_server: Server) -> None:
    url = data_url(seed=4)
    whole = ask(engine_server, url)
    with engine_server.openai() as client:
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=image_message(url), max_tokens=6, temperature=0, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]


def test_detail_low_and_per_request_budgets_cut_image_tokens(engine_server: Server) -> None:
    url = data_url(640, 480, seed=5)
    high = ask(engine_server, url).usage
    low = engine_server.post(
        {"model": MODEL, "messages": image_message(url, detail="low"), "max_tokens": 2, "temperature": 0}
    ).json()["usage"]
    capped = engine_server.post(
        {"model": MODEL, "messages": image_message(url), "max_tokens": 2, "temperature": 0, "max_pixels": 128 * 128}
    ).json()["usage"]
    assert high is not None and high.prompt_tokens_details is not None
    high_images = high.prompt_tokens_details.image_tokens  # type: ignore[attr-defined]
    assert 0 < capped["prompt_tokens_details"]["image_tokens"] < high_images
    assert 0 < low["prompt_tokens_details"]["image_tokens"] <= high_images


def test_stop_strings_end_the_answer_where_they_match(engine_server: Server) -> None:
    url = data_url(seed=6)
    full = ask(engine_server, url, max_tokens=12).choices[0].message.content or ""
    assert len(full) > 3
    stop = full[2:4]
    cut = ask(engine_server, url, max_tokens=12, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


def test_a_seed_makes_sampling_repeatable(engine_server: Server) -> None:
    url = data_url(seed=7)
    one = ask(engine_server, url, temperature=1.5, seed=11, max_tokens=8).choices[0].message.content
    two = ask(engine_server, url, temperature=1.5, seed=11, max_tokens=8).choices[0].message.content
    assert one == two


def test_bad_input_gets_the_openai_error_envelope(engine_server: Server) -> None:
    broken = "data:image/png;base64,aGVsbG8gd29ybGQ="  # "hello world": not a picture
    r = engine_server.post({"model": MODEL, "messages": image_message(broken), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    long = [{"role": "user", "content": "word " * 13000}]
    r = engine_server.post({"model": MODEL, "messages": long, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = engine_server.post({"model": MODEL, "messages": image_message(data_url()), "max_tokens": 9000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = engine_server.post({"model": "nope", "messages": image_message(data_url()), "max_tokens": 2})
    assert r.status_code == 404
    assert ask(engine_server, data_url(seed=8)).choices[0].finish_reason == "length"  # and it still serves


def test_a_client_that_goes_away_mid_stream_frees_the_engine(engine_server: Server) -> None:
    cancelled = engine_server.metric("vlmbridge_cancelled_requests")
    # Nearly the whole context: a fast engine must not be able to finish before a loaded front notices the hang-up.
    body = {
        "model": MODEL, "messages": image_message(data_url(seed=9)), "max_tokens": 8000, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with httpx.stream("POST", f"{engine_server.v1}/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # tokens are flowing: hang up
    deadline = time.monotonic() + 30
    while engine_server.metric("vlmbridge_cancelled_requests") <= cancelled and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_server.metric("vlmbridge_cancelled_requests") > cancelled
    assert ask(engine_server, data_url(seed=10)).choices[0].finish_reason == "length"


def test_a_clip_is_answered_and_counted_as_tokenize_counts_it(engine_server: Server) -> None:
    """Both engines answer a clip, its prompt and video tokens as /v1/tokenize counts them (Qwen3-VL's
    `<t seconds>` text between frame pairs included; on vLLM through engine/vllm/compat.py's bridge)."""
    from tests.video_clips import clip_bytes, video_message, video_uri

    messages = video_message(video_uri(clip_bytes(seed=1)), fps=2, max_frames=4, max_pixels=64 * 64)
    r = engine_server.post({"model": MODEL, "messages": messages, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens_details"]["video_tokens"] > 0
    counted = httpx.post(f"{engine_server.v1}/tokenize", json={"model": MODEL, "messages": messages}, timeout=60)
    assert counted.json()["count"] == usage["prompt_tokens"], counted.text


def test_dify_sdk_sends_pictures_and_a_clip_through_our_plugin(
    engine_server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Dify's real SDK (dify_plugin) runs our plugin against each engine: two pictures give two answers and each
    picture's tokens reach the engine (the server's image-token counter); the same for two clips."""
    from tests.dify_support import DifyDriver, dify_python, image_b64, text, user, video_b64
    from tests.helpers import png_bytes
    from tests.video_clips import clip_bytes

    driver = DifyDriver(dify_python(), tmp_path_factory.mktemp("dify-conformance"))
    creds = {"endpoint_url": engine_server.v1, "api_key": "none", "mode": "chat", "context_size": "8192"}

    def invoke(*parts: dict[str, object]) -> dict[str, object]:
        messages = [user(*parts, text("What is in it?"))]
        params = {"max_tokens": 6, "temperature": 0}
        answer: dict[str, object] = driver.call(
            "invoke", cls="plugin", model=MODEL, credentials=creds, messages=messages, parameters=params
        )
        return answer

    try:
        before = engine_server.metric("vlmbridge_image_tokens_total")
        first, second = (invoke(image_b64(png_bytes(320, 240, seed=seed))) for seed in (41, 42))
        seen = engine_server.metric("vlmbridge_image_tokens_total") - before
        videos = engine_server.metric("vlmbridge_video_tokens_total")
        clip, other_clip = (invoke(video_b64(clip_bytes(seed=seed))) for seed in (5, 6))
        videos = engine_server.metric("vlmbridge_video_tokens_total") - videos
    finally:
        driver.close()
    assert first["text"] != second["text"], "two pictures gave the same answer through Dify"
    assert clip["text"] != other_clip["text"], "two clips gave the same answer through Dify"
    assert videos > 0 and videos % 2 == 0, f"the clips' tokens did not reach the engine ({videos})"
    assert seen > 0 and seen % 2 == 0, f"the pictures' tokens did not reach the engine ({seen})"


def test_a_json_schema_answer_is_an_instance_of_the_schema(engine_server: Server) -> None:
    """response_format json_schema: the transformers engine constrains with llguidance, vLLM with its own
    structured outputs; either way the answer parses and fits (a random-weight model never would by chance)."""
    schema = {
        "type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"], "additionalProperties": False,
    }  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    r = engine_server.post(
        {"model": MODEL, "messages": image_message(data_url(seed=11)), "max_tokens": 60, "temperature": 0,
         "response_format": fmt}
    )  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        answer = json.loads(choice["message"]["content"])
        assert set(answer) == {"n", "ok"} and isinstance(answer["n"], int) and isinstance(answer["ok"], bool)
    else:  # out of tokens mid-number: what there is still follows the schema's start
        assert choice["message"]["content"].startswith("{")


def test_tools_reach_the_template_and_a_forced_call_is_valid(engine_server: Server) -> None:
    """Tools render into the prompt on both engines (more prompt tokens); tool_choice required makes a valid call on
    both (a grammar over the tools' schemas: llguidance in the transformers engine, vLLM's guidance backend)."""
    label = {"type": "string", "maxLength": 8}
    tool = {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"label": label}, "required": ["label"]}}}  # fmt: skip
    base = {"model": MODEL, "messages": image_message(data_url(seed=12)), "max_tokens": 120, "temperature": 0}
    plain = engine_server.post({**base, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    with_tools = engine_server.post({**base, "max_tokens": 1, "tools": [tool]}).json()["usage"]["prompt_tokens"]
    assert with_tools > plain
    r = engine_server.post({**base, "tools": [tool], "tool_choice": "required"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "tag"
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"label"} and isinstance(arguments["label"], str) and len(arguments["label"]) <= 8


def test_a_schema_no_answer_can_satisfy_is_a_400_naming_it(engine_server: Server) -> None:
    """The grammar library (llguidance on both engines) finds the schema unsatisfiable: a 400, and it still serves."""
    fmt = {"type": "json_schema", "json_schema": {"name": "never", "schema": False}}
    body = {"model": MODEL, "messages": image_message(data_url(seed=13)), "max_tokens": 4, "response_format": fmt}
    r = engine_server.post(body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_schema" and r.json()["error"]["param"] == "response_format", r.text
    assert ask(engine_server, data_url(seed=13)).choices[0].finish_reason == "length"
