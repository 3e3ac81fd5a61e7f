"""The engine contract on its own: a scripted backend (not the transformers one) plugs into the real server through
the contract alone — its token ids come out as text through the front's output pipeline, stop strings make the front
abort it, and its stats reach /metrics. A unit test of the contract, not proof that a model works."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.server_utils import MODEL, Server, running
from vlmbridge.engine.base import EngineInfo, EngineState, PromptStats, RequestStream
from vlmbridge.engine.types import (
    CacheCounters,
    ChatMessage,
    EngineOutput,
    EngineStats,
    GenerationRequest,
    PromptInfo,
    TokenChoice,
)
from vlmbridge.output.client import load_text_tools
from vlmbridge.output.pipeline import TextTools
from vlmbridge.server.state import EngineSlot

SCRIPT = "Hello from the scripted engine"


class ScriptedEngine:
    """Answers every request with SCRIPT's tokens, one per output, on a thread of its own."""

    prepares_in_process = True

    def __init__(self, tools: TextTools) -> None:
        self.ids = tools.tokenizer.encode(SCRIPT, add_special_tokens=False)
        self.aborted: list[str] = []
        self._abort = threading.Event()

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("scripted", "/nowhere", "scripted", "Script", "text", 4096, "none", "cpu")

    @property
    def state(self) -> EngineState:
        return "ready"

    @property
    def state_reason(self) -> str:
        return "ready"

    def start(self, *, warm_up: bool = True) -> None:
        pass

    def generate(self, request: GenerationRequest) -> RequestStream[EngineOutput]:
        stream: RequestStream[EngineOutput] = RequestStream(request.request_id)
        self._abort.clear()

        def run() -> None:
            prompt = PromptInfo(prompt_tokens=7, image_tokens=3, cached_tokens=2)
            for i, token in enumerate(self.ids):
                if self._abort.wait(0.01):  # the front said stop
                    stream.push(EngineOutput(finish_reason="abort"), last=True)
                    return
                last = i == len(self.ids) - 1
                stream.push(
                    EngineOutput(
                        token_ids=(token,),
                        choices=(TokenChoice(token, -0.5, ((token, -0.5),)),),
                        finish_reason="stop" if last else None,
                        prompt=prompt if i == 0 else None,
                    ),
                    last=last,
                )

        threading.Thread(target=run, daemon=True).start()
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._abort.set()

    def count_prompt(self, messages: tuple[ChatMessage, ...]) -> PromptStats:
        return PromptStats(7, 3)

    def queue_depth(self) -> int:
        return 0

    def stats(self) -> EngineStats:
        return EngineStats(decode_steps=42, running=1, caches={"scripted": CacheCounters(hits=5, entries=1)})

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def scripted(tiny_model: TinyFactory) -> Iterator[tuple[Server, ScriptedEngine]]:
    folder: Path = tiny_model("qwen2")  # only its tokenizer: the front's text tools
    tools = load_text_tools(folder, {})
    engine = ScriptedEngine(tools)
    slot = EngineSlot(MODEL, engine=engine, tools=lambda: tools)
    with running(folder, slot=slot) as server:
        yield server, engine


def test_a_scripted_backend_serves_through_the_contract(scripted: tuple[Server, ScriptedEngine]) -> None:
    server, _ = scripted
    reply = server.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1
    )
    assert reply.choices[0].message.content == SCRIPT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens == 7
    assert reply.usage.completion_tokens == len(scripted[1].ids)
    assert reply.usage.prompt_tokens_details is not None and reply.usage.prompt_tokens_details.cached_tokens == 2
    assert "".join(t.token for t in reply.choices[0].logprobs.content) == SCRIPT  # type: ignore[union-attr]


def test_stop_strings_are_matched_in_the_front_which_aborts_the_backend(
    scripted: tuple[Server, ScriptedEngine],
) -> None:
    server, engine = scripted
    stream = server.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stop=[" the"], stream=True
    )
    text, finish, request_id = "", None, None
    for event in stream:
        request_id = event.id
        if event.choices:
            text += event.choices[0].delta.content or ""
            finish = event.choices[0].finish_reason or finish
    assert (text, finish) == ("Hello from", "stop")
    assert request_id in engine.aborted


def test_the_backends_stats_reach_metrics(scripted: tuple[Server, ScriptedEngine]) -> None:
    server, _ = scripted
    text = httpx.get(f"{server.base_url}/metrics").text
    assert 'vlmbridge_decode_steps{model="tiny"} 42.0' in text
    assert 'vlmbridge_running_requests{model="tiny"} 1.0' in text
    assert 'vlmbridge_cache{cache="scripted",model="tiny",stat="hits"} 5.0' in text
