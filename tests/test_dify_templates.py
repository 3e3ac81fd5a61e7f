"""The four Dify app templates: the structure Dify's importer needs, vision on an image variable, JSON-asking prompts
that get an answer from the server through the plugin, and `vlmbridge dify template` filling in provider and model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TinyFactory
from tests.dify_support import DifyDriver, dify_python, image_b64, run_cli, text
from tests.helpers import png_bytes
from tests.server_utils import MODEL, Server, running
from tests.structured_cases import token_budget
from vlmbridge.integrations.dify import BUILTIN_PROVIDER, PLUGIN_PROVIDER, TEMPLATE_MODEL, render_template, templates
from vlmbridge.server.structured import check_schema

NAMES = ["homework-intake", "product-tagging", "ugc-moderation", "visual-customer-service"]
REFERENCE = re.compile(r"\{\{#([\w.-]+)#\}\}")
SAMPLE_INPUTS = {"sys.query": "Here is the photo.", "start.notes": "cotton, size M", "start.context": "forum"}


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(next(t.path for t in templates() if t.name == name).read_text())
    return data


def nodes_of(dsl: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [n for n in dsl["workflow"]["graph"]["nodes"] if n["data"]["type"] == kind]


def test_there_are_four_templates() -> None:
    assert sorted(t.name for t in templates()) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_template_has_the_structure_difys_importer_needs(name: str) -> None:
    dsl = load(name)
    assert dsl["kind"] == "app" and re.fullmatch(r"0\.\d+\.\d+", str(dsl["version"]))
    mode = dsl["app"]["mode"]
    assert mode in ("advanced-chat", "workflow") and dsl["app"]["name"] and dsl["dependencies"] == []
    graph = dsl["workflow"]["graph"]
    ids = [n["id"] for n in graph["nodes"]]
    kinds = {n["id"]: n["data"]["type"] for n in graph["nodes"]}
    assert len(ids) == len(set(ids)) and all(n["type"] == "custom" and "position" in n for n in graph["nodes"])
    (start,) = nodes_of(dsl, "start")
    (llm,) = nodes_of(dsl, "llm")
    lasts = nodes_of(dsl, "answer" if mode == "advanced-chat" else "end")

    # Edges connect existing nodes (if-else branches by case id); start → llm first; every node is reached, and
    # every path ends in an answer/end node.
    for e in graph["edges"]:
        assert e["source"] in ids and e["target"] in ids and e["targetHandle"] == "target"
        assert e["sourceHandle"] == "source" or (
            kinds[e["source"]] == "if-else" and e["sourceHandle"] in ("true", "false")
        )
    links = {(e["source"], e["target"]) for e in graph["edges"]}
    assert {t for s, t in links if s == start["id"]} == {llm["id"]}
    reached, frontier = {start["id"]}, [start["id"]]
    while frontier:
        here = frontier.pop()
        for s, t in links:
            if s == here and t not in reached:
                reached.add(t)
                frontier.append(t)
    assert reached == set(ids)
    assert {s for s, _ in links} == set(ids) - {n["id"] for n in lasts}

    # The vlmbridge plugin's model, chat mode, vision on an image-carrying variable.
    model = llm["data"]["model"]
    assert (model["provider"], model["name"], model["mode"]) == (PLUGIN_PROVIDER, TEMPLATE_MODEL, "chat")
    vision = llm["data"]["vision"]
    assert vision["enabled"] is True and vision["configs"]["detail"] in ("high", "low")
    selector = vision["configs"]["variable_selector"]
    if mode == "advanced-chat":
        upload = dsl["workflow"]["features"]["file_upload"]
        assert selector == ["sys", "files"] and upload["enabled"] is True and "image" in upload["allowed_file_types"]
    else:
        assert selector[0] == start["id"]
        (var,) = [v for v in start["data"]["variables"] if v["variable"] == selector[1]]
        assert var["type"] in ("file", "file-list") and var["required"]
        assert var["allowed_file_types"] == (["image", "video"] if name == "ugc-moderation" else ["image"])

    # The prompt asks for JSON; every {{#node.var#}} reference names something that exists.
    prompts = [p["text"] for p in llm["data"]["prompt_template"]]
    assert any("JSON" in p for p in prompts)
    fields = llm["data"]["structured_output"]["schema"]["properties"]
    variables = {f"{start['id']}.{v['variable']}" for v in start["data"]["variables"]} | {
        f"{llm['id']}.text",
        f"{llm['id']}.structured_output",
        *(f"{llm['id']}.structured_output.{f}" for f in fields),
    }
    variables |= {f"{n['id']}.body" for n in nodes_of(dsl, "http-request")}
    if mode == "advanced-chat":
        variables |= {"sys.query", "sys.files"}
    texts = [*prompts, *(n["data"]["answer"] for n in lasts if mode == "advanced-chat")]
    texts += [n["data"]["url"] for n in nodes_of(dsl, "http-request")]
    memory = llm["data"].get("memory") or {}
    for ref in REFERENCE.findall(" ".join([*texts, memory.get("query_prompt_template", "")])):
        assert ref in variables, f"{name}: {{{{#{ref}#}}}} refers to nothing"
    for node in nodes_of(dsl, "if-else"):
        for case in node["data"]["cases"]:
            for cond in case["conditions"]:
                assert ".".join(cond["variable_selector"]) in variables
    if mode == "workflow":
        assert [o["value_selector"] for (last,) in [lasts] for o in last["data"]["outputs"]] == [
            [llm["id"], "structured_output"]
        ]


# What each template's structured output carries (the field lists).
FIELDS = {
    "product-tagging": {"title", "tags", "category", "style"},
    "ugc-moderation": {"verdict", "categories", "confidence", "reason"},
    "visual-customer-service": {"answer", "needs_human", "order_id"},
    "homework-intake": {"subject", "question_text", "student_answer", "grade_level"},
}


def schema_of(name: str) -> dict[str, Any]:
    (llm,) = nodes_of(load(name), "llm")
    assert llm["data"]["structured_output_enabled"] is True
    schema: dict[str, Any] = llm["data"]["structured_output"]["schema"]
    return schema


def _bounded(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind == "object":
        return all(_bounded(s) for s in schema["properties"].values())
    if kind == "array":
        return "maxItems" in schema and _bounded(schema["items"])
    if kind == "string":
        return "maxLength" in schema or "enum" in schema or "pattern" in schema
    if kind in ("number", "integer"):
        return "minimum" in schema and "maximum" in schema
    return kind == "boolean"


@pytest.mark.parametrize("name", NAMES)
def test_template_structured_output_is_bounded_and_supported(name: str) -> None:
    schema = schema_of(name)
    assert set(schema["properties"]) == set(schema["required"]) == FIELDS[name]
    assert schema["additionalProperties"] is False and _bounded(schema)
    check_schema(schema, "structured_output")  # the server takes it as it is


def test_support_template_looks_the_order_up_from_the_structured_output() -> None:
    dsl = load("visual-customer-service")
    (lookup,) = nodes_of(dsl, "http-request")
    assert "{{#assistant.structured_output.order_id#}}" in lookup["data"]["url"]
    (check,) = nodes_of(dsl, "if-else")
    (case,) = check["data"]["cases"]
    assert case["conditions"][0]["variable_selector"] == ["assistant", "structured_output", "order_id"]
    edges = {(e["source"], e["sourceHandle"], e["target"]) for e in dsl["workflow"]["graph"]["edges"]}
    assert {("has_order", "true", "order_lookup"), ("has_order", "false", "answer")} <= edges


@pytest.mark.parametrize("name", NAMES)
def test_template_renders_with_provider_and_model(name: str) -> None:
    original = load(name)
    rendered = yaml.safe_load(render_template(name, "Qwen2.5-VL 7B: custom", "openai_api_compatible"))
    for dsl in (original, rendered):
        for node in nodes_of(dsl, "llm"):
            model = node["data"]["model"]
            assert model["provider"] in (PLUGIN_PROVIDER, BUILTIN_PROVIDER)
            if dsl is rendered:
                assert (model["provider"], model["name"]) == (BUILTIN_PROVIDER, "Qwen2.5-VL 7B: custom")
            model["provider"], model["name"] = "-", "-"
    assert rendered == original  # nothing else changed


def test_template_command(tmp_path: Path) -> None:
    listed = run_cli("dify", "template", "list")
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == NAMES

    out = tmp_path / "apps" / "tagging.yml"
    result = run_cli("dify", "template", "product-tagging", "--model", "my-vl", "--out", str(out))
    assert result.returncode == 0, result.stderr
    (llm,) = nodes_of(yaml.safe_load(out.read_text()), "llm")
    assert (llm["data"]["model"]["provider"], llm["data"]["model"]["name"]) == (PLUGIN_PROVIDER, "my-vl")

    printed = run_cli("dify", "template", "ugc-moderation", "--model", "m", "--provider", "acme/vl/vl")
    assert yaml.safe_load(printed.stdout)["workflow"]["graph"]["nodes"][1]["data"]["model"]["provider"] == "acme/vl/vl"

    for args, needle in (
        (["nope", "--model", "m"], "no template 'nope'; there are: homework-intake, product-tagging"),
        (["product-tagging"], "--model is required"),
        (["product-tagging", "--model", "m", "--provider", "Bad Provider"], "unknown provider"),
    ):
        failed = run_cli("dify", "template", *args)
        assert failed.returncode == 1 and needle in failed.stderr and "Traceback" not in failed.stderr


# --- each template's prompt, with a picture, through the plugin ----------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl")) as s:
        yield s


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DifyDriver]:
    d = DifyDriver(dify_python(), tmp_path_factory.mktemp("dify-templates"))
    yield d
    d.close()


def messages_for(dsl: dict[str, Any], png: bytes | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What Dify sends for the LLM node: its prompts with inputs filled in, the picture before the last user text."""
    (llm,) = nodes_of(dsl, "llm")

    def fill(template: str) -> str:
        return REFERENCE.sub(lambda m: SAMPLE_INPUTS.get(m.group(1), ""), template)

    messages = [{"role": p["role"], "content": fill(p["text"])} for p in llm["data"]["prompt_template"]]
    if query := (llm["data"].get("memory") or {}).get("query_prompt_template"):
        messages.append({"role": "user", "content": fill(query)})
    last = messages[-1]
    assert last["role"] == "user"
    detail = llm["data"]["vision"]["configs"]["detail"]
    last["content"] = [image_b64(png, detail), text(last["content"])] if png else [text(last["content"])]
    params = dict(llm["data"]["model"]["completion_params"])
    params["max_tokens"] = min(int(params.get("max_tokens", 16)), 16)  # the tiny model's words are noise anyway
    return messages, params


