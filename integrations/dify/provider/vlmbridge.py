"""The vlmbridge model provider: models are added one by one (customizable-model), each validated on its own."""

from __future__ import annotations

from typing import Any

from dify_plugin import ModelProvider


class VlmbridgeProvider(ModelProvider):
    def validate_provider_credentials(self, credentials: dict[str, Any]) -> None:
        # No provider-wide credentials: Dify validates each model through LLM.validate_credentials.
        return None
