"""The limit: transformers' own `generate()` in this process, on the same inputs, one request or a batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from vlmbridge.bench.client import RequestRecord, RunResult
from vlmbridge.bench.workload import Workload

__all__ = ["in_process"]


def in_process(
    model: Path, work: Workload, batch: int, rounds: int, count: Callable[[str], int], dtype: str = "auto",
    on_done: Callable[[], None] = lambda: None, keep_text: bool = False, device: str = "cpu",
    threads: int | None = None,
) -> RunResult:  # fmt: skip
    """`rounds` calls of generate() on `batch` identical prompts (left-padded); tokens re-counted from text.
    `threads` sets torch's CPU threads for the run (None leaves them as they are)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from vlmbridge.loader import LoadOptions, load_model
    from vlmbridge.media.decode import decode_image

    loaded = load_model(model, LoadOptions(device=device, dtype=dtype))
    image = decode_image(work.png()).image
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": work.prompt}]}
    ]
    processor = loaded.processor
    assert processor is not None, "the in-process baseline needs a vision-language model"
    processor.tokenizer.padding_side = "left"
    size = {"shortest_edge": 65536, "longest_edge": 1 << 20}

    def once() -> tuple[float, list[str]]:
        start = time.perf_counter()
        inputs = processor.apply_chat_template(
            [conversation] * batch, tokenize=True, add_generation_prompt=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True, "size": size},
        )  # fmt: skip
        with torch.inference_mode():
            out = loaded.model.generate(
                **inputs, max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens, do_sample=False
            )
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return time.perf_counter() - start, texts

    once()  # warm-up
    result = RunResult(clients=batch, wall=0.0)
    begin = time.perf_counter()
    for _ in range(rounds):
        elapsed, texts = once()
        for text in texts:
            result.records.append(RequestRecord(latency=elapsed, ttft=float("nan"), tokens=count(text)))
            if keep_text:
                result.texts.append(text)
        on_done()
    result.wall = time.perf_counter() - begin
    return result
