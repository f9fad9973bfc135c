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


@dataclass(frozen=True)
class Reference:
    """Backend A's run over the prompts: per prompt, what was fed and what A answered."""
    name: str
    cfg: dict
    decode: DecodeOptions
    new_tokens: int
    runs: tuple[tuple[np.ndarray, tuple[tuple[np.ndarray, np.ndarray, int], ...]], ...]  # (prompt, steps)


def _check_same_model(cfg_a: dict, b: Backend) -> None:
    if cfg_a != b.cfg.to_dict():
        raise InputError("the two artifacts have different model configs; they are not the same model")


def record(a: Backend, prompts: list[list[int]], new_tokens: int = 32,
           decode: DecodeOptions = DecodeOptions()) -> Reference:
    """A's greedy run, kept so that A can be freed before B is loaded (two multi-GB
    sessions need not be resident at once)."""
    runs = []
    for prompt in prompts:
        prompt = np.asarray(prompt, np.int64)[None, :]
        sa = a.start(1, prompt.shape[1] + new_tokens, decode)
        feed, steps = prompt, []
        for _ in range(new_tokens):
            oa = sa.step(feed)
            steps.append((oa.logits.astype(np.float32), oa.loops_used[0, -1].copy(), int(oa.loops_run)))
            feed = np.array([[int(oa.logits[0, -1].argmax())]], np.int64)
        runs.append((prompt, tuple(steps)))
    return Reference(a.name, a.cfg.to_dict(), decode, new_tokens, tuple(runs))


def compare_to(ref: Reference, b: Backend, *, decode_b: DecodeOptions | None = None,
               tolerance: float = 1e-4, min_agreement: float = 1.0) -> ParityReport:
    """B teacher-forced on A's recorded tokens, step by step."""
    _check_same_model(ref.cfg, b)
    decode_b = ref.decode if decode_b is None else decode_b
    rows = []
    for prompt, steps in ref.runs:
        sb = b.start(1, prompt.shape[1] + ref.new_tokens, decode_b)
        feed = prompt
        errs, agree, loops_same, loops_a, loops_b = [], 0, 0, [], []
        for logits_a, used_a, run_a in steps:
            ob = sb.step(feed)
            errs.append(float(np.max(np.abs(logits_a.astype(np.float64) - ob.logits.astype(np.float64)))))
            agree += int(logits_a[0, -1].argmax() == ob.logits[0, -1].argmax())
            loops_same += int(used_a == ob.loops_used[0, -1])
            loops_a.append(run_a)
            loops_b.append(ob.loops_run)
            feed = np.array([[int(logits_a[0, -1].argmax())]], np.int64)
        rows.append(PromptParity(int(prompt.shape[1]), ref.new_tokens, max(errs), float(np.mean(errs)),
                                 agree / ref.new_tokens, loops_same / ref.new_tokens, float(np.mean(loops_a)),
                                 float(np.mean(loops_b))))
    worst = max(r.max_abs_logit_error for r in rows)
    agreement = min(r.greedy_agreement for r in rows)
    return ParityReport(ref.name, b.name, str(ref.decode.exit), str(decode_b.exit), tolerance, min_agreement, worst,
                        agreement, bool(worst <= tolerance and agreement >= min_agreement), tuple(rows))


def compare(a: Backend, b: Backend, prompts: list[list[int]], new_tokens: int = 32, *,
            decode_a: DecodeOptions = DecodeOptions(), decode_b: DecodeOptions | None = None,
            tolerance: float = 1e-4, min_agreement: float = 1.0) -> ParityReport:
    """Backend A generates greedily, B is fed A's tokens. `decode_b` defaults to `decode_a`
    (for instance to compare an exit mode against none, give both)."""
    _check_same_model(a.cfg.to_dict(), b)  # before A's run, not after it
    return compare_to(record(a, prompts, new_tokens, decode_a), b, decode_b=decode_b, tolerance=tolerance,
                      min_agreement=min_agreement)
