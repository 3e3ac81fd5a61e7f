"""The transformers backend: transformers models driven step by step behind the engine contract.

Prompt building and image processing (`prompt`, `pixels`), requests in flight (`sequence`, `sampling`),
batching and prefill (`batch`, `prefill`, `kv`), the vision encoder (`vision`), caches (`caches`) and the
worker that runs them (`engine`). Per-family knowledge (placeholders, positions, vision features) is in `family`.
"""
