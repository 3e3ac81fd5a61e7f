"""Structured output and tools through Dify's real SDK (dify_plugin, in its own process): our plugin and the SDK's
stock OpenAI-compatible class (what Dify's built-in provider runs) against a real server on a tiny checkpoint.

Dify's structured output invokes blocking with `response_format: "json_schema"` and `json_schema` as the string
`{"schema": S, "name": "llm_response"}`; users of the stock provider paste a bare schema. Both must come back as
JSON that validates, from a random-weight model that cannot write JSON on its own, on both engines (the vLLM one
where VLMBRIDGE_VLLM_PYTHON is set).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from tests.conftest import TinyFactory
from tests.dify_support import DifyDriver, DriverError, dify_python, image_b64, text, user
from tests.helpers import png_bytes
from tests.server_utils import MODEL, Server, running
from tests.structured_cases import token_budget
from tests.test_conformance import ENGINES, engine_settings

KEY = "dify-key"
SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["approve", "reject", "review"]},
        "categories": {"type": "array", "items": {"enum": ["spam", "nsfw", "violence"]}, "maxItems": 2},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "reason": {"type": "string", "maxLength": 20},
    },
    "required": ["verdict", "categories", "confidence", "reason"],
    "additionalProperties": False,
}
TOOL = {
    "name": "lookup_order",
    "description": "Look an order up by its id",
    "parameters": {
        "type": "object",
        "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}},
        "required": ["order_id"],
        "additionalProperties": False,
    },
}


@pytest.fixture(
    scope="module", params=[pytest.param(e, marks=[pytest.mark.vllm] if e == "vllm" else []) for e in ENGINES]
)
def server(request: pytest.FixtureRequest, tiny_model: TinyFactory) -> Iterator[Server]:
    if request.param == "transformers":
        folder, settings = tiny_model("qwen3_vl"), {}
    else:  # vLLM's CPU attention needs the tiny-vllm checkpoint (32-dim heads)
        folder, settings = tiny_model("qwen3_vl", size="tiny-vllm"), engine_settings("vllm")
    with running(folder, api_keys=[KEY], **settings) as s:
        yield s


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DifyDriver]:
    d = DifyDriver(dify_python(), tmp_path_factory.mktemp("dify-driver"))
    yield d
    d.close()


def creds(server: Server, cls: str) -> dict[str, Any]:
    base = {"endpoint_url": server.v1, "api_key": KEY, "mode": "chat", "context_size": "32768"}
    if cls == "stock":  # the built-in provider's form, with function calling and vision switched on
        base |= {
            "vision_support": "support", "stream_mode_delimiter": "\\n\\n", "max_tokens_to_sample": "4096",
            "function_calling_type": "tool_call", "structured_output_support": "supported",
        }  # fmt: skip
    return base


def invoke(driver: DifyDriver, server: Server, cls: str, parameters: dict[str, Any], **kw: Any) -> dict[str, Any]:
    messages = [user(image_b64(png_bytes(96, 64, seed=5)), text("Moderate this picture."))]
    params = {"temperature": 1.0, "seed": 3} | parameters
    result: dict[str, Any] = driver.call(
        "invoke", cls=cls, model=MODEL, credentials=creds(server, cls), messages=kw.pop("messages", messages),
        parameters=params, **kw,
    )  # fmt: skip
    return result


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
@pytest.mark.parametrize("cls", ["plugin", "stock"])
def test_dify_structured_output_validates(driver: DifyDriver, server: Server, cls: str, stream: bool) -> None:
    # Exactly what Dify's structured output sends: the schema wrapped, as a string parameter.
    wrapped = json.dumps({"schema": SCHEMA, "name": "llm_response"})
    params = {"response_format": "json_schema", "json_schema": wrapped, "max_tokens": token_budget(SCHEMA)}
    for seed in (1, 2, 3):
        result = invoke(driver, server, cls, params | {"seed": seed}, stream=stream)
        jsonschema.validate(json.loads(result["text"]), SCHEMA)


@pytest.mark.parametrize("cls", ["plugin", "stock"])
def test_a_bare_schema_pasted_into_the_parameter_works(driver: DifyDriver, server: Server, cls: str) -> None:
    params = {"response_format": "json_schema", "json_schema": json.dumps(SCHEMA), "max_tokens": token_budget(SCHEMA)}
    jsonschema.validate(json.loads(invoke(driver, server, cls, params)["text"]), SCHEMA)


def test_plugin_refuses_a_broken_schema_parameter_by_name(driver: DifyDriver, server: Server) -> None:
    with pytest.raises(DriverError) as err:
        invoke(driver, server, "plugin", {"response_format": "json_schema", "json_schema": "{not json"})
    assert "JSON Schema is not valid JSON" in err.value.message
    with pytest.raises(DriverError) as err:
        invoke(driver, server, "plugin", {"response_format": "json_schema", "json_schema": '{"oneOf": []}'})
    assert "oneOf" in err.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_forced_tool_calls_reassembled_by_dify(driver: DifyDriver, server: Server, stream: bool) -> None:
    """Dify's SDK matches streamed calls by id and appends id-less deltas to the last call: it must get back
    whole calls whose arguments validate."""
    for seed in (1, 2):
        params = {"tool_choice": "required", "max_tokens": 400, "seed": seed}
        result = invoke(driver, server, "plugin", params, tools=[TOOL], stream=stream)
        assert result["tool_calls"] and result["finish_reason"] in ("tool_calls", None)
        for call in result["tool_calls"]:
            assert call["id"].startswith("call_") and call["name"] == "lookup_order"
            jsonschema.validate(json.loads(call["arguments"]), TOOL["parameters"])


@pytest.mark.parametrize("cls", ["plugin", "stock"])
def test_tools_and_tool_history_reach_the_template(driver: DifyDriver, server: Server, cls: str) -> None:
    """An agent's second turn: the assistant's call and the tool's answer, rendered by the model's template
    (Qwen3-VL: a # Tools block in the system turn, <tool_call> and <tool_response> blocks)."""
    call = {"id": "call_1", "name": "lookup_order", "arguments": '{"order_id": "AB1234"}'}
    history = [
        user(text("Where is order AB1234?")),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "shipped on Monday", "tool_call_id": "call_1"},
    ]
    plain = invoke(driver, server, cls, {"max_tokens": 2}, messages=history[:1])
    with_tools = invoke(driver, server, cls, {"max_tokens": 2}, messages=history[:1], tools=[TOOL])
    full = invoke(driver, server, cls, {"max_tokens": 2}, messages=history, tools=[TOOL])
    tools_tokens = with_tools["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    assert tools_tokens > 40  # the tool's signature went into the prompt
    assert full["usage"]["prompt_tokens"] - with_tools["usage"]["prompt_tokens"] > 15  # the call and its response
