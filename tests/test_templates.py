"""The tiny checkpoints' chat templates render conversations exactly like the official templates.

Expected strings are the official templates' renderings of the same conversations (Qwen/Qwen2-VL-7B-Instruct,
Qwen/Qwen3-VL-8B-Instruct and Qwen/Qwen2.5-7B-Instruct), recorded with transformers 5.24.
"""

from __future__ import annotations

from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from vlmbridge.tiny.builder import chat_template_for

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
IMAGE_Q = [{"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "text", "text": "Describe."}]}]
MIXED = [
    {"role": "system", "content": "SYS"},
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"image_url": {"url": "u"}},
            {"type": "video"},
            {"type": "text", "text": "Q"},
        ],
    },
]
TOOL_ROUND = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny"},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
TWO_CALLS = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        ],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
]
TWO_CALLS_RENDERED = (
    f"<|im_start|>assistant\nChecking.\n{CALL % 'Paris'}\n{CALL % 'Oslo'}<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)
THINK = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)
PADS = "<|vision_start|><|image_pad|><|vision_end|>"

CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], str]] = [
    (
        "qwen2_vl",
        [{"role": "user", "content": "Hi"}],
        {"add_generation_prompt": True},
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (
        "qwen2_vl",
        IMAGE_Q,
        {"add_generation_prompt": True},
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{PADS}Describe.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (
        "qwen2_vl",
        MIXED,
        {"add_generation_prompt": True, "add_vision_id": True},
        f"<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nPicture 1: {PADS}Picture 2: {PADS}"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen2_vl",
        TOOL_ROUND,
        {"add_generation_prompt": True},
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen3_vl",
        [{"role": "user", "content": "Hi"}],
        {"add_generation_prompt": True},
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen3_vl",
        IMAGE_Q,
        {"add_generation_prompt": True},
        f"<|im_start|>user\n{PADS}Describe.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen3_vl",
        MIXED,
        {"add_generation_prompt": True, "add_vision_id": True},
        f"<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nPicture 1: {PADS}Picture 2: {PADS}"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen3_vl",
        TOOL_ROUND,
        {"add_generation_prompt": True},
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    ),
    (  # several calls with text before them, and their responses in one user turn (the official templates' rules)
        "qwen3_vl",
        TWO_CALLS,
        {"add_generation_prompt": True},
        f"<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n{TWO_CALLS_RENDERED}",
    ),
    (
        "qwen3_vl",
        THINK,
        {},
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\nR1\n</think>\n\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    ),
    (
        "qwen3_vl",
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}],
        {"add_generation_prompt": True, "tools": TOOLS},
        f"<|im_start|>system\nSYS\n\n{TOOLS_BLOCK}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen2",
        [{"role": "user", "content": "Hi"}],
        {"add_generation_prompt": True},
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen2",
        [{"role": "user", "content": "Hi"}],
        {"add_generation_prompt": True, "tools": TOOLS},
        f"<|im_start|>system\n{QWEN_SYSTEM}\n\n{TOOLS_BLOCK}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen2",
        TOOL_ROUND,
        {"add_generation_prompt": True},
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (
        "qwen2",
        TWO_CALLS,
        {"add_generation_prompt": True},
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        f"{TWO_CALLS_RENDERED}",
    ),
]


@pytest.mark.parametrize(("family", "messages", "kwargs", "expected"), CASES)
def test_template_renders_like_official(
    family: str, messages: list[dict[str, Any]], kwargs: dict[str, Any], expected: str
) -> None:
    kwargs = dict(kwargs)
    tools = kwargs.pop("tools", None)
    rendered = render_jinja_template([messages], chat_template=chat_template_for(family), tools=tools, **kwargs)[0][0]
    assert rendered == expected


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe"])
def test_sibling_families_share_their_template(family: str) -> None:
    sibling = {"qwen2_5_vl": "qwen2_vl", "qwen3_vl_moe": "qwen3_vl"}[family]
    assert chat_template_for(family) == chat_template_for(sibling)


THINKING_CASES: list[tuple[list[dict[str, Any]], dict[str, Any], str]] = [
    (
        [{"role": "user", "content": "Hi"}],
        {"add_generation_prompt": True},
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n",
    ),
    (
        THINK,
        {},
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n",
    ),
    (
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": [{"type": "text", "text": "A1"}]}],
        {"add_generation_prompt": True},
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA1<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
    ),
]


@pytest.mark.parametrize(("messages", "kwargs", "expected"), THINKING_CASES)
def test_thinking_template_renders_like_official(
    messages: list[dict[str, Any]], kwargs: dict[str, Any], expected: str
) -> None:
    template = chat_template_for("qwen3_vl", "thinking")
    assert render_jinja_template([messages], chat_template=template, **kwargs)[0][0] == expected


def test_history_tool_calls_reach_the_template_with_object_arguments() -> None:
    """OpenAI sends arguments as a JSON string; the templates write `arguments | tojson`, so the prompt builder
    passes an object (as vLLM does): the rendering is the one above, not a quoted string."""
    from vlmbridge.engine.transformers.prompt import _template_call
    from vlmbridge.engine.types import ToolCall

    call = _template_call(ToolCall("call_1", "get_weather", '{"city": "Paris"}'))
    assert call == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    messages = [TOOL_ROUND[0], {"role": "assistant", "content": "", "tool_calls": [call]}, TOOL_ROUND[2]]
    for family in ("qwen3_vl", "qwen2"):
        rendered = render_jinja_template(
            [messages], chat_template=chat_template_for(family), add_generation_prompt=True
        )
        assert (
            rendered[0][0]
            == render_jinja_template([TOOL_ROUND], chat_template=chat_template_for(family), add_generation_prompt=True)[
                0
            ][0]
        )
