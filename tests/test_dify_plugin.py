"""The Dify plugin's LLM class and the SDK's stock OpenAI-compatible class (what Dify's built-in provider runs),
driven by the real dify_plugin SDK in its own process against a real vlmbridge server on a tiny checkpoint.

Every test that sends an image proves it reached the model: the server's image-token counter grows by the image's
80 tokens (320×240), and where the SDK reports the server's usage, prompt_tokens grows by at least as much.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TinyFactory
from tests.dify_support import DifyDriver, DriverError, ImageHost, dify_python, image_b64, image_url, text, user
from tests.helpers import png_bytes
from tests.server_utils import MODEL, Server, running

KEY = "dify-key"
IMAGE_TOKENS = 80  # a 320×240 picture on the tiny Qwen3-VL: 10×8 merged 32-px patches
CLASSES = ["plugin", "stock"]


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl"), api_keys=[KEY], allow_image_hosts=["127.0.0.1"]) as s:
        yield s


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DifyDriver]:
    d = DifyDriver(dify_python(), tmp_path_factory.mktemp("dify-driver"))
    yield d
    d.close()


@pytest.fixture(scope="module")
def images() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.close()


def creds(server: Server, cls: str = "plugin", **override: Any) -> dict[str, Any]:
    """Model credentials as Dify stores them (all strings); the stock class gets the built-in provider's fields."""
    base = {"endpoint_url": server.v1, "api_key": KEY, "mode": "chat", "context_size": "32768"}
    if cls == "stock":
        base |= {"vision_support": "support", "stream_mode_delimiter": "\\n\\n", "max_tokens_to_sample": "4096"}
    return base | override


def invoke(driver: DifyDriver, server: Server, cls: str, messages: list[Any], **kw: Any) -> dict[str, Any]:
    params = {"max_tokens": 8, "temperature": 0} | kw.pop("parameters", {})
    result: dict[str, Any] = driver.call(
        "invoke", cls=cls, model=MODEL, credentials=kw.pop("credentials", creds(server, cls)),
        messages=messages, parameters=params, **kw,
    )  # fmt: skip
    return result


def image_tokens_seen(server: Server) -> float:
    return server.metric("vlmbridge_image_tokens_total")


# --- invoking ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
def test_text_blocking_and_streaming_agree(driver: DifyDriver, server: Server, cls: str) -> None:
    messages = [{"role": "system", "content": "You are terse."}, user(text("Say hello."))]
    blocking = invoke(driver, server, cls, messages)
    streamed = invoke(driver, server, cls, messages, stream=True)
    assert streamed["text"] == blocking["text"]  # temperature 0: the same tokens either way
    assert streamed["chunks"] >= 2 and streamed["finish_reason"] in ("stop", "length")
    assert blocking["usage"]["completion_tokens"] >= 1 and not blocking["estimated"]
    # The plugin asks for usage in streams; the stock class never sends stream_options.include_usage, and gets it
    # all the same on the finish chunk (--stream-usage always), so the SDK never falls back to counting GPT-2 tokens.
    assert streamed["usage"] == blocking["usage"] and not streamed["estimated"]


