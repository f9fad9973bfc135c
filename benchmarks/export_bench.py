"""Export benchmark: for the `bench` preset, export time, graph node count and file size for
each loop mode and MoE lowering. Writes JSON (default benchmarks/results/export.json).

    .venv/bin/python -m benchmarks.export_bench [--preset bench] [--out FILE]

The torch export of the stepped graphs runs once and is reported on its own; each
configuration then reports its compose + lower + check time and the full export time
(torch export + its own steps). Validation is not timed here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_json
from exporters.onnx_compose import iter_graphs
from exporters.onnx_export import EXTERNAL_DATA_BYTES, OnnxExportOptions, _save, build_graphs, export_form
from exporters.torch_to_onnx import export_stepped
from mythos_deploy import MythosConfig, MythosModel
from runtimes.onnx_runner import graph_files


def count_nodes(graph) -> int:
    return sum(len(g.node) for g in iter_graphs(graph))


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
    for loop in ("unroll", "loop", "stepped"):
        for moe in ("standard", "ort", "plugin"):
            opts = OnnxExportOptions(loop=loop, moe=moe).resolved(cfg)
            t = time.perf_counter()
            graphs = build_graphs(model, cfg, opts, lambda s: None, stepped=stepped)
            build_s = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as d:
                files = graph_files(loop)
                size = 0
                for name, g in graphs.items():
                    _save(g, Path(d), files[name], EXTERNAL_DATA_BYTES)
                size = sum(p.stat().st_size for p in Path(d).iterdir())
            row = {"loop": loop, "moe": moe, "n_loops": opts.loops,
                   "nodes": {n: count_nodes(g.graph) for n, g in graphs.items()},
                   "file_bytes": size, "compose_lower_check_s": round(build_s, 3),
                   "export_s": round(torch_export_s + build_s, 3)}
            rows.append(row)
            print(f"{loop:8s} {moe:9s} nodes={sum(row['nodes'].values()):6d} "
                  f"size={size / 2**20:8.1f} MiB export={row['export_s']:.1f}s")
    params = sum(p.numel() for p in model.parameters())
    path = write_json(args.out, {"benchmark": "export", "preset": args.preset, "parameters": params,
                                 "torch_export_s": round(torch_export_s, 3), "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
