"""Where a decode token's time goes in onnxruntime (bench preset, unroll/ort export).

    .venv/bin/python -m benchmarks.decode_profile [--out benchmarks/results/decode_profile.json]

- `--past sliced` vs `masked`: decode ms/token with 40 / 96 / 512 / 2048-row cache buffers
  (one token at position 32), interleaved repetitions so both forms see the same machine;
- node count of each graph after onnxruntime's own optimizations;
- onnxruntime's profiler on fp32 and int8 (MatMulNBits + blocked QMoE) decode: kernel time per
  token by op type and the slowest single nodes. The profiler adds a few microseconds to every
  node, so small ops look more expensive than they are; compare the large ones;
- QMoE per call at bench shapes (batch 1, 16 experts, top-2): int8 per output row, int8 and
  int4 in blocks of 32.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import decode_pasts, write_json

BUDGETS = (40, 96, 512, 2048)
POS = 32


def _session(path: Path, threads: int, **opts):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    for k, v in opts.items():
        setattr(so, k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(cfg, loops: int, budget: int) -> dict:
    return {"input_ids": np.array([[5]], np.int64), "past_len": np.array([POS], np.int64),
            "act_threshold": np.array(0.99, np.float32), "logits_from": np.array(0), **decode_pasts(cfg, loops, budget)}


def _wanted(session, feeds: dict) -> dict:
    """The feeds a graph takes (exports with the sliced past take logits_from too)."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def budget_sweep(graphs: dict[str, Path], cfg, loops: int, threads: int, reps: int = 4, n: int = 10) -> dict:
    sessions = {k: _session(p, threads) for k, p in graphs.items()}
    times = {k: {b: [] for b in BUDGETS} for k in graphs}
    for _ in range(reps):
        for b in BUDGETS:
            for k, s in sessions.items():
                f = _wanted(s, _feeds(cfg, loops, b))
                s.run(None, f)
                for _ in range(n):
                    t0 = time.perf_counter()
                    s.run(None, f)
                    times[k][b].append(time.perf_counter() - t0)
    return {k: {str(b): float(np.median(v) * 1e3) for b, v in t.items()} for k, t in times.items()}


def optimized_nodes(path: Path, threads: int) -> int:
    import onnx
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "opt.onnx"
        _session(path, threads, optimized_model_filepath=str(out))
        m = onnx.load(str(out), load_external_data=False)

    def walk(g):
        return sum(1 + sum(walk(a.g) for a in node.attribute if a.HasField("g")) for node in g.node)
    return walk(m.graph)


