"""vlmbridge: load, diagnose and serve vision-language models (Qwen-VL first) the right way."""

__version__ = "0.1.0"

__all__ = ["__version__"]
