"""The engine contract (`base`, `types`): what any backend implements and the front relies on.

Backends live in subpackages (`transformers`); `factory.build_engine` picks one. Importing this package
imports no backend and no torch.
"""

from vlmbridge.engine.base import Engine, EngineInfo, EngineState, PromptStats, RequestStream
from vlmbridge.engine.types import EngineOutput, EngineStats, GenerationRequest

__all__ = [
    "Engine",
    "EngineInfo",
    "EngineOutput",
    "EngineState",
    "EngineStats",
    "GenerationRequest",
    "PromptStats",
    "RequestStream",
]