@pytest.mark.parametrize("cls", CLASSES)
def test_streaming_with_an_image_offline_logs_our_usage(driver: DifyDriver, server: Server, cls: str) -> None:
    """Air-gapped Dify: the SDK's own counting (tiktoken, downloaded on first use) must never be needed, and the
    prompt tokens it logs are ours, the picture's 80 tokens included."""
    png = png_bytes(320, 240, seed=31)
    messages = [user(image_b64(png), text("What is in the picture?"))]
    before = image_tokens_seen(server)
    streamed = invoke(driver, server, cls, messages, stream=True, estimate_offline=False)
    assert image_tokens_seen(server) - before == IMAGE_TOKENS
    same = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "text", "text": "What is in the picture?"},
    ]}]  # fmt: skip
    direct = server.post(
        {"model": MODEL, "messages": same, "max_tokens": 8, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()["usage"]
    assert streamed["usage"]["prompt_tokens"] == direct["prompt_tokens"]
    assert direct["prompt_tokens_details"]["image_tokens"] == IMAGE_TOKENS
    assert streamed["usage"]["completion_tokens"] == direct["completion_tokens"]


def test_strict_stream_usage_leaves_the_sdk_to_count(tiny_model: TinyFactory, driver: DifyDriver) -> None:
    """--stream-usage requested is OpenAI's behaviour: the stock class then has to count (and offline, cannot)."""
    with running(tiny_model("qwen3_vl"), api_keys=[KEY], stream_usage="requested") as strict:
        messages = [user(text("Say hello."))]
        assert invoke(driver, strict, "stock", messages, stream=True)["estimated"]
        with pytest.raises(DriverError):
            invoke(driver, strict, "stock", messages, stream=True, estimate_offline=False)


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
@pytest.mark.parametrize("form", ["base64", "url"])
@pytest.mark.parametrize("cls", CLASSES)
def test_image_reaches_the_model(
    driver: DifyDriver, server: Server, images: ImageHost, cls: str, form: str, stream: bool
) -> None:
    png = png_bytes(320, 240, seed=11)
    # The URL form is what Dify sends with MULTIMODAL_SEND_FORMAT=url: a link to its own (private) file server.
    part = image_b64(png) if form == "base64" else image_url(images.put(f"{cls}-{stream}.png", png))
    before = image_tokens_seen(server)
    with_image = invoke(driver, server, cls, [user(part, text("What is in the picture?"))], stream=stream)
    assert image_tokens_seen(server) - before == IMAGE_TOKENS
    assert with_image["finish_reason"] in ("stop", "length") or not stream
    if form == "url":
        assert any(hit.startswith(f"/files/{cls}-{stream}.png") for hit in images.hits)
    if not with_image["estimated"]:
        text_only = invoke(driver, server, cls, [user(text("What is in the picture?"))], stream=stream)
        assert with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] >= IMAGE_TOKENS


def test_two_pictures_two_answers(driver: DifyDriver, server: Server) -> None:
    """Same size, same prompt, temperature 0: only the pixels differ, so the answers do."""
    answers = [
        invoke(driver, server, "plugin", [user(image_b64(png_bytes(320, 240, seed=s)), text("Describe."))])["text"]
        for s in (21, 22, 21)
    ]
    assert answers[0] != answers[1] and answers[0] == answers[2]


def test_seed_and_top_k_reach_the_server(driver: DifyDriver, server: Server) -> None:
    def sample(seed: int) -> str:
        params = {"temperature": 1.0, "top_k": 50, "seed": seed, "max_tokens": 12}
        answer: str = invoke(driver, server, "plugin", [user(text("Tell me a story."))], parameters=params)["text"]
        return answer

    assert sample(7) == sample(7)
    assert len({sample(1), sample(2), sample(3)}) > 1


# --- token counting ------------------------------------------------------------------------------------------------
def test_num_tokens_come_from_the_server(driver: DifyDriver, server: Server) -> None:
    for messages in (
        [user(text("How long is this prompt?"))],
        [{"role": "system", "content": "Be brief."}, user(image_b64(png_bytes(320, 240, seed=3)), text("Describe."))],
    ):
        counted = driver.call("num_tokens", model=MODEL, credentials=creds(server), messages=messages)
        used = invoke(driver, server, "plugin", messages, parameters={"max_tokens": 1})["usage"]["prompt_tokens"]
        assert counted == used  # the server's tokenizer and image processor, image tokens included


def test_num_tokens_without_a_server_is_an_estimate_not_an_error(driver: DifyDriver, server: Server) -> None:
    dead = creds(server, endpoint_url="http://127.0.0.1:9/v1")  # discard port: nothing listens
    counted = driver.call("num_tokens", model=MODEL, credentials=dead, messages=[user(text("x " * 40))])
    assert 10 <= counted <= 60  # the text-only estimate, computed without tiktoken (no download, no network)


# --- credentials ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
def test_validate_credentials(driver: DifyDriver, server: Server, cls: str) -> None:
    assert driver.call("validate", cls=cls, model=MODEL, credentials=creds(server, cls)) is None

    with pytest.raises(DriverError) as wrong_url:
        driver.call(
            "validate", cls=cls, model=MODEL, credentials=creds(server, cls, endpoint_url="http://127.0.0.1:9/v1")
        )
    with pytest.raises(DriverError) as wrong_key:
        driver.call("validate", cls=cls, model=MODEL, credentials=creds(server, cls, api_key="nope"))
    assert wrong_url.value.type == wrong_key.value.type == "CredentialsValidateFailedError"
    if cls == "plugin":
        assert "cannot reach a vlmbridge server at http://127.0.0.1:9/v1" in wrong_url.value.message
        assert "host.docker.internal" in wrong_url.value.message  # says what to use instead of localhost
        assert "refused the API key" in wrong_key.value.message
    else:
        assert "Connection refused" in wrong_url.value.message
        assert "status code 401" in wrong_key.value.message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"endpoint_url": "URL-WITHOUT-V1"}, "must end in /v1"),
        ({"endpoint_model_name": "Qwen3-VL-8B-Instruct"}, f"serves '{MODEL}', not 'Qwen3-VL-8B-Instruct'"),
        ({"context_size": "999999"}, "larger than the server's 32768 tokens"),
        ({"endpoint_url": "vlmbridge:8000/v1"}, "needs http:// or https://"),
    ],
)
def test_validate_credentials_says_what_to_fix(
    driver: DifyDriver, server: Server, override: dict[str, str], expected: str
) -> None:
    if override.get("endpoint_url") == "URL-WITHOUT-V1":
        override = {"endpoint_url": server.base_url}
    with pytest.raises(DriverError, match="CredentialsValidateFailedError") as err:
        driver.call("validate", cls="plugin", model=MODEL, credentials=creds(server, **override))
    assert expected in err.value.message


