"""Per-request token selection: penalties, temperature, top-k/top-p, seeded sampling, logprobs.

Each request owns its sampler (and its own torch.Generator), so batching requests together never changes what
any one of them samples. Penalties follow OpenAI's definitions (presence/frequency over the completion so far)
and transformers' repetition_penalty (over prompt and completion), which generation_config.json may set.

A request with a grammar (`constraint`, see grammar.py) has its own row masked before anything else: penalties,
temperature and top-k/top-p then work on the tokens the grammar allows, and logprobs stay the model's own.

Scores are computed in float32 and kept in a range softmax and multinomial accept: NaN becomes -inf, +inf the
largest finite float. If nothing finite is left (extreme penalties), the model's own best token is taken.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vlmbridge.engine.types import LOGPROB_FLOOR, SamplingParams, TokenChoice, reportable_logprob
from vlmbridge.errors import EngineFailedError

__all__ = ["LOGPROB_FLOOR", "MIN_TEMPERATURE", "ResolvedSampling", "Sampler", "resolve_sampling"]

# Below this temperature sampling is greedy (vLLM's threshold too): dividing by less only overflows.
MIN_TEMPERATURE = 1e-5


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
    # An explicit temperature decides alone (OpenAI semantics); otherwise generation_config's do_sample does.
    do_sample = params.temperature is not None or bool(default("do_sample", False))
    top_p = params.top_p if params.top_p is not None else float(default("top_p", 1.0))
    top_k = params.top_k if params.top_k is not None else int(default("top_k", 0) or 0)
    rep = (
        params.repetition_penalty
        if params.repetition_penalty is not None
        else float(default("repetition_penalty", 1.0))
    )
    return ResolvedSampling(
        greedy=not do_sample or not temperature >= MIN_TEMPERATURE,  # `not >=` also makes NaN greedy
        temperature=max(temperature, MIN_TEMPERATURE),
        top_p=top_p,
        top_k=max(top_k, 0),  # -1 and 0 both mean off
        repetition_penalty=rep,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"),
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )


class Sampler:
    """Chooses the next token of one sequence from its logits row."""

    def __init__(
        self, resolved: ResolvedSampling, prompt_ids: Any, vocab_size: int, device: Any, constraint: Any = None
    ):
        import torch

        self.cfg = resolved
        self.constraint = constraint  # a grammar.Constraint, or None for free text
        self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = prompt_ids.reshape(-1).to(device)
        self._seen[ids[ids < vocab_size]] = True
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(resolved.seed)

    def observe(self, token_id: int) -> None:
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if token_id < self._counts.numel():
            self._counts[token_id] += 1
            self._seen[token_id] = True

    def choose(self, logits: Any) -> tuple[int, TokenChoice | None]:
        """logits: 1-D float tensor over the vocabulary (raw model output for this step)."""
        import torch

        cfg = self.cfg
        raw = _bounded(logits.float())
        allowed = raw if self.constraint is None else self.constraint.apply(raw.clone())
        scores = self._penalized(allowed)
        if not cfg.greedy:
            scores = self._filtered(_bounded(scores / cfg.temperature))
        if not bool(torch.isfinite(scores).any()):
            token = _fallback(allowed)  # penalties pushed every score to -inf: take the best allowed token
        elif cfg.greedy:
            token = int(torch.argmax(scores))
        else:
            probs = torch.softmax(scores, dim=-1)  # at least one finite score: a valid distribution
            token = int(torch.multinomial(probs, 1, generator=self._generator))
        return token, (self._logprob(raw, token) if cfg.logprobs else None)

    def _penalized(self, raw: Any) -> Any:
        cfg = self.cfg
        scores = raw.clone()
        if cfg.repetition_penalty != 1.0:
            import torch

            picked = scores[self._seen]
            scores[self._seen] = torch.where(
                picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty
            )
        if cfg.frequency_penalty or cfg.presence_penalty:
            scores -= cfg.frequency_penalty * self._counts + cfg.presence_penalty * (self._counts > 0).float()
        return scores

    def _filtered(self, scores: Any) -> Any:
        """top-k, then top-p: what falls out becomes -inf (the best token always stays)."""
        import torch

        cfg = self.cfg
        if cfg.top_k and cfg.top_k < scores.numel():
            kth = torch.topk(scores, cfg.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # Drop tokens once the mass before them already reaches top_p; always keep the best one.
            drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
            drop[0] = False
            scores = scores.scatter(0, order[drop], float("-inf"))
        return scores

    def _logprob(self, raw: Any, token: int) -> TokenChoice:
        import torch

        logp = torch.log_softmax(raw, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.cfg.top_logprobs:
            values, ids = torch.topk(logp, self.cfg.top_logprobs)
            top = tuple((int(t), reportable_logprob(v)) for v, t in zip(values.tolist(), ids.tolist(), strict=True))
        return TokenChoice(token_id=token, logprob=reportable_logprob(float(logp[token])), top=top)


def _bounded(scores: Any) -> Any:
    """NaN -> -inf (never chosen), +inf -> the largest float32 (still the clear favourite; softmax subtracts it)."""
    import torch

    # neginf must be given: nan_to_num's default turns -inf (a banned token) into the lowest finite float.
    return torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))


def _fallback(raw: Any) -> int:
    import torch

    if not bool(torch.isfinite(raw).any()):
        raise EngineFailedError(
            "the model produced no usable logits for this request (all NaN or -inf)", code="sampling_failed"
        )
    return int(torch.argmax(raw))
