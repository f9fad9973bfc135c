"""Continuous batching against one request at a time, in process (runtimes/engine.py).

    python -m benchmarks.batching [--preset bench] [--artifact DIR ...] [--concurrency 1 4 16]

For each artifact (default: a seeded random `bench` checkpoint exported with `--loop loop
--moe ort`, and its int8 quantization) and each concurrency c: c requests with prompt lengths drawn from
8-256 and 64 new tokens each (greedy, no stop ids) are submitted together to an engine of c
slots; then the same c requests run one after another (an engine of one slot). Reported:
aggregate tokens/s (generated tokens / wall time), time to first token p50/p99, inter-token
latency p50/p99, and the ratios. Also the slot pool's resident memory, in a fresh process,
against the plan's prediction (plan.pool_bytes), and a check that every batched request got
its solo tokens.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_json


def make_requests(cfg, n: int, new_tokens: int, lo: int, hi: int, seed: int):
    from mythos_deploy.runtimes.engine import Request
    rng = np.random.default_rng(seed)
    hi = min(hi, cfg.max_seq_len - new_tokens)
    return [Request(rng.integers(0, cfg.vocab_size, int(rng.integers(lo, hi + 1))).tolist(), new_tokens, id=f"r{i}")
            for i in range(n)]


def run(backend, requests, max_batch: int, chunk: int) -> dict:
    from mythos_deploy.runtimes.engine import Engine, percentile
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    eng = Engine(backend, max_batch=max_batch, max_len=max_len, chunk=chunk)
    t0 = time.perf_counter()
    results = eng.generate(requests)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in results)
    ttft = [r.ttft for r in results]
    itl = [g for r in results for g in r.inter_token()]
    return {"max_batch": max_batch, "max_len": max_len, "requests": len(results), "tokens": tokens,
            "seconds": wall, "tokens_per_s": tokens / wall,
            # decode calls alone: rows advanced / seconds inside them (prefill excluded)
            "decode_tokens_per_s": eng.decode_rows / eng.decode_seconds if eng.decode_seconds else math.nan,
            "prefill_seconds": eng.prefill_seconds, "decode_seconds": eng.decode_seconds,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "itl_p50_ms": percentile(itl, 50) * 1e3, "itl_p99_ms": percentile(itl, 99) * 1e3,
            "_tokens": [r.tokens for r in results]}


POOL_PROBE = """
import json, re, sys
from pathlib import Path
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024.0
from mythos_deploy.plan import pool_bytes
from mythos_deploy.runtimes import load
from mythos_deploy.runtimes.engine import Engine
b = load(sys.argv[1])
n, length = int(sys.argv[2]), int(sys.argv[3])
before = rss()
eng = Engine(b, max_batch=n, max_len=length)
print(json.dumps({"measured": rss() - before, "predicted": pool_bytes(b.cfg, eng.session.n_loops, n, length,
                                                                      getattr(b, "cache_itemsize", 4))}))
"""


def pool_memory(path: Path, max_batch: int, max_len: int) -> dict:
    """The slot pool's resident memory in a fresh process (in this one, freed heap from earlier
    runs would hold it): RSS after Engine() minus before, against plan.pool_bytes."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", POOL_PROBE, str(path), str(max_batch), str(max_len)],
                       capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"max_batch": max_batch, "max_len": max_len, "measured_bytes": d["measured"],
            "predicted_bytes": d["predicted"], "measured_vs_predicted": d["measured"] / d["predicted"]}


def one_at_a_time(backend, requests, chunk: int) -> dict:
    """The same requests, each alone (an engine of one slot, so the same code path)."""
    return run(backend, requests, 1, chunk)


