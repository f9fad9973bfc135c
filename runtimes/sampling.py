"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded.

Written here rather than borrowed: transformers' LogitsProcessor classes are the well-kept
implementation of exactly these rules, but importing transformers costs seconds and hundreds
of MB for ~40 lines, and the runtime must stay light on edge devices. The definitions follow
transformers' (TopK/TopP/RepetitionPenalty processors) and are tested against them by value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mythos_deploy.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the sequence
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy:
            if not math.isfinite(self.temperature) or self.temperature < 0:
                raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1e-3 <= self.repetition_penalty <= 1e3:  # NaN fails too; outside, logits overflow
            raise InputError(f"repetition_penalty must be in [0.001, 1000], got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        # temperature 0 means greedy, no division; so does one that rounds to 0 in fp32 (the
        # logits' type), where dividing the top logit by it would give 0/0
        return self.greedy or self.temperature < torch.finfo(torch.float32).tiny


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B,V] fp32 -> logits with excluded tokens at -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p  # keeps the smallest prefix reaching top_p
        drop_sorted[..., 0] = False  # and always the top token (a tiny top_p rounds to 0 in fp32)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's rule: a seen token's logit is divided by `penalty` if positive, else multiplied.
    logits [B,V]; seen [B,S] token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B,V] -> next token ids [B] int64."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.is_greedy:
        return logits.argmax(dim=-1)
    # shift first: a tiny temperature then sends the others to -inf, never the max to +inf
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    logits = filter_logits(shifted / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