# --- errors --------------------------------------------------------------------------------------------------------
def test_http_errors_become_dify_invoke_errors(driver: DifyDriver, server: Server) -> None:
    def error_of(**kw: Any) -> DriverError:
        with pytest.raises(DriverError) as err:
            invoke(driver, server, "plugin", kw.pop("messages", [user(text("hi"))]), **kw)
        return err.value

    assert error_of(credentials=creds(server, api_key="nope")).type == "InvokeAuthorizationError"
    unknown = error_of(credentials=creds(server, endpoint_model_name="other"))
    assert unknown.type == "InvokeBadRequestError" and "not served here" in unknown.message
    broken = error_of(messages=[user({"image": {"base64": "!!!", "mime_type": "image/png"}}, text("?"))])
    assert broken.type == "InvokeBadRequestError" and "invalid_base64" in broken.message
    assert error_of(credentials=creds(server, endpoint_url="http://127.0.0.1:9/v1")).type == "InvokeConnectionError"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, "InvokeBadRequestError"),
        (401, "InvokeAuthorizationError"),
        (404, "InvokeBadRequestError"),
        (413, "InvokeBadRequestError"),
        (429, "InvokeRateLimitError"),
        (500, "InvokeServerUnavailableError"),
        (503, "InvokeServerUnavailableError"),
        (504, "InvokeConnectionError"),
    ],
)
def test_every_status_of_the_envelope_has_its_dify_error(driver: DifyDriver, status: int, expected: str) -> None:
    body = '{"error": {"message": "what went wrong", "type": "x", "param": null, "code": "some_code"}}'
    mapped = driver.call("map_response", status=status, body=body)
    assert mapped["type"] == expected
    if expected != "InvokeAuthorizationError":  # the SDK hides the server's words for auth errors
        assert "what went wrong" in mapped["message"] and "some_code" in mapped["message"]


@pytest.mark.parametrize(
    ("err_type", "expected"),
    [
        ("invalid_request_error", "InvokeBadRequestError"),
        ("rate_limit_error", "InvokeRateLimitError"),
        ("timeout_error", "InvokeConnectionError"),
        ("service_unavailable", "InvokeServerUnavailableError"),
        ("internal_error", "InvokeServerUnavailableError"),
    ],
)
def test_every_error_event_type_has_its_dify_error(driver: DifyDriver, err_type: str, expected: str) -> None:
    event = {"message": "it broke", "type": err_type, "param": None, "code": "c"}
    mapped = driver.call("map_event", error=event)
    assert mapped["type"] == expected and "it broke" in mapped["message"]