def bench_artifact(path: Path, label: str, concurrency: list[int], new_tokens: int, lo: int, hi: int,
                   chunk: int, seed: int) -> dict:
    from mythos_deploy.runtimes import load
    backend = load(path)
    # warm-up: onnxruntime's first calls at new shapes allocate
    run(backend, make_requests(backend.cfg, 2, 4, lo, lo + 8, seed + 99), 2, chunk)
    rows = []
    for c in concurrency:
        reqs = make_requests(backend.cfg, c, new_tokens, lo, hi, seed + c)
        solo = one_at_a_time(backend, reqs, chunk)
        together = run(backend, reqs, c, chunk)
        same = solo.pop("_tokens") == together.pop("_tokens")
        rows.append({"concurrency": c, "batched": together, "one_at_a_time": solo, "solo_tokens_equal": same,
                     "throughput_ratio": together["tokens_per_s"] / solo["tokens_per_s"],
                     "decode_throughput_ratio": together["decode_tokens_per_s"] / solo["decode_tokens_per_s"],
                     "itl_p99_vs_solo_itl_p50": together["itl_p99_ms"] / solo["itl_p50_ms"]})
        print(f"{label} c={c}: {together['tokens_per_s']:.1f} tok/s batched vs {solo['tokens_per_s']:.1f} one at a "
              f"time ({rows[-1]['throughput_ratio']:.2f}x; decode calls {rows[-1]['decode_throughput_ratio']:.2f}x); ttft p50 {together['ttft_p50_ms']:.0f} ms, itl p50/p99 "
              f"{together['itl_p50_ms']:.1f}/{together['itl_p99_ms']:.1f} ms (solo itl p50 "
              f"{solo['itl_p50_ms']:.1f}); solo tokens equal: {same}", flush=True)
    pool = pool_memory(path, max(concurrency), hi + new_tokens)
    print(f"{label} slot pool {pool['max_batch']} x {pool['max_len']}: measured {pool['measured_bytes'] / 1e6:.1f} MB, "
          f"predicted {pool['predicted_bytes'] / 1e6:.1f} MB", flush=True)
    return {"artifact": str(path), "label": label, "backend": backend.name, "rows": rows, "pool": pool}


def make_bench_artifacts(root: Path, preset: str, seed: int) -> dict[str, Path]:
    from mythos_deploy import MythosConfig, MythosModel, save_checkpoint
    from mythos_deploy.exporters.onnx_export import export_onnx
    from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
    from mythos_deploy.options import OnnxExportOptions
    from mythos_deploy.tokenizer import ByteTokenizer
    ck = root / "ck"
    cfg = MythosConfig.from_name(preset)
    save_checkpoint(MythosModel(cfg).init_weights(seed).eval(), ck,
                    tokenizer=ByteTokenizer().files() if cfg.vocab_size >= 256 else None)
    # the ort MoE lowering: the standard one runs every expert on every token past a handful of
    # tokens (8x the work at bench's top-2 of 16), and its int8 quantizes activations per tensor,
    # which couples the rows of a batch
    export_onnx(ck, root / "loop", OnnxExportOptions(loop="loop", moe="ort", validate=False))
    quantize_artifact(root / "loop", root / "int8", QuantizeOptions(mode="int8", accept_accuracy_loss=True))
    return {f"{preset} fp32 loop/ort": root / "loop", f"{preset} int8 loop/ort": root / "int8"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--artifact", action="append", default=[], help="LABEL=DIR of an existing artifact (repeatable); "
                                                                  "default: make the preset's loop export and int8")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/batching.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.artifact:
            arts = dict(a.split("=", 1) for a in args.artifact)
        else:
            arts = make_bench_artifacts(Path(tmp), args.preset, args.seed)
        results = [bench_artifact(Path(p), label, args.concurrency, args.new_tokens, args.min_prompt,
                                  args.max_prompt, args.chunk, args.seed) for label, p in arts.items()]
    data = {"benchmark": "batching", "new_tokens": args.new_tokens,
            "prompt_lengths": [args.min_prompt, args.max_prompt], "chunk": args.chunk, "artifacts": results}
    path = write_json(args.out, data)
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
