"""The vlmbridge LLM for Dify: the SDK's OpenAI-compatible model plus what a vlmbridge server offers.

Added to `OAICompatLargeLanguageModel`:
- vision and video on unless the credentials say otherwise; tool calls (OpenAI `tools`, also streamed) and
  structured output (a `response_format` rule listing json_schema, and a `json_schema` rule), Dify's string
  parameters turned into the OpenAI objects the server takes;
- Dify's video contents sent as `video_url` parts (the SDK's converter drops them without a word);
- typed errors from vlmbridge's error envelope, also for errors sent mid-stream (see vlmbridge_api.py);
- token counts from the server (POST /tokenize), never tiktoken, which downloads files and fails offline;
- `stream_options.include_usage`, so streamed answers carry the server's usage (image tokens included);
- `validate_credentials` and `remote_models` that read GET /models and say exactly what to fix.

The class must stay in models/llm/llm.py: the SDK names the provider in error messages after the third-last part
of the module path and fails with an IndexError on shorter paths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Mapping
from typing import Any

import requests
from dify_plugin import OAICompatLargeLanguageModel
from dify_plugin.config.config import DifyPluginEnv
from dify_plugin.entities import I18nObject
from dify_plugin.entities.model import (
    AIModelEntity,
    DefaultParameterName,
    ModelFeature,
    ParameterRule,
    ParameterType,
)
from dify_plugin.entities.model.llm import LLMResult, LLMResultChunk
from dify_plugin.entities.model.message import (
    AssistantPromptMessage,
    PromptMessage,
    PromptMessageContentType,
    PromptMessageTool,
    UserPromptMessage,
)
from dify_plugin.errors.model import CredentialsValidateFailedError, InvokeError
from models.llm import vlmbridge_api as api

logger = logging.getLogger(__name__)

READ_TIMEOUT = float(DifyPluginEnv().MAX_REQUEST_TIMEOUT)  # the SDK's own limit (MAX_REQUEST_TIMEOUT, 300 s)

# Credentials Dify may leave out (models added before a field existed, API callers): vlmbridge's defaults.
DEFAULT_CREDENTIALS = {
    "mode": "chat",
    "context_size": "32768",
    "max_tokens_to_sample": "4096",
    "vision_support": "support",
    "video_support": "support",
    "function_calling_type": "tool_call",
    "stream_function_calling": "supported",
}
_TOOL_FEATURES = [ModelFeature.TOOL_CALL, ModelFeature.MULTI_TOOL_CALL, ModelFeature.STREAM_TOOL_CALL]
RESPONSE_FORMATS = ["text", "json_object", "json_schema"]
_DOCKER_HINT = (
    "Dify calls the model from its plugin_daemon container, where 'localhost' is that container itself: use "
    "http://vlmbridge:8000/v1 when vlmbridge joined Dify's Docker network (deploy/dify.compose.yml), or "
    "http://host.docker.internal:8000/v1 when it runs on the host"
)


def with_defaults(credentials: Mapping[str, Any]) -> dict[str, Any]:
    creds = dict(credentials)
    for key, value in DEFAULT_CREDENTIALS.items():
        if creds.get(key) in (None, ""):
            creds[key] = value
    return creds


def served_name(model: str, credentials: Mapping[str, Any]) -> str:
    return str(credentials.get("endpoint_model_name") or model)


class VlmbridgeLargeLanguageModel(OAICompatLargeLanguageModel):
    """Dify creates one instance per request; the SDK's timing context makes an instance unusable after an error."""

    # --- invoking ---------------------------------------------------------------------------------------------
    def _invoke(
        self,
        model: str,
        credentials: dict[str, Any],
        prompt_messages: list[PromptMessage],
        model_parameters: dict[str, Any],
        tools: list[PromptMessageTool] | None = None,
        stop: list[str] | None = None,
        stream: bool = True,
        user: str | None = None,
    ) -> LLMResult | Generator[LLMResultChunk, None, None]:
        creds = with_defaults(credentials)
        body: dict[str, Any] = {
            "model": served_name(model, creds),
            "stream": stream,
            **openai_parameters(model_parameters),
            "messages": [self._convert_prompt_message_to_dict(m, creds) for m in prompt_messages],
        }
        if tools and creds.get("function_calling_type") == "tool_call":
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in tools
            ]
            body.setdefault("tool_choice", "auto")
        else:
            body.pop("tool_choice", None)  # the rule is set on a node without tools: nothing to choose from
        if stream:
            body["stream_options"] = {"include_usage": True}
        if stop:
            body["stop"] = stop
        if user:
            body["user"] = user
        # Sent here, not in the generator: HTTP errors then surface from `invoke`, mapped to Dify's error classes.
        response = api.post_chat(creds, body, read_timeout=READ_TIMEOUT)
        if stream:
            return self._stream(model, creds, response, prompt_messages)
        try:
            return self._handle_generate_response(model, creds, response, prompt_messages)
        finally:
            response.close()

    def _stream(
        self, model: str, credentials: dict[str, Any], response: requests.Response, prompt_messages: list[PromptMessage]
    ) -> Generator[LLMResultChunk, None, None]:
        try:
            yield from self._handle_generate_stream_response(model, credentials, response, prompt_messages)
        except ValueError as exc:
            # The SDK raises ValueError(<error object>) for an {"error": ...} event; errors raised while iterating
            # bypass `invoke`'s mapping, so map it here.
            if exc.args and isinstance(exc.args[0], dict):
                raise api.error_from_event(exc.args[0]) from None
            raise
        finally:
            response.close()

    def _convert_prompt_message_to_dict(self, message: PromptMessage, credentials: dict | None = None) -> dict:
        """The SDK's conversion, plus Dify's video contents as `video_url` parts, in their place among the others
        (the base class keeps only text and image parts)."""
        converted: dict[str, Any] = super()._convert_prompt_message_to_dict(message, credentials)
        if not isinstance(message, UserPromptMessage) or isinstance(message.content, str):
            return converted
        if not any(c.type == PromptMessageContentType.VIDEO for c in message.content or []):
            return converted
        kept = iter(converted["content"])  # the base class's parts, in order: text and images
        parts: list[dict[str, Any]] = []
        for content in message.content or []:
            if content.type == PromptMessageContentType.VIDEO:
                parts.append({"type": "video_url", "video_url": {"url": content.data}})
            elif content.type in (PromptMessageContentType.TEXT, PromptMessageContentType.IMAGE):
                parts.append(next(kept))
        converted["content"] = parts
        return converted

    @property
    def _invoke_error_mapping(self) -> dict[type[InvokeError], list[type[Exception]]]:
        return api.INVOKE_ERROR_MAPPING

    # --- usage ------------------------------------------------------------------------------------------------
    def _handle_generate_response(
        self, model: str, credentials: dict[str, Any], response: requests.Response, prompt_messages: list[PromptMessage]
    ) -> LLMResult:
        _log_usage(model, response.json().get("usage"))
        return super()._handle_generate_response(model, credentials, response, prompt_messages)

    def _create_final_llm_result_chunk(
        self,
        index: int,
        message: AssistantPromptMessage,
        finish_reason: str,
        usage: dict[str, Any],
        model: str,
        prompt_messages: list[PromptMessage],
        credentials: dict[str, Any],
        full_content: str,
    ) -> LLMResultChunk:
        _log_usage(model, usage)
        return super()._create_final_llm_result_chunk(
            index, message, finish_reason, usage, model, prompt_messages, credentials, full_content
        )

    # --- token counting ---------------------------------------------------------------------------------------
    def get_num_tokens(
        self,
        model: str,
        credentials: dict[str, Any],
        prompt_messages: list[PromptMessage],
        tools: list[PromptMessageTool] | None = None,
    ) -> int:
        creds = with_defaults(credentials)
        name = served_name(model, creds)
        messages = [self._convert_prompt_message_to_dict(m, creds) for m in prompt_messages]
        try:
            return api.count_tokens(creds, name, messages)
        except (api.ServerError, requests.RequestException, KeyError, ValueError) as exc:
            # Dify only budgets with this number; the invocation itself will report the real problem.
            logger.warning("vlmbridge could not count tokens (%s); using a text-only estimate", exc)
            return self._num_tokens_from_messages(prompt_messages, tools, creds)

    def _get_num_tokens_by_gpt2(self, text: str) -> int:
        # The SDK's estimate runs tiktoken, which downloads its BPE files on first use and fails offline.
        return (len(text) + 3) // 4

    # --- model schema -----------------------------------------------------------------------------------------
    def get_customizable_model_schema(self, model: str, credentials: Mapping[str, Any]) -> AIModelEntity:
        creds = with_defaults(credentials)
        entity = super().get_customizable_model_schema(model, creds)
        features = list(entity.features or [])
        if creds.get("function_calling_type") == "tool_call":  # the server takes OpenAI `tools` (also streamed)
            features += [f for f in _TOOL_FEATURES if f not in features]
            if creds.get("stream_function_calling") != "supported":
                features.remove(ModelFeature.STREAM_TOOL_CALL)
        else:
            features = [f for f in features if f not in _TOOL_FEATURES]
        # Dify uses native structured output only for models with this feature and a response_format rule that
        # lists json_schema (plus a json_schema rule); the server enforces the schema while generating.
        entity.features = [*features, ModelFeature.STRUCTURED_OUTPUT]
        if creds.get("video_support") == "support" and ModelFeature.VIDEO not in entity.features:
            entity.features.append(ModelFeature.VIDEO)  # without it Dify drops video files before the model
        for rule in entity.parameter_rules:
            if rule.name == DefaultParameterName.TOP_P.value:
                rule.min = 0.01  # the server needs top_p > 0
        entity.parameter_rules += [
            ParameterRule(
                name=DefaultParameterName.TOP_K.value,
                label=I18nObject(en_US="Top K"),
                help=I18nObject(en_US="Sample only from the K most likely tokens; 0 = off."),
                type=ParameterType.INT,
                min=0,
                max=1000,
            ),
            ParameterRule(
                name=DefaultParameterName.RESPONSE_FORMAT.value,
                label=I18nObject(en_US="Response Format"),
                help=I18nObject(
                    en_US="json_object: any JSON object; json_schema: an object that follows the JSON Schema below "
                    "(enforced while generating)."
                ),
                type=ParameterType.STRING,
                options=RESPONSE_FORMATS,
                required=False,
            ),
            ParameterRule(
                name=DefaultParameterName.JSON_SCHEMA.value,
                label=I18nObject(en_US="JSON Schema"),
                help=I18nObject(en_US='The schema, bare or as {"name": ..., "schema": ...}; used with json_schema.'),
                type=ParameterType.TEXT,
                required=False,
            ),
            ParameterRule(
                name="tool_choice",
                label=I18nObject(en_US="Tool choice"),
                help=I18nObject(
                    en_US="auto: the model decides; required: it must call one of the node's tools (enforced while "
                    "generating, so even a small model returns a valid call); none: it answers in text."
                ),
                type=ParameterType.STRING,
                options=["auto", "required", "none"],
                required=False,
            ),
            ParameterRule(
                name="seed",
                label=I18nObject(en_US="Seed"),
                help=I18nObject(en_US="The same seed, prompt and settings give the same answer."),
                type=ParameterType.INT,
                min=0,
            ),
        ]
        if creds.get("display_name"):
            entity.label = I18nObject(en_US=str(creds["display_name"]))
        return entity

    def remote_models(self, credentials: dict[str, Any]) -> list[AIModelEntity]:
        """The models the server lists at /models, each with its context size and vision flag filled in."""
        try:
            entries = api.list_models(credentials)
        except (api.ServerError, requests.RequestException, ValueError) as exc:
            logger.warning("vlmbridge could not list models: %s", exc)
            return []
        return [self.get_customizable_model_schema(str(e["id"]), _credentials_for(credentials, e)) for e in entries]

    # --- credentials ------------------------------------------------------------------------------------------
    def validate_credentials(self, model: str, credentials: dict[str, Any]) -> None:
        creds = with_defaults(credentials)
        name = served_name(model, creds)
        url = creds.get("endpoint_url") or ""
        try:
            entries = api.list_models(creds)
            entry = _pick(entries, name, url)
            _check_against(entry, creds, name)
            # A real one-token generation, as Dify's own check does: a model still loading or broken fails here.
            ping = {"model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
            api.post_chat(creds, ping, read_timeout=READ_TIMEOUT).close()
        except CredentialsValidateFailedError:
            raise
        except requests.exceptions.InvalidURL as exc:
            raise CredentialsValidateFailedError(f"the endpoint URL {url!r} is not a valid URL: {exc}") from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema):
            raise CredentialsValidateFailedError(
                f"the endpoint URL {url!r} needs http:// or https://, e.g. http://vlmbridge:8000/v1"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise CredentialsValidateFailedError(
                f"cannot reach a vlmbridge server at {url}: {exc}. {_DOCKER_HINT}"
            ) from None
        except api.Unauthorized as exc:
            raise CredentialsValidateFailedError(
                f"the server at {url} refused the API key ({exc.message}): set API Key to one of the keys the server "
                "was started with (--api-key / VLMBRIDGE_API_KEYS)"
            ) from None
        except api.ServerError as exc:
            if exc.status == 404 and exc.code == "not_found":
                raise CredentialsValidateFailedError(
                    f"{url} has no OpenAI-compatible API ({exc}): the endpoint URL must end in /v1, "
                    "e.g. http://vlmbridge:8000/v1"
                ) from None
            if exc.status == 503:
                raise CredentialsValidateFailedError(
                    f"the server at {url} is up but not ready: {exc.message}"
                ) from None
            raise CredentialsValidateFailedError(f"the server at {url} answered {exc}") from None
        except ValueError as exc:  # not JSON: something other than vlmbridge answers there
            raise CredentialsValidateFailedError(f"{url} did not answer like a vlmbridge server: {exc}") from None


def openai_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Dify's parameters with `response_format` / `json_schema` (strings in Dify) as the OpenAI objects."""
    params = dict(parameters)
    fmt = params.pop("response_format", None)
    schema_text = params.pop(DefaultParameterName.JSON_SCHEMA.value, None)
    if not fmt or fmt == "text":
        return params
    if fmt not in RESPONSE_FORMATS:
        raise api.BadRequest(400, f"response format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}")
    if fmt == "json_object":
        params["response_format"] = {"type": "json_object"}
        return params
    if not schema_text:
        raise api.BadRequest(400, "the json_schema response format needs a JSON Schema")
    try:
        schema = json.loads(schema_text) if isinstance(schema_text, str) else schema_text
    except ValueError as exc:
        raise api.BadRequest(400, f"the JSON Schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise api.BadRequest(400, "the JSON Schema must be a JSON object")
    # Dify's structured output sends {"schema": S, "name": "llm_response"}; users also paste a bare schema.
    wrapped = schema if isinstance(schema.get("schema"), dict) else {"name": "response", "schema": schema}
    params["response_format"] = {"type": "json_schema", "json_schema": wrapped}
    return params


def _pick(entries: list[dict[str, Any]], name: str, url: str) -> dict[str, Any]:
    for entry in entries:
        if entry["id"] == name:
            return entry
    served = ", ".join(repr(str(e["id"])) for e in entries) or "no model"
    raise CredentialsValidateFailedError(
        f"the server at {url} serves {served}, not {name!r}: set Model Name (or 'Model name on the server') to "
        f"{str(entries[0]['id']) if entries else 'the served name'!r}"
    )


def _check_against(entry: dict[str, Any], creds: dict[str, Any], name: str) -> None:
    ext = entry.get("vlmbridge") if isinstance(entry.get("vlmbridge"), dict) else {}
    if creds.get("vision_support") == "support" and ext.get("vision") is False:
        raise CredentialsValidateFailedError(f"{name!r} is a text-only model: set Vision Support to 'Not Support'")
    served_context = entry.get("max_model_len")
    try:
        wanted = int(creds.get("context_size") or 0)
    except ValueError:
        raise CredentialsValidateFailedError(f"context size {creds.get('context_size')!r} is not a number") from None
    if isinstance(served_context, int) and wanted > served_context:
        raise CredentialsValidateFailedError(
            f"context size {wanted} is larger than the server's {served_context} tokens for {name!r}: "
            f"set Model context size to {served_context} (or start the server with --context {wanted})"
        )


def _credentials_for(credentials: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    creds = with_defaults(credentials)
    creds["endpoint_model_name"] = str(entry["id"])
    if isinstance(entry.get("max_model_len"), int):
        creds["context_size"] = str(entry["max_model_len"])
    ext = entry.get("vlmbridge")
    if isinstance(ext, dict) and ext.get("vision") is False:
        creds["vision_support"] = "no_support"
        creds["video_support"] = "no_support"
    return creds


def _log_usage(model: str, usage: Any) -> None:
    # Dify's LLMUsage has no field for image tokens: prompt_tokens includes them, the log line says how many.
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details") or {}
        logger.info(
            "vlmbridge %s usage: prompt_tokens=%s (image_tokens=%s, cached_tokens=%s) completion_tokens=%s",
            model,
            usage.get("prompt_tokens"),
            details.get("image_tokens") if isinstance(details, dict) else None,
            details.get("cached_tokens") if isinstance(details, dict) else None,
            usage.get("completion_tokens"),
        )
