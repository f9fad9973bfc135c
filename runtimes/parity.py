"""Compare two backends on the same prompts, step by step (`mythos-export parity A B`).

Backend A generates greedily; B is fed A's tokens (teacher forcing), so every step compares
logits for the same context. Reported per prompt: max abs logit error, greedy agreement,
loops_used agreement. Plain data (`ParityReport.to_dict()` is the JSON); the CLI renders it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mythos_deploy.errors import InputError
from mythos_deploy.options import DecodeOptions
from mythos_deploy.runtimes.base import Backend


@dataclass(frozen=True)
class PromptParity:
    prompt_len: int
    steps: int
    max_abs_logit_error: float
    mean_abs_logit_error_per_step_max: float
    greedy_agreement: float
    loops_used_agreement: float
    loops_run_a: float
    loops_run_b: float


@dataclass(frozen=True)
class ParityReport:
    a: str
    b: str
    exit_a: str
    exit_b: str
    tolerance: float
    min_agreement: float
    max_abs_logit_error: float
    greedy_agreement: float
    passed: bool
    prompts: tuple[PromptParity, ...]

    @property
    def all_finite(self) -> bool:
        return all(np.isfinite(p.max_abs_logit_error) for p in self.prompts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"prompts": [dataclasses.asdict(p) for p in self.prompts]}


def compare(a: Backend, b: Backend, prompts: list[list[int]], new_tokens: int = 32, *,
            decode_a: DecodeOptions = DecodeOptions(), decode_b: DecodeOptions | None = None,
            tolerance: float = 1e-4, min_agreement: float = 1.0) -> ParityReport:
    """`decode_b` defaults to `decode_a` (for instance to compare an exit mode against none,
    give both)."""
    if a.cfg.to_dict() != b.cfg.to_dict():
        raise InputError("the two artifacts have different model configs; they are not the same model")
    decode_b = decode_a if decode_b is None else decode_b
    rows = []
    for prompt in prompts:
        prompt = np.asarray(prompt, np.int64)[None, :]
        budget = prompt.shape[1] + new_tokens
        sa, sb = a.start(1, budget, decode_a), b.start(1, budget, decode_b)
        feed = prompt
        errs, agree, loops_same, loops_a, loops_b = [], 0, 0, [], []
        for _ in range(new_tokens):
            oa, ob = sa.step(feed), sb.step(feed)
            errs.append(float(np.max(np.abs(oa.logits.astype(np.float64) - ob.logits.astype(np.float64)))))
            agree += int(oa.logits[0, -1].argmax() == ob.logits[0, -1].argmax())
            loops_same += int(oa.loops_used[0, -1] == ob.loops_used[0, -1])
            loops_a.append(oa.loops_run)
            loops_b.append(ob.loops_run)
            feed = np.array([[int(oa.logits[0, -1].argmax())]], np.int64)
        rows.append(PromptParity(int(prompt.shape[1]), new_tokens, max(errs), float(np.mean(errs)),
                                 agree / new_tokens, loops_same / new_tokens, float(np.mean(loops_a)),
                                 float(np.mean(loops_b))))
    worst = max(r.max_abs_logit_error for r in rows)
    agreement = min(r.greedy_agreement for r in rows)
    return ParityReport(a.name, b.name, str(decode_a.exit), str(decode_b.exit), tolerance, min_agreement, worst,
                        agreement, bool(worst <= tolerance and agreement >= min_agreement), tuple(rows))
