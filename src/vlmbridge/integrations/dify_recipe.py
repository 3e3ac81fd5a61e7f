"""The recipe for Dify's built-in "OpenAI-API-compatible" provider: the exact field values, and network advice.

`vlmbridge dify config` prints it. The values follow what that provider's form offers (labels as in Dify's English
UI) and what vlmbridge's server accepts; the advice follows where Dify makes its calls from: the `plugin_daemon`
container, for which `localhost` is itself.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from vlmbridge.errors import InvalidRequestError, VlmbridgeError

__all__ = [
    "ModelFacts",
    "Recipe",
    "facts_from_folder",
    "facts_from_models_file",
    "facts_from_server",
    "models_from_server",
    "normalize_base_url",
    "recipe",
]

DEFAULT_BASE_URL = "http://vlmbridge:8000/v1"  # deploy/dify.compose.yml: the service name on Dify's network
_DEFAULT_CONTEXT = 32768  # the server's default cap: min(model maximum, 32768)
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class ModelFacts:
    name: str | None  # the served model name
    context: int | None  # tokens the server accepts per sequence
    vision: bool | None
    source: str  # where the facts came from, for the printout


@dataclass(frozen=True)
class Field:
    label: str  # as Dify's form names it
    value: str
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    base_url: str
    fields: list[Field]
    advice: list[str]
    warnings: list[str]

    def as_dict(self) -> dict[str, object]:
        return {
            "base_url": self.base_url,
            "fields": {f.label: f.value for f in self.fields},
            "notes": {f.label: f.note for f in self.fields if f.note},
            "advice": self.advice,
            "warnings": self.warnings,
        }


def facts_from_folder(path: Path, *, served_name: str | None = None, context: int | None = None) -> ModelFacts:
    """What `vlmbridge serve PATH` will report, read from config.json alone (no weights, no torch)."""
    from vlmbridge.families import family_for
    from vlmbridge.folder import ModelFolder

    folder = ModelFolder.open(path)
    raw = folder.text_config.get("max_position_embeddings") or folder.config.get("max_position_embeddings")
    max_pos = int(raw) if isinstance(raw, int) and raw > 0 else _DEFAULT_CONTEXT
    family = family_for(folder.model_type)
    vision = family.is_vlm if family is not None else isinstance(folder.config.get("vision_config"), dict)
    return ModelFacts(
        name=served_name or folder.path.name,
        context=min(context or min(max_pos, _DEFAULT_CONTEXT), max_pos),
        vision=vision,
        source=f"model folder {folder.path}",
    )


def facts_from_server(url: str, api_key: str | None = None, timeout: float = 3.0) -> ModelFacts:
    """The first model a running server lists at /v1/models. Raises httpx.HTTPError when it cannot be asked."""
    return models_from_server(url, api_key, timeout)[0]


def models_from_server(url: str, api_key: str | None = None, timeout: float = 3.0) -> list[ModelFacts]:
    """Every model a running server lists at /v1/models, loaded or not (it knows their context from the config)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url.rstrip('/')}/models", headers=headers, timeout=timeout)
    response.raise_for_status()
    found = []
    for entry in response.json()["data"]:
        ext = entry.get("vlmbridge") or {}
        context = entry.get("max_model_len")
        vision = ext.get("vision")
        found.append(
            ModelFacts(
                name=str(entry["id"]),
                context=context if isinstance(context, int) else None,
                vision=vision if isinstance(vision, bool) else None,
                source=f"server {url}",
            )
        )
    if not found:
        raise ValueError(f"{url} lists no models")
    return found


def facts_from_models_file(file: Path) -> list[ModelFacts]:
    """One entry per model of a models file, as the server will list them (its per-model context and name)."""
    from vlmbridge.pool import read_models_file
    from vlmbridge.settings import Settings

    found = []
    for spec in read_models_file(Settings(models_file=file), file):
        try:
            facts = facts_from_folder(spec.path, served_name=spec.name, context=spec.settings.context_length)
        except VlmbridgeError:  # a broken folder: the server reports it; the entry is still printed
            facts = ModelFacts(name=spec.name, context=None, vision=None, source=f"models file {file}")
        found.append(ModelFacts(facts.name, facts.context, facts.vision, f"models file {file}"))
    return found


