"""The models file and NAME=PATH arguments: entries take exactly ModelSettings' field names; unknown keys and bad
values are refused at start-up with the entry and key named; a broken folder is not a start-up error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TinyFactory
from tests.test_cli import assert_one_clear_line, vlmbridge
from vlmbridge.errors import ModelsFileError
from vlmbridge.pool import read_models_file, specs_from_pairs
from vlmbridge.pool.spec import parse_keep_alive
from vlmbridge.settings import Settings


def write(tmp: Path, text: str) -> Path:
    file = tmp / "models.yaml"
    file.write_text(text)
    return file


def test_entries_take_model_settings_fields_and_the_server_settings_as_defaults(tmp_path: Path) -> None:
    file = write(
        tmp_path,
        """
models:
  - name: moderation
    path: small
    aliases: [mod, guard]
    load: startup
    keep_alive: 5m
    pinned: true
    max_pixels: 401408
    context_length: 4096
  - name: followup
    path: /models/text
""",
    )
    first, second = read_models_file(Settings(max_batch_size=3, dtype="fp32"), file)
    assert first.name == "moderation" and first.names == ("moderation", "mod", "guard")
    assert first.path == tmp_path / "small"  # relative to the file's folder
    assert (first.load, first.keep_alive, first.pinned) == ("startup", 300.0, True)
    assert first.settings.max_pixels == 401408 and first.settings.context_length == 4096
    assert first.settings.max_batch_size == 3 and first.settings.dtype == "fp32"  # the server's own settings
    assert first.settings.served_model_name == "moderation" and first.doctor
    assert (second.load, second.keep_alive, second.pinned) == ("on-demand", None, False)  # the defaults


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ("max_pixel: 5", ["entry 1 ('a')", "unknown key 'max_pixel'"]),
        ("model: /x", ["entry 1 ('a')", "'model'", "`path`"]),
        ("max_batch_size: 0", ["entry 1 ('a')", "'max_batch_size'", "greater than or equal to 1"]),
        ("dtype: float7", ["entry 1 ('a')", "'dtype'"]),
        ("keep_alive: soon", ["entry 1 ('a')", "keep_alive 'soon'"]),
        ("keep_alive: -5", ["entry 1 ('a')", "-1"]),
        ("load: lazy", ["entry 1 ('a')", "`load`"]),
        ("pinned: maybe", ["entry 1 ('a')", "`pinned`"]),
        ("aliases: b", ["entry 1 ('a')", "`aliases`"]),
    ],
)
def test_unknown_keys_and_bad_values_name_the_entry_and_the_key(tmp_path: Path, entry: str, needles: list[str]) -> None:
    file = write(tmp_path, f"models:\n  - name: a\n    path: /x\n    {entry}\n")
    with pytest.raises(ModelsFileError) as caught:
        read_models_file(Settings(), file)
    for needle in needles:
        assert needle in str(caught.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models: []\n", "no models"),
        ("model:\n  - name: a\n", "`models:`"),
        ("models:\n  - path: /x\n", "`name`"),
        ("models:\n  - name: a\n", "`path`"),
        ("models:\n  - {name: a, path: /x}\n  - {name: b, path: /y, aliases: [a]}\n", "'a' is used by both"),
        ("models: [", "not valid YAML"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ModelsFileError, match=None) as caught:
        read_models_file(Settings(), write(tmp_path, text))
    assert needle in str(caught.value)


def test_keep_alive_forms() -> None:
    assert parse_keep_alive(-1) is None and parse_keep_alive("-1") is None
    assert parse_keep_alive(0) == 0.0 and parse_keep_alive("30s") == 30.0
    assert parse_keep_alive("5m") == 300.0 and parse_keep_alive("1h") == 3600.0 and parse_keep_alive(2.5) == 2.5
    with pytest.raises(ValueError):
        parse_keep_alive(True)


def test_name_path_pairs() -> None:
    a, b = specs_from_pairs(Settings(), ["a=/models/x", "b=/models/y"])
    assert (a.name, a.path, a.load, b.name) == ("a", Path("/models/x"), "on-demand", "b")
    with pytest.raises(ModelsFileError, match="NAME=PATH"):
        specs_from_pairs(Settings(), ["a="])


def test_memory_budget_sizes() -> None:
    assert Settings(memory_budget="2GiB").memory_budget == 2 << 30
    assert Settings(memory_budget="512MiB").memory_budget == 512 << 20
    assert Settings(memory_budget=3 << 30).memory_budget == 3 << 30


def test_serve_refuses_a_bad_models_file_in_one_line(tmp_path: Path) -> None:
    file = write(tmp_path, "models:\n  - name: a\n    path: /x\n    max_pixel: 5\n")
    assert_one_clear_line(vlmbridge("serve", "--models", str(file)), "entry 1 ('a')", "unknown key 'max_pixel'")
    assert_one_clear_line(vlmbridge("serve", "a=/x", "--models", str(file)), "not both")


def test_serve_name_path_pairs(tiny_model: TinyFactory, tmp_path: Path) -> None:
    from tests.test_dify_deploy import free_port

    port = free_port()
    args = ["serve", f"vl={tiny_model('qwen3_vl')}", f"text={tiny_model('qwen2')}", "--port", str(port)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "vlmbridge", *args], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # nothing loads at start-up: healthy as soon as it listens
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                health = httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["models"] == {"vl": "unloaded", "text": "unloaded"}
        body = {"model": "text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).status_code == 200
        assert httpx.get(f"{base}/health").json()["models"] == {"vl": "unloaded", "text": "ready"}
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_each_entry_admits_by_its_own_image_count_and_pixel_budget(tiny_model: TinyFactory, tmp_path: Path) -> None:
    """The front converts a request with its model's settings: an entry's max_images and max_pixels (what its
    engine reserved for) hold even where the server's own are wider."""
    from tests.server_utils import data_url, running_models

    folder = tiny_model("qwen3_vl")
    file = write(tmp_path, f"""models:
  - {{name: wide, path: {folder}}}
  - {{name: narrow, path: {folder}, max_images: 1, max_pixels: 16384}}
""")  # fmt: skip

    def message(pictures: int, seed: int = 0) -> list[dict[str, object]]:
        parts: list[dict[str, object]] = [{"type": "image_url", "image_url": {"url": data_url(seed=seed + s)}}
                                          for s in range(pictures)]  # fmt: skip
        return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}]

    def first_token(name: str, seed: int) -> object:
        body = {"model": name, "messages": message(1, seed), "max_tokens": 1, "logprobs": True, "top_logprobs": 5}
        return s.post(body).json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]

    with running_models(file) as s:
        tokens = {}
        for name in ("wide", "narrow"):
            r = s.post({"model": name, "messages": message(1), "max_tokens": 1})
            assert r.status_code == 200, r.text
            tokens[name] = r.json()["usage"]["prompt_tokens_details"]["image_tokens"]
        assert tokens["narrow"] < tokens["wide"], tokens  # 16384 pixels against the server's default budget
        assert first_token("narrow", 0) != first_token("narrow", 1)  # at that budget the pixels still reach it
        assert s.post({"model": "wide", "messages": message(2), "max_tokens": 1}).status_code == 200
        for path, body in (("/v1/chat/completions", {"max_tokens": 1}), ("/v1/tokenize", {})):
            r = httpx.post(f"{s.base_url}{path}", json={"model": "narrow", "messages": message(2), **body}, timeout=60)
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "too_many_images" and "at most 1" in error["message"]
        models = {m["id"]: m for m in httpx.get(f"{s.base_url}/v1/models", timeout=10).json()["data"]}
        assert [models[n]["vlmbridge"]["max_images"] for n in ("wide", "narrow")] == [8, 1]
