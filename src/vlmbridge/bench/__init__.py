"""`vlmbridge bench`: vlmbridge vs `transformers serve` vs in-process generate on the same checkpoint and requests."""