def test_error_mid_stream_becomes_a_dify_error(driver: DifyDriver, tiny_model: TinyFactory) -> None:
    """A deadline passed while streaming: the server sends an error event after the 200 status line."""
    with running(tiny_model("qwen3_vl"), request_timeout=0.05) as slow:
        messages = [user(text("Write a long story."))]
        with pytest.raises(DriverError) as err:
            invoke(driver, slow, "plugin", messages, parameters={"max_tokens": 4000}, stream=True)
    assert err.value.type == "InvokeConnectionError" and "request_timeout" in err.value.message


def test_model_that_failed_to_load_is_server_unavailable(driver: DifyDriver, tiny_model: TinyFactory) -> None:
    from vlmbridge.server.state import EngineSlot

    def no_gpu() -> Any:
        raise RuntimeError("CUDA is not available")

    with running(tiny_model("qwen3_vl"), slot=EngineSlot(MODEL, factory=no_gpu)) as broken:
        with pytest.raises(DriverError) as err:
            invoke(driver, broken, "plugin", [user(text("hi"))])
        assert err.value.type == "InvokeServerUnavailableError" and "not ready" in err.value.message
        with pytest.raises(DriverError) as err:
            driver.call("validate", cls="plugin", model=MODEL, credentials=creds(broken))
        assert "up but not ready" in err.value.message and "CUDA is not available" in err.value.message


# --- model schema --------------------------------------------------------------------------------------------------
FEATURES = {"vision", "video", "tool-call", "multi-tool-call", "stream-tool-call", "structured-output"}


def test_schema_declares_vision_tools_and_structured_output_by_default(driver: DifyDriver) -> None:
    schema = driver.call("schema", cls="plugin", model="m", credentials={"endpoint_url": "http://x/v1"})
    assert set(schema["features"]) == FEATURES
    assert schema["properties"] == {"context_size": 32768, "mode": "chat"}
    assert {"top_k", "seed", "response_format", "json_schema"} <= set(schema["rules"])
    assert schema["rules"]["top_p"]["min"] > 0

    off = driver.call("schema", cls="plugin", model="m", credentials={"mode": "chat", "vision_support": "no_support"})
    assert "vision" not in off["features"]
    plain = {"mode": "chat", "function_calling_type": "no_call"}
    assert set(driver.call("schema", cls="plugin", model="m", credentials=plain)["features"]) == {
        "vision", "video", "structured-output"
    }  # fmt: skip
    # The built-in provider's class declares vision only when told: Dify's default there drops every image.
    assert "vision" not in driver.call("schema", cls="stock", model="m", credentials={"mode": "chat"})["features"]


def test_remote_models_lists_what_the_server_serves(driver: DifyDriver, server: Server) -> None:
    models = driver.call("remote_models", credentials=creds(server))
    assert [(m["model"], m["properties"]["context_size"], set(m["features"])) for m in models] == [
        (MODEL, 32768, FEATURES)
    ]
    assert driver.call("remote_models", credentials=creds(server, api_key="nope")) == []


def test_text_only_model_is_offered_without_vision(driver: DifyDriver, tiny_model: TinyFactory, tmp_path: Path) -> None:
    with running(tiny_model("qwen2"), context_length=4096) as text_server:
        plain = {"endpoint_url": text_server.v1, "mode": "chat", "context_size": "4096"}
        models = driver.call("remote_models", credentials=plain)
        assert [(m["model"], m["properties"]["context_size"], set(m["features"])) for m in models] == [
            (MODEL, 4096, FEATURES - {"vision", "video"})
        ]
        with pytest.raises(DriverError) as err:
            driver.call("validate", cls="plugin", model=MODEL, credentials=plain)  # vision defaults to on
        assert "text-only model: set Vision Support to 'Not Support'" in err.value.message
        driver.call("validate", cls="plugin", model=MODEL, credentials=plain | {"vision_support": "no_support"})
