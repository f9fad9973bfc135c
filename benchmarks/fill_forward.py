"""What do exit=fill-forward and exit=propagate change? Measured, not assumed.

For each model, ACT threshold and early-exit mode: feed one fixed random token stream
(`--tokens` long, one token per step) to an exact session (exit=none: every loop for every
token, OpenMythos's numbers) and to a session of that exit mode, and record per-step logit
error, argmax agreement, and loops computed. (A random stream rather than the model's own greedy output: untrained
models collapse into repeating one token, which would hide how halting varies.) Also a
free-running comparison: how many greedy tokens the two modes share before first differing. Uses the eager backend; the onnxruntime loop/stepped backends are
parity-tested equal to it in both exit modes (tests/runtimes/test_backends.py).

Models: `tiny-spread` (tiny preset, OpenMythos init with a halting head spread so halting
depth varies by token) and `bench` (OpenMythos's own random init, under which every position
halts after two loops). Neither is trained; see the README for what that implies.

    .venv/bin/python -m benchmarks.fill_forward [--tokens 256] [--out FILE]
"""

from __future__ import annotations

from mythos_deploy.options import DecodeOptions

import argparse

import numpy as np
import torch

from benchmarks.common import write_json


def models(names: list[str]):
    from benchmarks.common import load_oracle
    make_openmythos = load_oracle().make_openmythos
    from mythos_deploy import MythosConfig, from_openmythos
    from mythos_deploy.runtimes.eager import EagerBackend
    out = {}
    if "tiny-spread" in names:
        cfg = MythosConfig.from_name("tiny").replace(max_seq_len=512, max_loop_iters=8)
        om = make_openmythos(cfg.to_dict(), seed=7)
        torch.manual_seed(11)  # a halting head under which depth varies from 3 to 8 loops by token
        with torch.no_grad():
            om.recurrent.act.halt.weight.normal_(0, 1.0)
            om.recurrent.act.halt.bias.fill_(-1.0)
        out["tiny-spread"] = EagerBackend(from_openmythos(om))
    if "bench" in names:
        cfg = MythosConfig.from_name("bench")
        out["bench"] = EagerBackend(from_openmythos(make_openmythos(cfg.to_dict(), seed=0, spread_halting=False)))
    return out


def free_running_prefix(backend, prompt, tokens, threshold, exit: str = "fill-forward") -> int:
    from mythos_deploy.runtimes import generate
    a = generate(backend, prompt, tokens, decode=DecodeOptions(act_threshold=threshold)).tokens[0]
    b = generate(backend, prompt, tokens, decode=DecodeOptions(act_threshold=threshold, exit=exit)).tokens[0]
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def teacher_forced(backend, stream: np.ndarray, n_loops: int, threshold: float, exit: str = "fill-forward") -> dict:
    """Feed the same token stream, one token per step, to an exact session and one of `exit`.
    (The `*_fill_forward` keys hold the early-exit session's numbers, whichever `exit` is.)"""
    exact = backend.start(1, len(stream), DecodeOptions(n_loops, threshold, "none"))
    ff = backend.start(1, len(stream), DecodeOptions(n_loops, threshold, exit))
    errs, agree, loops_exact, loops_ff, depth = [], 0, [], [], []
    for tok in stream:
        a, b = exact.step(np.array([[tok]])), ff.step(np.array([[tok]]))
        errs.append(float(np.max(np.abs(a.logits - b.logits))))
        agree += int(a.logits[0, -1].argmax() == b.logits[0, -1].argmax())
        loops_exact.append(a.loops_run)
        loops_ff.append(b.loops_run)
        depth.append(int(a.loops_used[0, -1]))
    return {"max_abs_logit_error": max(errs), "mean_abs_logit_error_max": float(np.mean(errs)),
            "greedy_agreement": agree / len(stream), "mean_loops_run_exact": float(np.mean(loops_exact)),
            "mean_loops_run_fill_forward": float(np.mean(loops_ff)),
            "loops_saved": 1 - float(np.mean(loops_ff)) / float(np.mean(loops_exact)),
            "halting_depth_histogram": {str(k): depth.count(k) for k in sorted(set(depth))}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="fill-forward vs exact ACT: measured effect")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--models", default="tiny-spread,bench")
    ap.add_argument("--thresholds", default="0.99,0.9,0.7")
    ap.add_argument("--exits", default="fill-forward,propagate")
    ap.add_argument("--out", default="benchmarks/results/fill_forward.json")
    args = ap.parse_args(argv)
    rows = []
    for name, backend in models(args.models.split(",")).items():
        n_loops = backend.cfg.max_loop_iters
        stream = np.random.default_rng(1).integers(0, backend.cfg.vocab_size, size=args.tokens)
        prompt = stream[:8].tolist()
        for thr, exit in [(float(t), e) for t in args.thresholds.split(",") for e in args.exits.split(",")]:
            row = {"model": name, "act_threshold": thr, "exit": exit, "n_loops": n_loops, "tokens": args.tokens,
                   **teacher_forced(backend, stream, n_loops, thr, exit),
                   "free_running_identical_prefix": free_running_prefix(backend, prompt, args.tokens - 8, thr, exit)}
            rows.append(row)
            print(f"{name:12s} thr={thr:4.2f} {exit:12s} agree={row['greedy_agreement']:.3f} "
                  f"max|dlogit|={row['max_abs_logit_error']:.3g} loops {row['mean_loops_run_exact']:.2f}"
                  f"->{row['mean_loops_run_fill_forward']:.2f} (saved {row['loops_saved']:.0%}) "
                  f"free-run prefix {row['free_running_identical_prefix']}/{args.tokens - 8} "
                  f"depths {row['halting_depth_histogram']}", flush=True)
    path = write_json(args.out, {"benchmark": "fill_forward", "method": (
        "teacher forcing: one fixed random token stream fed one token per step to an exact (exit=none) "
        "and an early-exit session (`exit`: fill-forward or propagate; its numbers are in the *_fill_forward "
        "keys); plus free-running greedy generation from its first 8 tokens"),
        "results": rows})
    print(f"wrote {path}")
    return {"results": rows}


if __name__ == "__main__":
    main()