def profile(path: Path, cfg, loops: int, threads: int, tokens: int = 20) -> dict:
    with tempfile.TemporaryDirectory() as d:
        s = _session(path, threads, enable_profiling=True, profile_file_prefix=str(Path(d) / "p"))
        f = _wanted(s, _feeds(cfg, loops, 96))
        s.run(None, f)
        for _ in range(tokens):
            s.run(None, f)
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = [e for e in events if e["name"] == "model_run"][1:]  # the first is the warm-up
    by_op, count, by_node = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < runs[0]["ts"]:
            continue
        op = e["args"].get("op_name")
        by_op[op] += e["dur"]
        count[op] += 1
        by_node[e["name"][:-len("_kernel_time")]].append(e["dur"])
    return {"profiled_ms_per_token": float(np.median([r["dur"] for r in runs]) / 1e3),
            "by_op": [{"op": op, "ms_per_token": d / tokens / 1e3, "nodes": count[op] // tokens}
                      for op, d in by_op.most_common(12)],
            "slowest_nodes": [{"node": k, "us": float(np.mean(v))}
                              for k, v in sorted(by_node.items(), key=lambda kv: -np.mean(kv[1]))[:10]]}


def qmoe_per_call(threads: int, calls: int = 8, n: int = 200) -> dict:
    from onnx import TensorProto, helper, numpy_helper
    from mythos_deploy.exporters.quant_graph import quantize_last_axis
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 512, 512)) * 0.05).astype(np.float32)  # fused gate/up [E, 2F, D]
    w2 = (rng.standard_normal((16, 512, 256)) * 0.05).astype(np.float32)  # down [E, D, F]
    feeds = {"x": rng.standard_normal((1, 512)).astype(np.float32), "r": rng.standard_normal((1, 16)).astype(np.float32)}
    attrs = dict(k=2, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                 activation_alpha=1.0, activation_beta=0.0)
    out = {}
    for label, bits, block in (("int8 per output row", 8, 0), ("int8 blocks of 32", 8, 32), ("int4 blocks of 32", 4, 32)):
        inits, ins = [], []
        for name, w in (("fc1", w1), ("fc2", w2)):
            q, sc = quantize_last_axis(w, bits, block)
            inits += [numpy_helper.from_array(q, name), numpy_helper.from_array(sc, f"{name}_s")]
            ins += [name, f"{name}_s", ""]
        nodes = [helper.make_node("QMoE", ["x", "r", *ins[:-1]], [f"o{c}"], domain="com.microsoft",
                                  expert_weight_bits=bits, **attrs, **({"block_size": block} if block else {}))
                 for c in range(calls)]
        g = helper.make_graph(nodes, "qmoe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512]),
                                              helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(f"o{c}", TensorProto.FLOAT, None) for c in range(calls)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "qmoe.onnx"
            p.write_bytes(m.SerializeToString())
            s = _session(p, threads)
            s.run(None, feeds)
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, feeds)
            out[label] = (time.perf_counter() - t0) / n / calls * 1e6
    return {"us_per_call": out}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/decode_profile.json")
    args = ap.parse_args(argv)
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_form, export_onnx
    from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
    from mythos_deploy.exporters.torch_to_onnx import export_stepped
    from mythos_deploy import MythosConfig, MythosModel, save_checkpoint

    def log(msg):
        print(f"[profile] {msg}", file=sys.stderr, flush=True)
    cfg = MythosConfig.from_name(args.preset)
    loops = cfg.max_loop_iters
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = MythosModel(cfg).init_weights(0).eval()
        save_checkpoint(model, d / "ckpt")
        log("torch export")
        stepped = export_stepped(export_form(model, OnnxExportOptions()), "fp32", 18)
        arts = {}
        for past in ("sliced", "masked"):
            log(f"export unroll/ort --past {past}")
            arts[past] = d / past
            export_onnx(d / "ckpt", arts[past], OnnxExportOptions(loop="unroll", moe="ort", validate=False, past=past),
                        stepped=stepped)
        log("quantize int8 (sliced)")
        arts["int8"] = d / "int8"
        quantize_artifact(arts["sliced"], arts["int8"], QuantizeOptions(mode="int8", gate_tokens=16))
        graphs = {k: p / "model.onnx" for k, p in arts.items()}
        log("budget sweep")
        sweep = budget_sweep({k: graphs[k] for k in ("masked", "sliced")}, cfg, loops, args.threads)
        nodes = {k: optimized_nodes(p, args.threads) for k, p in graphs.items()}
        log("profiles")
        prof = {k: profile(graphs[k], cfg, loops, args.threads) for k in ("sliced", "int8")}
        log("QMoE per call")
        qmoe = qmoe_per_call(args.threads)
    result = {"benchmark": "decode_profile", "preset": args.preset, "export": "unroll/ort", "loops": loops,
              "threads": args.threads, "position": POS,
              "decode_ms_by_budget": sweep, "nodes_after_ort_optimization": nodes,
              "profile": {"fp32 (sliced)": prof["sliced"], "int8": prof["int8"]}, "qmoe": qmoe}
    path = write_json(args.out, result)
    print(json.dumps({"decode_ms_by_budget": sweep, "nodes_after_ort_optimization": nodes, "qmoe": qmoe}, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
