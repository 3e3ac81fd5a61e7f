"""Per-request token selection: penalties, temperature, top-k/top-p, seeded sampling, logprobs.

Each request owns its sampler (and its own torch.Generator), so batching requests together never changes what
any one of them samples. Penalties follow OpenAI's definitions (presence/frequency over the completion so far)
and transformers' repetition_penalty (over prompt and completion), which generation_config.json may set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.types import SamplingParams, TokenLogprob

__all__ = ["ResolvedSampling", "Sampler", "resolve_sampling"]


@dataclass(frozen=True)
class ResolvedSampling:
    greedy: bool
    temperature: float
    top_p: float
    top_k: int  # 0 = off
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    logprobs: bool
    top_logprobs: int


def resolve_sampling(params: SamplingParams, generation_config: Any) -> ResolvedSampling:
    """Fill what the request left out from the model's generation_config.json."""

    def default(name: str, fallback: Any) -> Any:
        value = getattr(generation_config, name, None)
        return fallback if value is None else value

    temperature = params.temperature if params.temperature is not None else float(default("temperature", 1.0))
    do_sample = bool(default("do_sample", False)) if params.temperature is None else temperature > 0
    top_p = params.top_p if params.top_p is not None else float(default("top_p", 1.0))
    top_k = params.top_k if params.top_k is not None else int(default("top_k", 0) or 0)
    rep = (
        params.repetition_penalty
        if params.repetition_penalty is not None
        else float(default("repetition_penalty", 1.0))
    )
    return ResolvedSampling(
        greedy=not do_sample or temperature <= 0,
        temperature=max(temperature, 1e-5),
        top_p=top_p,
        top_k=max(top_k, 0),
        repetition_penalty=rep,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"),
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )


class Sampler:
    """Chooses the next token of one sequence from its logits row."""

    def __init__(self, resolved: ResolvedSampling, prompt_ids: Any, vocab_size: int, device: Any, token_text: Any):
        import torch

        self.cfg = resolved
        self._token_text = token_text  # id -> (text, bytes)
        self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = prompt_ids.reshape(-1).to(device)
        self._seen[ids[ids < vocab_size]] = True
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(resolved.seed)

    def observe(self, token_id: int) -> None:
        if token_id < self._counts.numel():
            self._counts[token_id] += 1
            self._seen[token_id] = True

    def choose(self, logits: Any) -> tuple[int, TokenLogprob | None]:
        """logits: 1-D float tensor over the vocabulary (raw model output for this step)."""
        import torch

        cfg = self.cfg
        raw = logits.float()
        scores = raw.clone()
        if cfg.repetition_penalty != 1.0:
            picked = scores[self._seen]
            scores[self._seen] = torch.where(
                picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty
            )
        if cfg.frequency_penalty or cfg.presence_penalty:
            scores -= cfg.frequency_penalty * self._counts + cfg.presence_penalty * (self._counts > 0).float()
        if cfg.greedy:
            token = int(torch.argmax(scores))
        else:
            scores = scores / cfg.temperature
            if cfg.top_k and cfg.top_k < scores.numel():
                kth = torch.topk(scores, cfg.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if cfg.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=True)
                cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
                # Drop tokens once the mass before them already reaches top_p; always keep the best one.
                drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= cfg.top_p
                drop[0] = False
                scores = scores.scatter(0, order[drop], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self._generator))
        return token, (self._logprob(raw, token) if cfg.logprobs else None)

    def _logprob(self, raw: Any, token: int) -> TokenLogprob:
        import torch

        logp = torch.log_softmax(raw, dim=-1)
        text, data = self._token_text(token)
        top: list[tuple[str, float, tuple[int, ...]]] = []
        if self.cfg.top_logprobs:
            values, ids = torch.topk(logp, self.cfg.top_logprobs)
            for value, tid in zip(values.tolist(), ids.tolist(), strict=True):
                t, b = self._token_text(tid)
                top.append((t, value, b))
        return TokenLogprob(token=text, logprob=float(logp[token]), token_bytes=data, top=tuple(top))
