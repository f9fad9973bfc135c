"""What ACT early exit costs on a model whose halting is trained: fill-forward against
propagate (CALM's state propagation), with exit none as the reference.

    python -m benchmarks.hops_fill_forward [--count 100] [--hops 1,2,3,4,5,6]

On the demo checkpoint (checkpoints/hops), each multi-hop problem is decoded token by token
at batch 1 (so a token's early exit is its own, as in serving), at the trained depth, through
the eager backend:

- exit none: every loop for every token (OpenMythos's numbers);
- exit fill-forward: a token's loop stops once it halts and its deeper recurrent cache slots
  get its last latent (computed from h_{ran-1}). The token's own output is exact; later
  tokens read the filled slots;
- exit propagate: the loop stops once it halts; its deeper slots get the latents those loops
  compute from its halted state h_ran.

Reports accuracy by hop count for each, token by token and prompt at once (one prefill call,
where a call's loop stops once all its positions halted), the loops computed per token, and
decode ms per token. Token by token with exit none must equal the prompt-at-once table.

The same token-by-token decode of exit none and exit propagate also runs through onnxruntime on
a `--loop loop` export of the checkpoint (parity-gated; the freeze and the fill inside the
graph): its answers must equal eager's, and its ms per token is measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from mythos_deploy.options import DecodeOptions

EXITS = ("none", "fill-forward", "propagate")
ORT_EXITS = ("none", "propagate")
DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "hops"


def run(backend, problems, n_loops: int, exit: str) -> tuple[np.ndarray, float, float]:
    """Greedy answer per problem, decoding the prompt one token at a time; mean loops run per
    token; mean ms per token."""
    from mythos_deploy import hops
    preds, loops, seconds = [], [], []
    for p in problems:
        ids = hops.encode(p.prompt)
        session = backend.start(batch=1, budget=len(ids), decode=DecodeOptions(n_loops, None, exit))
        for tok in ids:
            t0 = time.perf_counter()
            out = session.step([[tok]])
            seconds.append(time.perf_counter() - t0)
            loops.append(out.loops_run)
        preds.append(int(out.logits[0, -1].argmax()))
    return np.array(preds), float(np.mean(loops)), float(np.mean(seconds)) * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEMO))
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--hops", default="1,2,3,4,5,6")
    ap.add_argument("--loops", type=int, default=None, help="default: the trained depth")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--out", default="benchmarks/results/hops_fill_forward.json")
    args = ap.parse_args(argv)

    import mythos_deploy.runtimes
    from mythos_deploy import hops
    from mythos_deploy.runtimes import hops_eval

    backend = mythos_deploy.runtimes.load(args.checkpoint)
    n_loops = args.loops or backend.default_loops
    import tempfile
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    scratch = tempfile.TemporaryDirectory()
    export_onnx(args.checkpoint, Path(scratch.name) / "loop", OnnxExportOptions(loop="loop"))  # parity-gated
    ort_backend = mythos_deploy.runtimes.load(Path(scratch.name) / "loop", threads=args.threads)
    hop_list = [int(h) for h in args.hops.split(",")]
    at_once = {mode: hops_eval.evaluate(backend, hop_list, (n_loops,), args.count, decode=DecodeOptions(exit=mode))
               for mode in EXITS}
    rows = []
    for i, k in enumerate(hop_list):
        problems = hops.eval_set(k, args.count, at_once["none"]["seed"])
        answers = np.array([hops.encode(p.answers)[0] for p in problems])
        t0 = time.perf_counter()
        row = {"hops": k}
        preds = {}
        for mode in EXITS:
            key = mode.replace("-", "_")
            pred, loops, ms = run(backend, problems, n_loops, mode)
            preds[mode] = pred
            cell = at_once[mode]["cells"][i]
            row.update({f"accuracy_{key}": float((pred == answers).mean()),
                        f"accuracy_{key}_prompt_at_once": cell["accuracy"],
                        f"loops_per_token_{key}": loops, f"ms_per_token_{key}": ms,
                        f"loops_run_{key}_prompt_at_once": cell["loops_run"]})
        for mode in ORT_EXITS:  # the same decode through onnxruntime (loop export)
            key = mode.replace("-", "_")
            pred, loops, ms = run(ort_backend, problems, n_loops, mode)
            row.update({f"onnxruntime_accuracy_{key}": float((pred == answers).mean()),
                        f"onnxruntime_loops_per_token_{key}": loops, f"onnxruntime_ms_per_token_{key}": ms,
                        f"onnxruntime_equals_eager_{key}": bool((pred == preds[mode]).all())})
        row["token_by_token_equals_at_once"] = hops.decode(preds["none"]) == at_once["none"]["cells"][i]["predictions"]
        for mode in EXITS[1:]:
            key = mode.replace("-", "_")
            row[f"answers_changed_by_{key}"] = int((preds[mode] != preds["none"]).sum())
            row[f"loop_iterations_skipped_{key}"] = 1 - row[f"loops_per_token_{key}"] / row["loops_per_token_none"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"hops {k}: accuracy none {row['accuracy_none']:.2f}, fill-forward {row['accuracy_fill_forward']:.2f}, "
              f"propagate {row['accuracy_propagate']:.2f} (prompt at once {row['accuracy_propagate_prompt_at_once']:.2f}); "
              f"loops per token {row['loops_per_token_fill_forward']:.2f} / {row['loops_per_token_propagate']:.2f} of "
              f"{row['loops_per_token_none']:.0f}; eager ms/token {row['ms_per_token_none']:.2f} none, "
              f"{row['ms_per_token_propagate']:.2f} propagate; onnxruntime ms/token "
              f"{row['onnxruntime_ms_per_token_none']:.2f} none, {row['onnxruntime_ms_per_token_propagate']:.2f} propagate "
              f"(answers equal eager: {row['onnxruntime_equals_eager_none']}, {row['onnxruntime_equals_eager_propagate']})",
              flush=True)
    skipped = float(np.mean([r["loop_iterations_skipped_propagate"] for r in rows]))
    speed = float(np.mean([r["ms_per_token_none"] for r in rows]) / np.mean([r["ms_per_token_propagate"] for r in rows]))
    summary = {"propagate_equals_none_hops_1_5": all(r["accuracy_propagate"] == r["accuracy_none"]
                                                     for r in rows if r["hops"] <= 5),
               "loop_iterations_skipped_propagate": skipped, "eager_decode_speedup_propagate_vs_none": speed,
               "onnxruntime_decode_speedup_propagate_vs_none": float(
                   np.mean([r["onnxruntime_ms_per_token_none"] for r in rows])
                   / np.mean([r["onnxruntime_ms_per_token_propagate"] for r in rows])),
               "onnxruntime_equals_eager": all(r[f"onnxruntime_equals_eager_{m.replace('-', '_')}"]
                                               for r in rows for m in ORT_EXITS)}
    scratch.cleanup()
    data = {"checkpoint": args.checkpoint, "n_loops": n_loops, "count": args.count, "batch": 1,
            "backend": "eager, and onnxruntime on a --loop loop export (threads %d)" % args.threads,
            "decoding": "token by token (and prompt at once)", "summary": summary, "rows": rows}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
