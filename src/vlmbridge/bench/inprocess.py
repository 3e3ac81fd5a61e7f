"""The limit: transformers' own `generate()` in this process, on the same inputs, one request or a batch."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmbridge.bench.client import RequestRecord, RunResult
from vlmbridge.bench.workload import Workload

__all__ = ["InProcessGenerate"]


class InProcessGenerate:
    """The checkpoint loaded once in this process; `run` times generate() on the benchmark's picture and prompt."""

    def __init__(self, model: Path, work: Workload, dtype: str = "auto", device: str = "cpu") -> None:
        from vlmbridge.loader import LoadOptions, load_model
        from vlmbridge.media.decode import decode_image

        self.work = work
        self._loaded: Any = load_model(model, LoadOptions(device=device, dtype=dtype))
        processor = self._loaded.processor
        assert processor is not None, "the in-process baseline needs a vision-language model"
        processor.tokenizer.padding_side = "left"
        image = decode_image(work.png()).image
        self._conversation = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": work.prompt}]}
        ]

    def close(self) -> None:
        """Let the model go (a benchmark that cannot hold every system at once loads the next one after)."""
        self._loaded = None
        gc.collect()

    def _once(self, batch: int) -> tuple[float, list[str]]:
        import torch

        processor, size = self._loaded.processor, {"shortest_edge": 65536, "longest_edge": 1 << 20}
        start = time.perf_counter()
        inputs = processor.apply_chat_template(
            [self._conversation] * batch, tokenize=True, add_generation_prompt=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True, "size": size},
        )  # fmt: skip
        with torch.inference_mode():
            out = self._loaded.model.generate(
                **inputs, max_new_tokens=self.work.new_tokens, min_new_tokens=self.work.new_tokens, do_sample=False
            )
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return time.perf_counter() - start, texts

    def run(
        self, batch: int, calls: int, count: Callable[[str], int], *, threads: int | None = None,
        on_done: Callable[[], None] = lambda: None, keep_text: bool = False,
    ) -> RunResult:  # fmt: skip
        """`calls` generate() calls on `batch` identical prompts (left-padded), after one untimed warm-up; tokens
        re-counted from the text. `threads` sets torch's CPU threads first (None leaves them as they are)."""
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self._once(batch)  # warm-up: a new thread count starts its pool, a new batch size its buffers
        result = RunResult(clients=batch, wall=0.0)
        begin = time.perf_counter()
        for _ in range(calls):
            elapsed, texts = self._once(batch)
            for text in texts:
                result.records.append(RequestRecord(latency=elapsed, ttft=float("nan"), tokens=count(text)))
                if keep_text:
                    result.texts.append(text)
            on_done()
        result.wall = time.perf_counter() - begin
        return result
