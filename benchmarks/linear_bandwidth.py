"""Weight-read bandwidth of batch-1 fp32 linears on the CPU: torch's default path (F.linear,
MKL sgemv) against the oneDNN inner product that mythos_deploy.layers.linear uses for decode.

    .venv/bin/python -m benchmarks.linear_bandwidth [--out benchmarks/results/linear_bandwidth.json]

48 distinct 2048x2048 weights per pass (800 MB, far past any cache), so every call reads
its weight from memory; GB/s = weight bytes / time. Both paths run in the same process,
interleaved, so the ratio holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import write_json


def main(argv=None) -> dict:
    import torch
    import torch.nn.functional as F
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", default="benchmarks/results/linear_bandwidth.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, d = 48, 2048
    weights = [torch.randn(d, d) for _ in range(n)]
    paths = {"F.linear (MKL)": F.linear,
             "oneDNN inner product": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
    out = {}
    with torch.no_grad():
        for rows in args.rows:
            x = torch.randn(rows, d)
            best = {k: float("inf") for k in paths}
            for _ in range(5):  # interleaved repetitions, best of each
                for k, fn in paths.items():
                    t0 = time.perf_counter()
                    for w in weights:
                        fn(x, w)
                    best[k] = min(best[k], time.perf_counter() - t0)
            gbs = {k: n * d * d * 4 / t / 1e9 for k, t in best.items()}
            out[str(rows)] = {**{f"{k} GB/s": round(v, 2) for k, v in gbs.items()},
                              "ratio": round(gbs["oneDNN inner product"] / gbs["F.linear (MKL)"], 2)}
    result = {"benchmark": "linear_bandwidth", "threads": args.threads, "weight": [d, d], "weights_per_pass": n,
              "by_rows": out}
    path = write_json(args.out, result)
    print(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
