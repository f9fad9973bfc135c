"""Runtime benchmark (`python -m benchmarks.runtime_bench`): decode latency, prefill throughput, memory.

On one set of weights (an OpenMythos 0.5.0 model built from a seed, imported into a
checkpoint, exported to ONNX), batch 1, prompt P, N new tokens, all in one run so ratios are
fair. Each configuration runs in its own subprocess (clean peak-RSS, no cross-talk):

- openmythos: OpenMythos's own cached decoding (its forward with kv_cache + start_pos)
- eager: this project's reference model (exit none, fill-forward and propagate)
- onnxruntime: each loop mode (unroll | loop | stepped) x MoE lowering (standard | ort),
  exit none and (loop/stepped) fill-forward and propagate

Also: the machine's copy bandwidth and the memory-bandwidth floor per decoded token (bytes
of weights and cache a token must read / bandwidth), each configuration's fraction of it.
Writes JSON and a PNG plot.
"""

from __future__ import annotations

from mythos_deploy.options import DecodeOptions

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import percentiles, write_json


# ---------------------------------------------------------------------------------- workers
def _openmythos_model(preset: str, seed: int):
    from mythos_deploy import MythosConfig
    from benchmarks.common import load_oracle
    load_openmythos_main = load_oracle().load_openmythos_main
    import torch
    om = load_openmythos_main()
    torch.manual_seed(seed)
    return om.OpenMythos(om.MythosConfig(**MythosConfig.from_name(preset).to_dict())).eval()


def _time_openmythos(cfg: dict, prompt: np.ndarray, new_tokens: int) -> dict:
    import torch
    model = _openmythos_model(cfg["preset"], cfg["seed"])
    ids = torch.from_numpy(prompt)

    def run():
        cache: dict = {}
        t0 = time.perf_counter()
        logits = model(ids, kv_cache=cache, start_pos=0)
        prefill = time.perf_counter() - t0
        pos, times = ids.shape[1], []
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            logits = model(nxt, kv_cache=cache, start_pos=pos)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            pos += 1
        return prefill, times, [cfg["loops"]] * len(times)

    with torch.no_grad():
        return _measure(run)


def _time_backend(cfg: dict, prompt: np.ndarray, new_tokens: int) -> dict:
    from mythos_deploy.runtimes import load
    backend = load(cfg["path"], verify=False)

    def run():
        session = backend.start(1, prompt.shape[1] + new_tokens, DecodeOptions(cfg["loops"], None, cfg["exit"]))
        t0 = time.perf_counter()
        out = session.step(prompt)
        prefill = time.perf_counter() - t0
        times, loops = [], []
        nxt = np.array([[int(out.logits[0, -1].argmax())]])
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            out = session.step(nxt)
            nxt = np.array([[int(out.logits[0, -1].argmax())]])
            times.append(time.perf_counter() - t0)
            loops.append(out.loops_run)
        return prefill, times, loops

    return _measure(run)


