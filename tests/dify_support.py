"""Driving Dify's plugin SDK (dify_plugin 0.7.4) from the tests, in its own process and venv.

Importing dify_plugin monkey-patches the interpreter with gevent, so the SDK never runs inside pytest: `DifyDriver`
starts this same file under the dify venv's python (`VLMBRIDGE_DIFY_PYTHON`, set by `./vb test`) and exchanges one
JSON line per call with it. Run as a script, this file is that driver; it imports nothing from vlmbridge or pytest.

    python tests/dify_support.py serve PLUGIN_DIR       JSON requests on stdin, one answer line per request
    python tests/dify_support.py load-folder DIR        load DIR with the SDK's plugin loader, print what it found
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "integrations" / "dify"
PYTHON_ENV = "VLMBRIDGE_DIFY_PYTHON"
_ANSWER = b"@@dify-driver@@ "  # marks our answer lines; anything else on stdout is the SDK talking


# ===================================================================================================================
# pytest side (vlmbridge's venv)
# ===================================================================================================================
class DriverError(Exception):
    """An exception raised inside the driver: its class name, MRO names and message."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(f"{info['type']}: {info['message']}")
        self.type: str = info["type"]
        self.mro: list[str] = info["mro"]
        self.message: str = info["message"]


def dify_python() -> str:
    """The dify venv's python, or a pytest skip that says how to get one."""
    import pytest

    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(
            f"{PYTHON_ENV} is not set: run the tests through ./vb test, which creates .venv-dify with the "
            "plugin's requirements (dify_plugin==0.7.4)"
        )
    assert Path(python).is_file(), f"{PYTHON_ENV}={python} does not exist; rerun ./vb test to recreate the venv"
    return python


def driver_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ inside integrations/dify (it would end up in packages)
        NO_PROXY="127.0.0.1,localhost",
        TIKTOKEN_CACHE_DIR=str(tmp / "tiktoken"),  # empty: any tiktoken use fails at once instead of downloading
    )
    return env


