"""Export benchmark: for the `bench` preset, export time, graph node count and file size for
each loop mode and MoE lowering, and for `--loop-export while_loop`. Writes JSON (default
benchmarks/results/export.json).

    .venv/bin/python -m benchmarks.export_bench [--preset bench] [--out FILE]

The torch export of the stepped graphs runs once and is reported on its own; each composed
configuration then reports its compose + lower + check time and the full export time
(torch export + its own steps). A while_loop configuration runs its own torch export, so its
export time is all its own. Validation is not timed here.

The two ways of building a `loop` graph are also compared on decode in the same run: one
token at position 32, max_loop_iters loops, batch 1, onnxruntime CPU (2 threads), the two
graphs in 8 alternating blocks of 1 untimed + 8 timed calls, p50 of the 64 timed calls, for
each lowering that onnxruntime runs (standard, ort).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import decode_pasts, percentiles, write_json
from mythos_deploy.exporters.onnx_compose import iter_graphs
from mythos_deploy.exporters.onnx_export import EXTERNAL_DATA_BYTES, OnnxExportOptions, save_graph, build_graphs, export_form
from mythos_deploy.exporters.torch_to_onnx import export_stepped
from mythos_deploy import MythosConfig, MythosModel
from mythos_deploy.runtimes.onnx_runner import OnnxModelRunner, graph_files


def count_nodes(graph) -> int:
    return sum(len(g.node) for g in iter_graphs(graph))


def decode_p50_ms(runs: dict[str, dict], cfg: MythosConfig, n_loops: int, past: int = 32,
                  rounds: int = 8, block: int = 8) -> dict[str, float]:
    """One-token decode through several `loop` graphs ({label: graphs}), in alternating blocks
    so that machine drift hits them alike: each block is one untimed call (the weights back in
    cache) and `block` timed calls; p50 ms per label over `rounds` blocks."""
    runners = {k: OnnxModelRunner(g, "loop", n_loops, threads=2)
               for k, g in runs.items()}
    pasts = decode_pasts(cfg, n_loops, past)
    ids = np.array([[7]], np.int64)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, runner in runners.items():
            for i in range(block + 1):
                t = time.perf_counter()
                runner.forward(ids, past, pasts, n_loops, 0.99)
                if i:
                    times[k].append(time.perf_counter() - t)
    return {k: percentiles(v)["p50_ms"] for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--out", default="benchmarks/results/export.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = MythosConfig.from_name(args.preset)
    model = MythosModel(cfg).init_weights(0).eval()
    t0 = time.perf_counter()
    stepped = export_stepped(export_form(model, OnnxExportOptions()), "fp32", 18)
    torch_export_s = time.perf_counter() - t0
    rows = []
    configs = [(loop, moe, "compose") for loop in ("unroll", "loop", "stepped") for moe in ("standard", "ort", "plugin")]
    configs += [("loop", moe, "while_loop") for moe in ("standard", "ort", "plugin")]
    loop_graphs = {}
    for loop, moe, how in configs:
        opts = OnnxExportOptions(loop=loop, moe=moe, loop_export=how).resolved(cfg)
        t = time.perf_counter()
        graphs = build_graphs(model, cfg, opts, lambda s: None, stepped=stepped)
        build_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            files = graph_files(loop)
            for name, g in graphs.items():
                save_graph(g, Path(d), files[name], EXTERNAL_DATA_BYTES)
            size = sum(p.stat().st_size for p in Path(d).iterdir())
        composed = how == "compose"
        row = {"loop": loop, "moe": moe, "loop_export": how if loop == "loop" else None, "n_loops": opts.loops,
               "nodes": {n: count_nodes(g.graph) for n, g in graphs.items()},
               "file_bytes": size, "compose_lower_check_s": round(build_s, 3) if composed else None,
               "export_s": round(torch_export_s + build_s if composed else build_s, 3)}
        if loop == "loop" and moe != "plugin":
            loop_graphs[(moe, how)] = graphs
        rows.append(row)
        print(f"{loop:8s} {moe:9s} {how:10s} nodes={sum(row['nodes'].values()):6d} "
              f"size={size / 2**20:8.1f} MiB export={row['export_s']:.1f}s")
    ratios = {}
    for moe in ("standard", "ort"):
        p50 = decode_p50_ms({how: loop_graphs[(moe, how)] for how in ("compose", "while_loop")}, cfg, cfg.max_loop_iters)
        for row in rows:
            if row["loop_export"] and row["moe"] == moe:
                row["decode_p50_ms"] = round(p50[row["loop_export"]], 3)
        ratios[moe] = round(p50["while_loop"] / p50["compose"], 3)
        print(f"loop/{moe} decode p50: compose {p50['compose']:.2f} ms, while_loop {p50['while_loop']:.2f} ms")
    params = sum(p.numel() for p in model.parameters())
    print(f"loop decode, while_loop / compose: {ratios}")
    path = write_json(args.out, {"benchmark": "export", "preset": args.preset, "parameters": params,
                                 "torch_export_s": round(torch_export_s, 3), "results": rows,
                                 "loop_decode_while_loop_over_compose": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
