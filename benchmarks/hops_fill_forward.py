"""What ACT early exit (fill-forward) costs on a model whose halting is trained.

    python -m benchmarks.hops_fill_forward [--count 50] [--backend eager|onnx]

On the demo checkpoint (checkpoints/hops), each multi-hop problem is decoded token by token
at batch 1 (so a token's early exit is its own, as in serving), at the trained depth:

- exit none: every loop for every token (OpenMythos's numbers);
- exit fill-forward: a token's loop stops once it halts and its deeper recurrent cache slots
  get its last latent (Huginn's approximation). The token's own output is exact; later tokens
  read the filled slots.

Reports accuracy by hop count for both, and the fraction of loop iterations fill-forward
skipped. The prompt-at-once accuracy (the README table) is included as a check: token by
token with exit none must equal it.
"""

from __future__ import annotations

from mythos_deploy.options import DecodeOptions

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_json

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "hops"


def run(backend, problems, n_loops: int, exit: str) -> tuple[np.ndarray, float]:
    """Greedy answer per problem, decoding the prompt one token at a time; mean loops run."""
    from mythos_deploy import hops
    preds, loops = [], []
    for p in problems:
        ids = hops.encode(p.prompt)
        session = backend.start(batch=1, budget=len(ids), decode=DecodeOptions(n_loops, None, exit))
        for tok in ids:
            out = session.step([[tok]])
            loops.append(out.loops_run)
        preds.append(int(out.logits[0, -1].argmax()))
    return np.array(preds), float(np.mean(loops))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEMO))
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--hops", default="1,2,3,4,5,6")
    ap.add_argument("--loops", type=int, default=None, help="default: the trained depth")
    ap.add_argument("--out", default="benchmarks/results/hops_fill_forward.json")
    args = ap.parse_args(argv)

    import mythos_deploy.runtimes
    from mythos_deploy import hops
    from mythos_deploy.runtimes import hops_eval

    backend = mythos_deploy.runtimes.load(args.checkpoint)
    n_loops = args.loops or backend.default_loops
    hop_list = [int(h) for h in args.hops.split(",")]
    at_once = hops_eval.evaluate(backend, hop_list, (n_loops,), args.count)
    rows = []
    for k, cell in zip(hop_list, at_once["cells"]):
        problems = hops.eval_set(k, args.count, at_once["seed"])
        answers = np.array([hops.encode(p.answers)[0] for p in problems])
        t0 = time.perf_counter()
        none_pred, none_loops = run(backend, problems, n_loops, "none")
        ff_pred, ff_loops = run(backend, problems, n_loops, "fill-forward")
        row = {"hops": k, "accuracy_prompt_at_once": cell["accuracy"],
               "accuracy_none": float((none_pred == answers).mean()),
               "accuracy_fill_forward": float((ff_pred == answers).mean()),
               "answers_changed_by_fill_forward": int((ff_pred != none_pred).sum()),
               "token_by_token_equals_at_once": hops.decode(none_pred) == cell["predictions"],
               "mean_loops_run_none": none_loops, "mean_loops_run_fill_forward": ff_loops,
               "loop_iterations_skipped": 1 - ff_loops / none_loops, "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"hops {k}: accuracy none {row['accuracy_none']:.2f}, fill-forward {row['accuracy_fill_forward']:.2f} "
              f"({row['answers_changed_by_fill_forward']} answers changed); loops run {ff_loops:.2f} of {none_loops:.0f} "
              f"({row['loop_iterations_skipped']:.0%} skipped)", flush=True)
    data = {"checkpoint": args.checkpoint, "n_loops": n_loops, "count": args.count, "batch": 1,
            "decoding": "token by token", "rows": rows}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