class DifyDriver:
    """One long-lived driver process; `call(op, **args)` returns its result or raises DriverError."""

    def __init__(self, python: str, tmp: Path, plugin_dir: Path = PLUGIN_DIR) -> None:
        import subprocess

        tmp.mkdir(parents=True, exist_ok=True)
        self._stderr = (tmp / "driver.stderr").open("w+b")
        self.proc = subprocess.Popen(
            [python, __file__, "serve", str(plugin_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=tmp,  # DifyPluginEnv reads ./.env: keep it away from any developer's file
            env=driver_env(tmp),
        )
        self._buffer = b""

    def call(self, op: str, timeout: float = 180.0, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        answer = json.loads(self._read_answer(timeout))
        if not answer["ok"]:
            raise DriverError(answer["error"])
        return answer["result"]

    def _read_answer(self, timeout: float) -> bytes:
        import selectors
        import time

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    if line.startswith(_ANSWER):
                        return line[len(_ANSWER) :]
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"the dify driver did not answer within {timeout}s{self.stderr_tail()}")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the dify driver exited (rc={self.proc.wait()}){self.stderr_tail()}")
                self._buffer += chunk

    def stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return "\n--- driver stderr ---\n" + self._stderr.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError, ValueError):
                self.call("exit", timeout=10)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


def load_folder(python: str, folder: Path, tmp: Path) -> dict[str, Any]:
    """Load a plugin folder with the SDK's own loader in a fresh process (it chdirs and fills sys.modules)."""
    import subprocess

    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [python, __file__, "load-folder", str(folder)],
        capture_output=True,
        env=driver_env(tmp),
        timeout=120,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_ANSWER)]
    assert proc.returncode == 0 and lines, proc.stderr.decode(errors="replace")[-4000:]
    answer = json.loads(lines[-1][len(_ANSWER) :])
    if not answer["ok"]:
        raise DriverError(answer["error"])
    result: dict[str, Any] = answer["result"]
    return result


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    """`vlmbridge ARGS` in a real subprocess (a CompletedProcess with text output)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "vlmbridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def text(data: str) -> dict[str, Any]:
    return {"text": data}


def image_b64(png: bytes, detail: str = "high") -> dict[str, Any]:
    import base64

    return {"image": {"base64": base64.b64encode(png).decode(), "mime_type": "image/png", "detail": detail}}


def image_url(url: str, detail: str = "high") -> dict[str, Any]:
    return {"image": {"url": url, "mime_type": "image/png", "detail": detail}}


def video_b64(data: bytes, mime_type: str = "video/mp4") -> dict[str, Any]:
    import base64

    return {"video": {"base64": base64.b64encode(data).decode(), "mime_type": mime_type}}


def video_url(url: str, mime_type: str = "video/mp4") -> dict[str, Any]:
    return {"video": {"url": url, "mime_type": mime_type}}


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    """A user message; images first, as Dify orders them."""
    return {"role": "user", "content": list(parts)}


class ImageHost:
    """A loopback HTTP server handing out PNGs, like Dify's file server when MULTIMODAL_SEND_FORMAT=url."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        files: dict[str, bytes] = {}
        self.files = files
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                body = files.get(self.path.split("?", 1)[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/png" if body is not None else "text/plain")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, name: str, data: bytes) -> str:
        self.files[f"/files/{name}"] = data
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/files/{name}?timestamp=1&sign=test"  # Dify's signed file-preview shape

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ===================================================================================================================
# driver side (the dify venv): everything below runs only under `python tests/dify_support.py ...`
# ===================================================================================================================
def _answer(payload: dict[str, Any]) -> None:
    os.write(1, _ANSWER + json.dumps(payload, default=str).encode() + b"\n")


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(getattr(exc, "description", None) or exc),
    }


def _stdin_lines() -> Iterator[bytes]:
    # Plain reads on fd 0: gevent replaces sys.stdin, and nothing else runs while the driver waits.
    buffer = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


def _builtin_provider_class(base: Any) -> Any:
    """The SDK's OpenAI-compatible class as Dify's built-in provider (langgenius openai_api_compatible) extends it
    for structured output: with `structured_output_support: supported` in the credentials, the schema gains a
    `response_format` rule (text, json_object, json_schema) and a `json_schema` rule; the request is the SDK's."""
    from dify_plugin.entities.model import DefaultParameterName, I18nObject, ParameterRule, ParameterType

    class BuiltinProvider(base):  # type: ignore[misc, valid-type]
        def get_customizable_model_schema(self, model: str, credentials: Any) -> Any:
            entity = super().get_customizable_model_schema(model, credentials)
            if credentials.get("structured_output_support") == "supported":
                entity.parameter_rules.append(
                    ParameterRule(
                        name=DefaultParameterName.RESPONSE_FORMAT.value,
                        label=I18nObject(en_US="Response Format"),
                        type=ParameterType.STRING,
                        options=["text", "json_object", "json_schema"],
                        required=False,
                    )
                )
                entity.parameter_rules.append(
                    ParameterRule(
                        name=DefaultParameterName.JSON_SCHEMA.value,
                        use_template=DefaultParameterName.JSON_SCHEMA.value,
                    )
                )
            return entity

    return BuiltinProvider


class _Driver:
    def __init__(self, plugin_dir: str) -> None:
        from dify_plugin import OAICompatLargeLanguageModel

        sys.path.insert(0, plugin_dir)  # as under the daemon: the plugin folder is the import root
        from models.llm.llm import VlmbridgeLargeLanguageModel

        self.classes = {
            "plugin": VlmbridgeLargeLanguageModel,
            "stock": _builtin_provider_class(OAICompatLargeLanguageModel),
        }
        self.air_gap()

    @staticmethod
    def air_gap() -> None:
        """Refuse name lookups of anything but loopback, as in an air-gapped Dify deployment: tiktoken's download
        of its GPT-2 encoding then fails at once, as it does there."""
        import socket

        real = socket.getaddrinfo

        def loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host not in ("127.0.0.1", "localhost", "::1", b"127.0.0.1", b"localhost"):
                raise socket.gaierror(socket.EAI_NONAME, f"air-gapped: no route to {host!r}")
            return real(host, *args, **kwargs)

        socket.getaddrinfo = loopback_only

    def instance(self, cls: str, estimate_offline: bool = True) -> Any:
        # A fresh instance per call, as the daemon does: after an error the SDK's timing context poisons one.
        llm = self.classes[cls](model_schemas=[])
        if cls == "stock" and estimate_offline:
            llm.estimated = False

            def estimate(text: str) -> int:  # offline stand-in for tiktoken, flagged in the result
                llm.estimated = True
                return (len(text) + 3) // 4

            llm._get_num_tokens_by_gpt2 = estimate
        return llm

    @staticmethod
    def messages(specs: list[dict[str, Any]]) -> list[Any]:
        from dify_plugin.entities.model.message import (
            AssistantPromptMessage,
            ImagePromptMessageContent,
            SystemPromptMessage,
            TextPromptMessageContent,
            ToolPromptMessage,
            UserPromptMessage,
            VideoPromptMessageContent,
        )

        out: list[Any] = []
        for spec in specs:
            content = spec["content"]
            if isinstance(content, list):
                parts: list[Any] = []
                for part in content:
                    if "text" in part:
                        parts.append(TextPromptMessageContent(data=part["text"]))
                    elif "video" in part:
                        clip = part["video"]
                        parts.append(
                            VideoPromptMessageContent(
                                format=clip["mime_type"].split("/")[-1],
                                mime_type=clip["mime_type"],
                                base64_data=clip.get("base64", ""),
                                url=clip.get("url", ""),
                            )
                        )
                    else:
                        img = part["image"]
                        parts.append(
                            ImagePromptMessageContent(
                                format=img["mime_type"].split("/")[-1],
                                mime_type=img["mime_type"],
                                base64_data=img.get("base64", ""),
                                url=img.get("url", ""),
                                detail=img.get("detail", "low"),
                            )
                        )
                content = parts
            if spec["role"] == "tool":
                out.append(ToolPromptMessage(content=content, tool_call_id=spec["tool_call_id"]))
                continue
            if spec.get("tool_calls"):
                calls = [
                    AssistantPromptMessage.ToolCall(
                        id=c["id"], type="function",
                        function=AssistantPromptMessage.ToolCall.ToolCallFunction(
                            name=c["name"], arguments=c["arguments"]
                        ),
                    )
                    for c in spec["tool_calls"]
                ]  # fmt: skip
                out.append(AssistantPromptMessage(content=content, tool_calls=calls))
                continue
            cls = {"system": SystemPromptMessage, "user": UserPromptMessage, "assistant": AssistantPromptMessage}
            out.append(cls[spec["role"]](content=content))
        return out

    def op_invoke(
        self,
        cls: str,
        model: str,
        credentials: dict[str, Any],
        messages: list[dict[str, Any]],
        parameters: dict[str, Any] | None = None,
        stream: bool = False,
        stop: list[str] | None = None,
        user: str | None = None,
        estimate_offline: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        # estimate_offline=False leaves the SDK's own GPT-2 counting in place: on this air-gapped driver it raises
        # if the SDK ever needs it (a stream that ended without usage).
        from dify_plugin.entities.model.message import PromptMessageTool

        llm = self.instance(cls, estimate_offline)
        prompt_tools = [PromptMessageTool(**t) for t in tools] if tools else None
        chunks = list(
            llm.invoke(
                model, credentials, self.messages(messages), dict(parameters or {}), prompt_tools, stop, stream, user
            )
        )
        calls = [c for chunk in chunks for c in chunk.delta.message.tool_calls or []]
        usage = next((c.delta.usage for c in reversed(chunks) if c.delta.usage is not None), None)
        return {
            "text": "".join(str(c.delta.message.content or "") for c in chunks),
            "chunks": len(chunks),
            "finish_reason": next((c.delta.finish_reason for c in reversed(chunks) if c.delta.finish_reason), None),
            "usage": None
            if usage is None
            else {k: getattr(usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
            "estimated": getattr(llm, "estimated", False),
            # Dify reassembles streamed calls itself (by id, id-less deltas to the last call): what an Agent node sees.
            "tool_calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in calls],
        }

    def op_validate(self, cls: str, model: str, credentials: dict[str, Any]) -> None:
        self.instance(cls).validate_credentials(model, credentials)

    def op_num_tokens(self, model: str, credentials: dict[str, Any], messages: list[dict[str, Any]]) -> int:
        return int(self.instance("plugin").get_num_tokens(model, credentials, self.messages(messages)))

    def op_schema(self, cls: str, model: str, credentials: dict[str, Any]) -> dict[str, Any]:
        entity = self.instance(cls).get_customizable_model_schema(model, credentials)
        return _entity(entity)

    def op_remote_models(self, credentials: dict[str, Any]) -> list[dict[str, Any]]:
        return [_entity(e) for e in self.instance("plugin").remote_models(credentials)]

    def op_map_response(self, status: int, body: str) -> dict[str, Any]:
        """What Dify's caller sees for a server answer with this status and body (the plugin's error mapping)."""
        import requests
        from models.llm import vlmbridge_api as api

        response = requests.Response()
        response.status_code = status
        response._content = body.encode()
        response.encoding = "utf-8"
        mapped = self.instance("plugin")._transform_invoke_error(api.error_from_response(response))
        return _error(mapped)

    def op_map_event(self, error: dict[str, Any]) -> dict[str, Any]:
        from models.llm import vlmbridge_api as api

        return _error(api.error_from_event(error))


def _entity(entity: Any) -> dict[str, Any]:
    return {
        "model": entity.model,
        "label": entity.label.en_US,
        "features": [f.value for f in entity.features or []],
        "properties": {k.value: v for k, v in entity.model_properties.items()},
        "rules": {r.name: {"min": r.min, "max": r.max, "type": r.type.value} for r in entity.parameter_rules},
    }


def _serve(plugin_dir: str) -> None:
    driver = _Driver(plugin_dir)
    for line in _stdin_lines():
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            _answer({"ok": True, "result": None})
            return
        try:
            _answer({"ok": True, "result": getattr(driver, f"op_{op}")(**request)})
        except Exception as exc:
            _answer({"ok": False, "error": _error(exc)})


def _load_folder(folder: str) -> None:
    from dify_plugin import DifyPluginEnv
    from dify_plugin.core.plugin_registration import PluginRegistration
    from dify_plugin.entities.model import ModelType

    os.chdir(folder)  # the loader reads manifest.yaml, provider yaml, _assets and sources relative to the CWD
    sys.path.insert(0, folder)
    try:
        reg = PluginRegistration(DifyPluginEnv())
        providers = {}
        for name, (config, provider, factory) in reg.models_mapping.items():
            llm = reg.get_model_instance(name, ModelType.LLM)
            providers[name] = {
                "provider_class": type(provider).__name__,
                "methods": [m.value for m in config.configurate_methods],
                "credentials": [c.variable for c in config.model_credential_schema.credential_form_schemas],
                "models": {k.value: v.__name__ for k, v in factory.models.items()},
                "llm_module": type(llm).__module__,
            }
        result = {
            "name": reg.configuration.name,
            "author": reg.configuration.author,
            "version": reg.configuration.version,
            "assets": sorted(f.filename for f in reg.files),
            "providers": providers,
        }
        _answer({"ok": True, "result": result})
    except Exception as exc:
        _answer({"ok": False, "error": _error(exc)})


if __name__ == "__main__":
    import dify_plugin  # noqa: F401  (first: it monkey-patches the interpreter with gevent)

    {"serve": _serve, "load-folder": _load_folder}[sys.argv[1]](sys.argv[2])
