"""The front's output pipeline: token ids from any backend become the text, reasoning, stop and usage a client sees."""

from vlmbridge.output.pipeline import OutputPipeline, TextTools

__all__ = ["OutputPipeline", "TextTools"]
