"""Quantization benchmark: per mode on the `bench` preset, file size, decode ms/token and
prefill tokens/s against fp32 and OpenMythos's own cached decoding in the same run, and the
fraction of the memory-bandwidth floor (weights at their stored width). onnxruntime modes on
the `loop` export with the `standard` lowering and (QMoE experts) the `ort` lowering; the
TensorRT Q/DQ modes on the `unroll`/`plugin` export, file size and gate only (no TensorRT here
to time them).

    .venv/bin/python -m benchmarks.quant_bench [--out benchmarks/results/quant.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.runtime_bench import copy_bandwidth_gbs, floor_bytes_per_token, prepare, run_config


def target_checks(rows: list[dict]) -> dict:
    """The issue's targets, per variant (lowering, block size) of each mode."""
    return {"int8_decode_5x_openmythos": {r["mode"]: r["decode_speedup_vs_openmythos"] >= 5 for r in rows
                                          if r["mode"].startswith("int8")},
            "int4_file_at_most_1_6_of_fp32": {r["mode"]: r["size_vs_fp32"] <= 1 / 6 for r in rows
                                              if r["mode"].startswith("int4")}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/quant.json")
    args = ap.parse_args(argv)
    from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
    from mythos_deploy import MythosConfig
    cfg = MythosConfig.from_name(args.preset)
    loops = cfg.max_loop_iters
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths = prepare(args.preset, 0, Path(d), loops, lambda m: print(f"[quant] {m}", file=sys.stderr),
                        {"loop/standard", "loop/ort", "unroll/plugin"})
        fp32 = paths["loop/standard"]
        arts = {"fp32": (fp32, None)}
        for mode in ("int8", "int4"):
            out = Path(d) / f"q-{mode}"
            res = quantize_artifact(fp32, out, QuantizeOptions(mode=mode))
            arts[mode] = (out, res)
            out = Path(d) / f"q-{mode}-ort"
            arts[f"{mode}-qmoe"] = (out, quantize_artifact(paths["loop/ort"], out, QuantizeOptions(mode=mode)))
        out = Path(d) / "q-int4-ort-b128"  # fewer scales: 1/4 of block 32's
        arts["int4-qmoe-b128"] = (out, quantize_artifact(paths["loop/ort"], out, QuantizeOptions(mode="int4", block_size=128)))
        trt_src = paths["unroll/plugin"]
        trt_rows = [{"mode": "fp32 (unroll/plugin)", "file_bytes": sum(p.stat().st_size for p in trt_src.glob("*.onnx"))}]
        for mode in ("qdq-int8", "qdq-int4", "fp8"):
            out = Path(d) / f"q-{mode}"
            res = quantize_artifact(trt_src, out, QuantizeOptions(mode=mode))
            trt_rows.append({"mode": mode, "file_bytes": sum(p.stat().st_size for p in out.glob("*.onnx")),
                             "gate": res.gate})
        for r in trt_rows:
            r["size_vs_fp32"] = r["file_bytes"] / trt_rows[0]["file_bytes"]
            print(f"{r['mode']:22s} size {r['file_bytes'] / 2**20:7.1f} MiB ({r['size_vs_fp32']:.2f}x)"
                  + (f" gate agreement {r['gate']['greedy_agreement']:.4f}" if "gate" in r else ""), flush=True)
        base = {"preset": args.preset, "seed": 0, "vocab": cfg.vocab_size, "prompt": args.prompt,
                "new_tokens": args.new_tokens, "threads": args.threads, "loops": loops}
        om = run_config({**base, "name": "openmythos", "kind": "openmythos"})
        for mode, (path, res) in arts.items():
            r = run_config({**base, "name": mode, "kind": "backend", "path": str(path), "exit": "none"})
            size = sum(p.stat().st_size for p in path.glob("*.onnx"))
            rows.append({"mode": mode, "file_bytes": size, **r, "prefill_tokens_per_s": args.prompt / r["prefill_s"],
                         "gate": None if res is None else res.gate})
    bw = copy_bandwidth_gbs()
    fp32_floor_bytes = floor_bytes_per_token(cfg, loops, args.prompt + args.new_tokens // 2)["total"]
    fp32_row = rows[0]
    for r in rows:
        r["size_vs_fp32"] = r["file_bytes"] / fp32_row["file_bytes"]
        r["decode_speedup_vs_fp32"] = fp32_row["decode"]["p50_ms"] / r["decode"]["p50_ms"]
        r["decode_speedup_vs_openmythos"] = om["decode"]["p50_ms"] / r["decode"]["p50_ms"]
        # floor: the fp32 floor (runtime_bench.floor_bytes_per_token) scaled by stored size
        r["bandwidth_floor_ms"] = fp32_floor_bytes * r["size_vs_fp32"] / (bw * 1e9) * 1e3
        r["x_floor"] = r["decode"]["p50_ms"] / r["bandwidth_floor_ms"]
        print(f"{r['mode']:14s} size {r['file_bytes'] / 2**20:7.1f} MiB ({r['size_vs_fp32']:.2f}x) decode p50 "
              f"{r['decode']['p50_ms']:.2f} ms ({r['decode_speedup_vs_openmythos']:.2f}x OpenMythos) "
              f"prefill {r['prefill_tokens_per_s']:.0f} tok/s", flush=True)
    targets = target_checks(rows)
    path = write_json(args.out, {"benchmark": "quantization", **base, "openmythos": om, "copy_bandwidth_gbs": bw,
                                 "results": rows, "tensorrt_qdq": trt_rows, "targets": targets})
    print(f"targets {targets}; wrote {path}")
    return {"results": rows}


if __name__ == "__main__":
    main()