def normalize_base_url(url: str) -> tuple[str, list[str]]:
    """The endpoint URL Dify needs (scheme, host, path ending in /v1) and warnings about what was changed."""
    warnings: list[str] = []
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
        warnings.append(f"added http:// to {url!r}")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"{url!r} is not an http(s) URL with a host", param="base_url")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path.removesuffix("/chat/completions")
        warnings.append("the endpoint URL is the API base, without /chat/completions (Dify appends it)")
    if not path.endswith("/v1"):
        path = f"{path}/v1"
        warnings.append("added /v1: Dify appends /chat/completions to the endpoint URL, so it must end in /v1")
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")), warnings


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def network_advice(base_url: str) -> tuple[list[str], list[str]]:
    """(advice, warnings) for reaching `base_url` from Dify's plugin_daemon container."""
    host = urlsplit(base_url).hostname or ""
    port = urlsplit(base_url).port or 8000
    warnings: list[str] = []
    advice = ["Dify calls the model from its plugin_daemon container: the endpoint URL must work from there."]
    if _is_loopback(host):
        warnings.append(
            f"{host} inside Dify's containers is the container itself, not your machine: use "
            f"{DEFAULT_BASE_URL} (vlmbridge on Dify's Docker network) or http://host.docker.internal:{port}/v1 "
            "(vlmbridge on the host)"
        )
    if host == "host.docker.internal":
        advice += [
            "vlmbridge runs on the Docker host: start it with --host 0.0.0.0 and an --api-key (containers reach the "
            "host through the Docker bridge, not through 127.0.0.1).",
            "On Linux, add to Dify's plugin_daemon service (docker/docker-compose.yaml or an override file): "
            'extra_hosts: ["host.docker.internal:host-gateway"], then `docker compose up -d plugin_daemon`.',
            f"Check from the container: docker compose exec plugin_daemon curl -s http://host.docker.internal:{port}/health",
        ]
    elif "." not in host and not _is_loopback(host):
        advice += [
            f"'{host}' is a Docker service name: run vlmbridge with deploy/dify.compose.yml, which joins Dify's "
            "network docker_default (the network is <project>_default when Dify's compose project is not named "
            "docker: `docker network ls`). No port needs publishing.",
            f"Check from the container: docker compose exec plugin_daemon curl -s http://{host}:{port}/health",
        ]
    elif not _is_loopback(host):
        advice.append(f"Make sure {host}:{port} is reachable from the Dify host and protected by the API key.")
    advice += [
        "Images: Dify sends them as base64 by default (MULTIMODAL_SEND_FORMAT=base64), which needs nothing else. "
        "With MULTIMODAL_SEND_FORMAT=url it sends links to its own file server (FILES_URL, e.g. http://api:5001): "
        "add that host to vlmbridge's image allow-list (--allow-image-host api, or VLMBRIDGE_ALLOW_IMAGE_HOSTS=api), "
        "or vlmbridge refuses the private address.",
        "In the app's LLM node, turn Vision on and pick the files variable (sys.files in a chatflow).",
    ]
    return advice, warnings


def recipe(base_url: str, facts: ModelFacts, api_key: str | None = None) -> Recipe:
    url, warnings = normalize_base_url(base_url)
    advice, net_warnings = network_advice(url)
    name = facts.name or "<the name the server lists at /v1/models>"
    context = facts.context
    vision = facts.vision is not False
    fields = [
        Field("Model Type", "LLM"),
        Field("Model Name", name, f"from the {facts.source}" if facts.name else "pass --model-dir or start the server"),
        Field(
            "API Key", api_key or "<one of the server's VLMBRIDGE_API_KEYS>", "leave empty only if the server has none"
        ),
        Field("API endpoint URL", url, "as seen from Dify's plugin_daemon container"),
        Field("model name for API endpoint", name, "may stay empty when it equals Model Name"),
        Field("Completion mode", "Chat"),
        Field(
            "Model context size",
            str(context) if context else "<max_model_len from /v1/models>",
            "the server refuses longer prompts; images count too",
        ),
        Field("Upper bound for max tokens", str(min(8192, context // 2)) if context else "4096"),
        Field("Thinking Mode Support", "Only Non-Thinking Mode"),
        Field(
            "Compatibility mode",
            "OpenAI compatible (strict)",
            "extended also works: its `thinking`/`enable_thinking` fields reach the chat template",
        ),
        Field("Include Usage in Stream", "Enabled", "the server's usage counts image tokens"),
        Field("Function Call Type", "Tool Call", "OpenAI tools; the server turns Qwen's <tool_call> blocks into calls"),
        Field("Stream function calling", "Support"),
        Field(
            "Vision Support",
            "Support" if vision else "Not Support",
            "Dify's default is Not Support, which silently drops every image" if vision else "a text-only model",
        ),
        Field("Video Support", "Not Support"),
        Field(
            "Structured Output",
            "Support",
            "response_format json_schema: the server enforces the schema while generating",
        ),
        Field("API Type", "Chat Completions API (/chat/completions)"),
        Field("Token parameter name", "Use max_tokens"),
        Field("User Identity Support", "Support", "vlmbridge accepts and ignores `user`"),
        Field("Stream mode auth", "Not Use"),
        Field("Delimiter for streaming results", "\\n\\n", "the default; vlmbridge frames events with LF only"),
    ]
    return Recipe(url, fields, advice, warnings + net_warnings)
