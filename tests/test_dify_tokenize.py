"""POST /v1/tokenize: the prompt count the Dify plugin budgets with, images included, equal to what generation uses."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.server_utils import MODEL, Server, data_url, image_message, running

KEY = {"Authorization": "Bearer tok-key"}


@pytest.fixture(scope="module")
def server(tiny_model: TinyFactory) -> Iterator[Server]:
    with running(tiny_model("qwen3_vl"), api_keys=["tok-key"], context_length=512) as s:
        yield s


def _count(server: Server, body: dict, path: str = "/v1/tokenize") -> httpx.Response:  # type: ignore[type-arg]
    return httpx.post(f"{server.base_url}{path}", json=body, headers=KEY, timeout=60)


def _prompt_tokens(server: Server, messages: list) -> int:  # type: ignore[type-arg]
    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
    response = server.post(body, headers=KEY)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def test_text_count_matches_generation(server: Server) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many tokens is this?"}]
    response = _count(server, {"model": MODEL, "messages": messages})
    assert response.status_code == 200, response.text
    body = response.json()
    count = _prompt_tokens(server, messages)
    assert body == {"model": MODEL, "count": count, "image_tokens": 0, "video_tokens": 0, "max_model_len": 512}


@pytest.mark.parametrize("detail", ["high", "low"])
def test_image_count_matches_generation(server: Server, detail: str) -> None:
    messages = image_message(data_url(320, 240, seed=5), "Describe it.", detail=detail)
    body = _count(server, {"messages": messages}).json()
    assert body["image_tokens"] == 80  # 320×240 → 10×8 merged patches; under both pixel budgets
    assert body["count"] == _prompt_tokens(server, messages)
    text_only = _count(server, {"messages": [{"role": "user", "content": "Describe it."}]}).json()["count"]
    assert body["count"] - text_only >= 80


def test_max_pixels_shrinks_the_count(server: Server) -> None:
    messages = image_message(data_url(640, 480, seed=6), "?")
    full = _count(server, {"messages": messages}).json()["image_tokens"]
    small = _count(server, {"messages": messages, "max_pixels": 320 * 240}).json()["image_tokens"]
    assert small < full


def test_vllm_path_and_errors(server: Server) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert _count(server, {"messages": messages}, path="/tokenize").status_code == 200

    response = httpx.post(f"{server.v1}/tokenize", json={"messages": messages}, timeout=60)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"

    response = _count(server, {"model": "other", "messages": messages})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"

    response = _count(server, {"messages": messages, "add_special_tokens": False})
    assert response.status_code == 400 and "add_special_tokens" in response.json()["error"]["message"]

    response = _count(server, {"messages": [{"role": "user", "content": "word " * 600}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