def _measure(run) -> dict:
    run()  # warm-up: allocator, kernels, caches
    prefill, times, loops = run()
    return {"prefill_s": prefill, "decode": percentiles(times), "mean_loops_run": float(np.mean(loops)),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would include the parent's peak: it survives exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: str) -> None:
    import torch
    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    prompt = np.random.default_rng(0).integers(0, cfg["vocab"], size=(1, cfg["prompt"])).astype(np.int64)
    fn = _time_openmythos if cfg["kind"] == "openmythos" else _time_backend
    print("RESULT " + json.dumps(fn(cfg, prompt, cfg["new_tokens"])))


# ------------------------------------------------------------------------------- the driver
def copy_bandwidth_gbs(mb: int = 1024, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by numpy copies of a buffer larger than the LLC."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def floor_bytes_per_token(cfg, n_loops: int, context: int, bytes_per: int = 4) -> dict:
    """Bytes one decode step must read at least: every weight it uses once per use (the
    recurrent block's active weights once per loop; the tied embedding/head matrix once), and
    the whole cache attended (all slots, `context` positions)."""
    from mythos_deploy.stats import parameter_counts
    p = parameter_counts(cfg)
    weights = (p["prelude"] + p["coda"] + p["embedding"] + n_loops * p["active_per_loop"]) * bytes_per
    slots = cfg.prelude_layers + n_loops + cfg.coda_layers
    cache = slots * context * cfg.cache_width * bytes_per
    return {"weights": weights, "cache": cache, "total": weights + cache}


def prepare(preset: str, seed: int, workdir: Path, loops: int, log, needed=None) -> dict[str, Path]:
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_form, export_onnx
    from mythos_deploy.exporters.torch_to_onnx import export_stepped
    from mythos_deploy import from_openmythos, save_checkpoint
    ck = workdir / "ckpt"
    model = from_openmythos(_openmythos_model(preset, seed))
    save_checkpoint(model, ck)
    log("torch export of the stepped graphs")
    # traced in the export form (absorbed MLA, the default), as `mythos-export onnx` does
    stepped = export_stepped(export_form(model, OnnxExportOptions()), "fp32", 18)
    paths = {"ckpt": ck}
    for loop in ("unroll", "loop", "stepped"):
        for moe in ("standard", "ort", "plugin"):
            if (needed is None and moe == "plugin") or (needed is not None and f"{loop}/{moe}" not in needed):
                continue
            log(f"compose {loop}/{moe}")
            od = workdir / f"onnx-{loop}-{moe}"
            export_onnx(ck, od, OnnxExportOptions(loop=loop, loops=loops, moe=moe, validate=False), stepped=stepped)
            paths[f"{loop}/{moe}"] = od
    return paths


def run_config(spec: dict, timeout: int = 1800) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime_bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(Path(__file__).resolve().parent.parent))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark worker failed ({spec['name']}): {proc.stderr.strip()[-2000:]}")


def plot(results: list[dict], floor_ms: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["name"] for r in results]
    p50 = [r["decode"]["p50_ms"] for r in results]
    p90 = [r["decode"]["p90_ms"] for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    y = np.arange(len(names))
    ax.barh(y, p90, color="#c9d6ea", label="p90")
    ax.barh(y, p50, color="#3a6ea5", label="p50")
    ax.axvline(floor_ms, color="#b22", linestyle="--", label=f"bandwidth floor {floor_ms:.1f} ms")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("decode ms/token (batch 1)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="mythos-deploy runtime benchmark")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--loops", type=int, default=None, help="default: the preset's max_loop_iters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/runtime.json")
    ap.add_argument("--only", default="", help="comma-separated config names to run (default all)")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    from mythos_deploy import MythosConfig
    from mythos_deploy.stats import cache_bytes_per_token
    cfg = MythosConfig.from_name(args.preset)
    loops = args.loops or cfg.max_loop_iters

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    needed = None if not only else {n.split()[1] for n in only if n.startswith("ort ")}
    with tempfile.TemporaryDirectory() as d:
        paths = prepare(args.preset, args.seed, Path(d), loops, log, needed)
        base = {"preset": args.preset, "seed": args.seed, "vocab": cfg.vocab_size, "prompt": args.prompt,
                "new_tokens": args.new_tokens, "threads": args.threads, "loops": loops}
        specs = [{"name": "openmythos 0.5.0 (cached)", "kind": "openmythos"},
                 {"name": "eager", "kind": "backend", "path": str(paths["ckpt"]), "exit": "none"},
                 {"name": "eager fill-forward", "kind": "backend", "path": str(paths["ckpt"]), "exit": "fill-forward"},
                 {"name": "eager propagate", "kind": "backend", "path": str(paths["ckpt"]), "exit": "propagate"}]
        for loop in ("unroll", "loop", "stepped"):
            for moe in ("standard", "ort"):
                if f"{loop}/{moe}" not in paths:
                    continue
                for exit_mode in ("none",) if loop == "unroll" else ("none", "fill-forward", "propagate"):
                    specs.append({"name": f"ort {loop}/{moe}" + (f" {exit_mode}" if exit_mode != "none" else ""),
                                  "kind": "backend", "path": str(paths[f"{loop}/{moe}"]), "exit": exit_mode})
        results = []
        for spec in specs:
            if only and spec["name"] not in only and spec["kind"] != "openmythos":
                continue
            log(f"run {spec['name']}")
            r = run_config({**base, **spec})
            results.append({"name": spec["name"], "exit": spec.get("exit", "none"), **r})
            log(f"  decode p50 {r['decode']['p50_ms']:.1f} ms, prefill {args.prompt / r['prefill_s']:.0f} tok/s")
    bw = copy_bandwidth_gbs()
    context = args.prompt + args.new_tokens // 2
    floor = floor_bytes_per_token(cfg, loops, context)
    floor_ms = floor["total"] / (bw * 1e9) * 1e3
    om = results[0]["decode"]["p50_ms"]
    for r in results:
        r["prefill_tokens_per_s"] = args.prompt / r["prefill_s"]
        r["speedup_vs_openmythos"] = om / r["decode"]["p50_ms"]
        # each configuration against the floor of the loops it actually ran (an early exit runs fewer)
        own = floor_bytes_per_token(cfg, r["mean_loops_run"], context)["total"] / (bw * 1e9) * 1e3
        r["bandwidth_floor_ms"] = own
        r["fraction_of_bandwidth_floor"] = own / r["decode"]["p50_ms"]
        r["x_floor"] = r["decode"]["p50_ms"] / own
    best = min(results, key=lambda r: r["decode"]["p50_ms"])
    if not results:
        raise SystemExit("no configuration ran")
    ort_none = [r for r in results if r["name"].startswith("ort") and r["exit"] == "none"]
    targets = {
        "ort_fp32_decode_3x_faster_than_openmythos": {
            "best_ort_exit_none": min(ort_none, key=lambda r: r["decode"]["p50_ms"])["name"] if ort_none else None,
            "speedup": max((r["speedup_vs_openmythos"] for r in ort_none), default=None),
            "met": any(r["speedup_vs_openmythos"] >= 3 for r in ort_none)},
        "best_within_2x_of_floor": {"best": best["name"], "x_floor": best["x_floor"], "met": best["x_floor"] <= 2}}
    cache = cache_bytes_per_token(cfg, loops)
    out = Path(args.out)
    data = write_json(out, {"benchmark": "runtime", **base, "copy_bandwidth_gbs": bw,
                            "bandwidth_floor": {**floor, "context_positions": context, "ms_per_token": floor_ms},
                            "cache_bytes_per_token": cache,
                            "cache_reduction_vs": {k: cache[k] / cache["mythos_deploy"]
                                                   for k in ("openmythos", "equivalent_gqa", "equivalent_mha")},
                            "results": results, "targets": targets})
    plot(results, floor_ms, out.with_suffix(".png"),
         f"{args.preset}: batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, {loops} loops")
    log(f"wrote {data} and {out.with_suffix('.png')}")
    return json.loads(data.read_text())


def print_table(data: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    t = Table(title=f"decode, batch 1, {data['preset']}: prompt {data['prompt']}, {data['new_tokens']} new tokens")
    for col in ("configuration", "p50 ms", "p90 ms", "prefill tok/s", "x OpenMythos", "x floor", "loops run", "peak MB"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for r in data["results"]:
        t.add_row(escape(r["name"]), f"{r['decode']['p50_ms']:.2f}", f"{r['decode']['p90_ms']:.2f}",
                  f"{r['prefill_tokens_per_s']:.0f}", f"{r['speedup_vs_openmythos']:.2f}", f"{r['x_floor']:.2f}",
                  f"{r['mean_loops_run']:.1f}", f"{r['peak_rss_mb']:.0f}")
    console = Console()
    console.print(t)
    console.print(f"copy bandwidth {data['copy_bandwidth_gbs']:.1f} GB/s; floor "
                  f"{data['bandwidth_floor']['ms_per_token']:.2f} ms/token at {data['loops']} loops")


if __name__ == "__main__":
    result = main()
    if result:
        print_table(result)
