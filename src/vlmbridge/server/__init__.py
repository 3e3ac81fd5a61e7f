"""The OpenAI-compatible HTTP server. FastAPI lives here and nowhere else."""

from vlmbridge.server.app import create_app

__all__ = ["create_app"]
