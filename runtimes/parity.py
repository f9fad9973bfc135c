"""Compare two backends on the same prompts, step by step (`mythos-export parity A B`).

Backend A generates greedily; B is fed A's tokens (teacher forcing), so every step compares
logits for the same context. Reported per prompt: max abs logit error, greedy agreement,
loops_used agreement. Plain data; the CLI renders it."""

from __future__ import annotations

import numpy as np

from mythos_deploy.runtimes.base import Backend


def compare(a: Backend, b: Backend, prompts: list[list[int]], new_tokens: int = 32,
            n_loops: int | None = None, act_threshold: float | None = None, exit_a: str = "none",
            exit_b: str = "none", tolerance: float = 1e-4, min_agreement: float = 1.0) -> dict:
    if a.cfg.to_dict() != b.cfg.to_dict():
        from mythos_deploy.errors import InputError
        raise InputError("the two artifacts have different model configs; they are not the same model")
    rows = []
    for prompt in prompts:
        prompt = np.asarray(prompt, np.int64)[None, :]
        budget = prompt.shape[1] + new_tokens
        sa = a.start(1, budget, n_loops, act_threshold, exit_a)
        sb = b.start(1, budget, n_loops, act_threshold, exit_b)
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
        rows.append({"prompt_len": int(prompt.shape[1]), "steps": new_tokens, "max_abs_logit_error": max(errs),
                     "mean_abs_logit_error_per_step_max": float(np.mean(errs)),
                     "greedy_agreement": agree / new_tokens, "loops_used_agreement": loops_same / new_tokens,
                     "loops_run_a": float(np.mean(loops_a)), "loops_run_b": float(np.mean(loops_b))})
    worst = max(r["max_abs_logit_error"] for r in rows)
    agreement = min(r["greedy_agreement"] for r in rows)
    return {"a": a.name, "b": b.name, "exit_a": exit_a, "exit_b": exit_b, "tolerance": tolerance,
            "min_agreement": min_agreement, "max_abs_logit_error": worst, "greedy_agreement": agreement,
            "passed": bool(worst <= tolerance and agreement >= min_agreement), "prompts": rows}
