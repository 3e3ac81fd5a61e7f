"""Disconnects cancel generation, image URLs go through the fetch guard, metrics tell what happened."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.helpers import png_bytes
from tests.server_utils import MODEL, Server, image_message, running


class _PictureServer:
    """A loopback HTTP server that serves one PNG and counts every hit."""

    def __init__(self) -> None:
        self.hits = 0
        png = png_bytes(64, 64, seed=9)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def pictures() -> Iterator[_PictureServer]:
    server = _PictureServer()
    yield server
    server.close()


def test_loopback_image_urls_are_refused_without_a_single_hit(
    tiny_model: TinyFactory, pictures: _PictureServer
) -> None:
    p = pictures.port
    refused = [
        f"http://127.0.0.1:{p}/cat.png",
        f"http://localhost:{p}/cat.png",
        f"http://[::ffff:127.0.0.1]:{p}/cat.png",
        f"http://2130706433:{p}/cat.png",
        f"http://[::1]:{p}/cat.png",
    ]
    with running(tiny_model("qwen3_vl")) as s:
        for url in refused:
            r = s.post({"model": MODEL, "messages": image_message(url), "max_tokens": 1})
            assert r.status_code == 400, (url, r.text)
            assert r.json()["error"]["param"] == "messages[0].content[0].image_url"
    assert pictures.hits == 0


def test_allow_listed_host_is_fetched_once(tiny_model: TinyFactory, pictures: _PictureServer) -> None:
    with running(tiny_model("qwen3_vl"), allow_image_hosts=["127.0.0.1"]) as s:
        r = s.post(
            {"model": MODEL, "messages": image_message(f"http://127.0.0.1:{pictures.port}/cat.png"), "max_tokens": 1}
        )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 64  # 64×64 → raised to the 256×256 minimum
    assert pictures.hits == 1


def wait_for_cancel(server: Server, timeout: float = 10) -> None:
    """The server learns of a disconnect asynchronously: give it a moment to cancel."""
    deadline = time.monotonic() + timeout
    while server.metric("vlmbridge_cancelled_requests") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def test_client_disconnect_cancels_within_one_step(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen2")) as s:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 30000,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{s.v1}/chat/completions", json=body, timeout=60) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data:"):
                    seen += 1
                if seen >= 5:
                    break  # leaving the block closes the connection
        wait_for_cancel(s)
        assert s.metric("vlmbridge_cancelled_requests") == 1
        assert s.metric("vlmbridge_decode_steps_after_cancel") <= 1
        steps = s.metric("vlmbridge_decode_steps")
        time.sleep(0.5)
        assert s.metric("vlmbridge_decode_steps") == steps  # nothing is generating any more
        assert steps < 5000


def test_non_stream_disconnect_cancels_too(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen2")) as s:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 30000,
            "ignore_eos": True,
        }
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.v1}/chat/completions", json=body, timeout=1.0)
        wait_for_cancel(s)
        assert s.metric("vlmbridge_cancelled_requests") == 1
        assert s.metric("vlmbridge_decode_steps_after_cancel") <= 1


def test_metrics_count_requests_tokens_and_latency(tiny_model: TinyFactory) -> None:
    from tests.server_utils import data_url

    with running(tiny_model("qwen3_vl")) as s:
        ok = s.post({"model": MODEL, "messages": image_message(data_url(320, 240)), "max_tokens": 3})
        assert ok.status_code == 200
        assert s.post({"model": "x", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
        text = httpx.get(f"{s.base_url}/metrics").text
    assert 'vlmbridge_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'vlmbridge_requests_total{endpoint="/v1/chat/completions",status="404"} 1.0' in text
    assert 'vlmbridge_image_tokens_total{model="tiny"} 80.0' in text
    assert 'vlmbridge_completion_tokens_total{model="tiny"} 3.0' in text
    assert 'vlmbridge_time_to_first_token_seconds_count{model="tiny"} 1.0' in text
    assert 'vlmbridge_request_latency_seconds_count{endpoint="/v1/chat/completions"} 2.0' in text
    assert 'vlmbridge_model_ready{model="tiny"} 1.0' in text
    assert 'vlmbridge_queue_depth{model="tiny"} 0.0' in text
    assert 'vlmbridge_requests_in_flight{model="tiny"} 0.0' in text


def test_queue_full_is_429(tiny_model: TinyFactory) -> None:
    with running(tiny_model("qwen2"), max_queue=1, max_batch_size=1) as s:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 30000,
            "ignore_eos": True,
            "stream": True,
        }
        streams = []
        readers = []  # keep the line iterators alive: dropping one closes its connection
        try:
            for _ in range(2):  # one running, one waiting
                cm = httpx.stream("POST", f"{s.v1}/chat/completions", json=body, timeout=60)
                r = cm.__enter__()
                streams.append(cm)
                readers.append(r.iter_lines())
                next(readers[-1])
            rejected = s.post({**body, "stream": False})
            assert rejected.status_code == 429
            assert rejected.json()["error"]["type"] == "rate_limit_error"
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
        time.sleep(0.3)
        assert s.post({**body, "stream": False, "max_tokens": 2}, timeout=30).status_code == 200
