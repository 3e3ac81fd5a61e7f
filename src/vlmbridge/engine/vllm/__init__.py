"""The vLLM backend (`engine: vllm`): vLLM's `AsyncLLM` behind our engine contract.

It runs only inside a model's worker process, in an interpreter that has vLLM (`vllm_python` /
`VLMBRIDGE_VLLM_PYTHON`); the front never imports it. We keep what sits in front of an engine (media fetching and
decoding, pixel budgets, templating, stop strings, detokenization, usage, errors); vLLM does the compute.
"""
