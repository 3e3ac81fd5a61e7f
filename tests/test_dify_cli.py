"""`vlmbridge dify config`: the built-in OpenAI-API-compatible provider's field values, checked by feeding them to the
SDK class that provider runs, against a real server, with a picture."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import TinyFactory
from tests.dify_support import DifyDriver, dify_python, image_b64, run_cli, text, user
from tests.helpers import png_bytes
from tests.server_utils import Server, running
from vlmbridge.errors import InvalidRequestError
from vlmbridge.integrations.dify_recipe import normalize_base_url

KEY = "cfg-key"
# Field label in Dify's form → the credential the provider stores; "select" labels map to their option values.
CREDENTIALS = {
    "Model Name": "model",
    "API Key": "api_key",
    "API endpoint URL": "endpoint_url",
    "model name for API endpoint": "endpoint_model_name",
    "Model context size": "context_size",
    "Upper bound for max tokens": "max_tokens_to_sample",
    "Vision Support": "vision_support",
    "Delimiter for streaming results": "stream_mode_delimiter",
    "Completion mode": "mode",
    "Function Call Type": "function_calling_type",
    "Stream function calling": "stream_function_calling",
    "Stream mode auth": "stream_mode_auth",
    "Structured Output": "structured_output_support",
}
OPTIONS = {
    "Support": "support",
    "Not Support": "no_support",
    "Chat": "chat",
    "Not Use": "not_use",
    "Tool Call": "tool_call",
}
# Selects whose option values differ from the ones above (the built-in provider's form).
SUPPORTED = {"Support": "supported", "Not Support": "not_supported"}
OPTIONS_FOR = {"stream_function_calling": SUPPORTED, "structured_output_support": SUPPORTED}


def config_json(*args: str) -> dict[str, Any]:
    result = run_cli("dify", "config", "--json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_config_from_a_model_folder(tiny_model: TinyFactory) -> None:
    folder = tiny_model("qwen3_vl")
    data = config_json("--model-dir", str(folder))
    fields = data["fields"]
    assert data["base_url"] == fields["API endpoint URL"] == "http://vlmbridge:8000/v1" and data["warnings"] == []
    assert fields["Model Name"] == fields["model name for API endpoint"] == folder.name
    assert fields["Model context size"] == "32768"  # min(max_position_embeddings, 32768), as the server uses
    assert fields["Vision Support"] == "Support" and "drops every image" in data["notes"]["Vision Support"]
    assert fields["Delimiter for streaming results"] == "\\n\\n" and fields["Completion mode"] == "Chat"
    assert fields["Compatibility mode"].startswith("OpenAI compatible") and fields["Function Call Type"] == "Tool Call"
    assert fields["Stream function calling"] == fields["Structured Output"] == "Support"
    advice = " ".join(data["advice"])
    assert "docker_default" in advice and "MULTIMODAL_SEND_FORMAT=url" in advice and "--allow-image-host" in advice

    context = config_json("--model-dir", str(folder), "--context", "8192", "--served-model-name", "vl")["fields"]
    assert (context["Model context size"], context["Model Name"]) == ("8192", "vl")
    text_model = config_json("--model-dir", str(tiny_model("qwen2")))["fields"]
    assert text_model["Vision Support"] == "Not Support"


def test_config_warns_about_localhost_and_fixes_the_path(tiny_model: TinyFactory) -> None:
    result = run_cli("dify", "config", "--model-dir", str(tiny_model("qwen3_vl")), "--base-url", "localhost:8000")
    assert result.returncode == 0
    assert "localhost inside Dify's containers is the container itself" in result.stderr
    assert "added /v1" in result.stderr
    assert "API endpoint URL                 http://localhost:8000/v1" in result.stdout
    assert "Vision Support                   Support" in result.stdout

    host = config_json("--model-dir", str(tiny_model("qwen3_vl")), "--base-url", "http://host.docker.internal:8000")
    assert any("host-gateway" in line for line in host["advice"])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("vlmbridge:8000", "http://vlmbridge:8000/v1"),
        ("http://vlmbridge:8000/v1/", "http://vlmbridge:8000/v1"),
        ("https://vl.example.com/api/v1/chat/completions", "https://vl.example.com/api/v1"),
    ],
)
def test_normalize_base_url(given: str, expected: str) -> None:
    assert normalize_base_url(given)[0] == expected


def test_normalize_base_url_refuses_other_schemes() -> None:
    with pytest.raises(InvalidRequestError):
        normalize_base_url("ftp://vlmbridge/v1")


# --- the printed values, used as Dify would use them ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl"), api_keys=[KEY], context_length=4096) as s:
        yield s


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DifyDriver]:
    d = DifyDriver(dify_python(), tmp_path_factory.mktemp("dify-cli"))
    yield d
    d.close()


def test_config_values_work_in_the_built_in_provider(driver: DifyDriver, server: Server) -> None:
    data = config_json("--server", server.v1, "--api-key", KEY, "--base-url", server.v1)
    fields = data["fields"]
    assert (fields["Model Name"], fields["Model context size"]) == ("tiny", "4096")  # asked the running server
    values = {
        CREDENTIALS[label]: OPTIONS_FOR.get(CREDENTIALS[label], OPTIONS).get(value, value)
        for label, value in fields.items()
        if label in CREDENTIALS
    }
    model = values.pop("model")
    schema = driver.call("schema", cls="stock", model=model, credentials=values)
    assert "vision" in schema["features"] and schema["properties"]["context_size"] == 4096
    # Tool calls (streamed too) and native structured output: Dify then sends tools and response_format.
    assert {"multi-tool-call", "stream-tool-call"} <= set(schema["features"])
    assert {"response_format", "json_schema"} <= set(schema["rules"])

    driver.call("validate", cls="stock", model=model, credentials=values)
    before = server.metric("vlmbridge_image_tokens_total")
    message = user(image_b64(png_bytes(320, 240, seed=41)), text("What is this?"))
    answer = driver.call(
        "invoke", cls="stock", model=model, credentials=values, messages=[message],
        parameters={"max_tokens": 4}, stream=True,
    )  # fmt: skip
    assert answer["finish_reason"] in ("stop", "length") and answer["chunks"] >= 2
    assert server.metric("vlmbridge_image_tokens_total") - before == 80