@pytest.mark.parametrize("name", NAMES)
def test_template_prompt_with_a_picture_gets_an_answer(driver: DifyDriver, server: Server, name: str) -> None:
    dsl = load(name)
    png = png_bytes(320, 240, seed=31)
    credentials = {"endpoint_url": server.v1, "mode": "chat", "context_size": "32768"}
    answers = {}
    for picture in (png, None):
        messages, params = messages_for(dsl, picture)
        before = server.metric("vlmbridge_image_tokens_total")
        answers[picture is not None] = driver.call(
            "invoke", cls="plugin", model=MODEL, credentials=credentials, messages=messages, parameters=params
        )
        assert server.metric("vlmbridge_image_tokens_total") - before == (80 if picture else 0)
    assert answers[True]["usage"]["completion_tokens"] >= 1
    assert answers[True]["usage"]["prompt_tokens"] - answers[False]["usage"]["prompt_tokens"] >= 80


@pytest.mark.parametrize("name", NAMES)
def test_template_structured_output_validates_through_the_plugin(driver: DifyDriver, server: Server, name: str) -> None:
    """What Dify sends for the LLM node with Structured Output on: the prompts, the picture, and the schema as
    `json_schema` = {"schema": S, "name": "llm_response"}; the answer is the node's structured_output."""
    import json

    import jsonschema

    schema = schema_of(name)
    messages, params = messages_for(load(name), png_bytes(160, 120, seed=7))
    params |= {
        "response_format": "json_schema", "json_schema": json.dumps({"schema": schema, "name": "llm_response"}),
        "max_tokens": token_budget(schema), "temperature": 1.0, "seed": 5,
    }  # fmt: skip
    # The schema's worst case (every character an escape) is above Dify's default 4096 bound for max tokens.
    credentials = {"endpoint_url": server.v1, "mode": "chat", "context_size": "32768", "max_tokens_to_sample": "8192"}
    answer = driver.call(
        "invoke", cls="plugin", model=MODEL, credentials=credentials, messages=messages, parameters=params
    )
    jsonschema.validate(json.loads(answer["text"]), schema)
