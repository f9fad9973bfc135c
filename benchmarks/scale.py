"""Real model sizes (`python -m benchmarks.scale --preset 1b`): every stage of the pipeline as
a user runs it, each in its own process, with its peak RSS, time and sizes, against the memory
model's prediction (mythos_deploy/plan.py); then the decode table at 16 loops.

Stages (the CLI, one subprocess each; peak RSS from wait4, the process's own high-water mark):
init -> onnx --no-validate -> onnx (parity gate) -> quantize int8 -> quantize int4 ->
generate on the int4 artifact. Decode table (benchmarks/runtime_bench.py workers, one run,
batch 1, prompt P, N new tokens): OpenMythos 0.5.0's cached decoding of the same weights,
the eager reference, onnxruntime fp32 / int8 / int4 (QMoE) through the `loop` export, each
with its bandwidth floor (bytes a token must read / the measured copy bandwidth).
On request (--stages), the other export forms ungated (unroll + standard MoE, stepped,
while_loop, fp16, stepped + plugin) and on the plugin export the TensorRT-side stages that run
without TensorRT (qdq-int4, qdq-int8, build --dry-run).

The 1b run takes about 40 minutes on 2 cores and needs ~10 GB of RAM at its peak and ~25 GB
of disk under --workdir. Run it with nothing else heavy on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine, write_json

ROOT = Path(__file__).resolve().parent.parent


def run_stage(name: str, argv: list[str], log) -> dict:
    """One CLI stage in its own process: exit code, wall time, peak RSS (bytes)."""
    log(f"{name}: {' '.join(argv)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env={**os.environ, "COLUMNS": "200"})
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    row = {"stage": name, "exit_code": proc.returncode, "seconds": round(seconds, 1),
           "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
           "output_tail": output.strip().splitlines()[-3:],
           # the CLI prints each finished stage with its duration ("  done <stage> in 12.3 s")
           "stage_seconds": {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s*done (.+) in ([\d.]+) s$",
                                                                                output, re.M)}}
    log(f"  -> exit {proc.returncode}, {seconds:.0f} s, peak RSS {row['peak_rss_gb']} GB")
    return row


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def decode_table(cfg, paths: dict, prompt: int, new_tokens: int, threads: int, log) -> dict:
    from benchmarks.runtime_bench import copy_bandwidth_gbs, floor_bytes_per_token, run_config
    bw = copy_bandwidth_gbs()
    loops = cfg.max_loop_iters
    floor = floor_bytes_per_token(cfg, loops, prompt + new_tokens)
    fp32_bytes = dir_bytes(paths["onnx"])
    rows = []
    for name, kind, path in (("openmythos", "openmythos", None), ("eager", "eager", paths["ckpt"]),
                             ("onnxruntime fp32", "backend", paths["onnx"]), ("onnxruntime int8", "backend", paths["int8"]),
                             ("onnxruntime int4", "backend", paths["int4"]),
                             ("onnxruntime int4 (block 128)", "backend", paths["int4-b128"])):
        if path is not None and not Path(path).exists():
            continue
        log(f"decode: {name}")
        spec = {"name": name, "kind": kind, "path": str(path) if path else None, "preset": paths["preset"], "seed": 0,
                "loops": loops, "exit": "none", "threads": threads, "vocab": cfg.vocab_size, "prompt": prompt,
                "new_tokens": new_tokens}
        try:
            r = run_config(spec, timeout=3600)
        except Exception as exc:  # a failed configuration is recorded, the table goes on
            rows.append({"name": name, "error": str(exc)[-500:]})
            continue
        # bytes a token must read: the weights it uses (scaled by the artifact's size against fp32) + the cache
        scale = dir_bytes(path) / fp32_bytes if name.startswith("onnxruntime") and fp32_bytes else 1.0
        need = floor["weights"] * scale + floor["cache"]
        floor_ms = need / (bw * 1e9) * 1e3  # as runtime_bench: the copy bandwidth (read + write bytes per second)
        rows.append({"name": name, **r, "prefill_tokens_per_s": prompt / r["prefill_s"],
                     "bytes_per_token": need, "bandwidth_floor_ms": floor_ms,
                     "x_floor": r["decode"]["p50_ms"] / floor_ms})
    om = next((r for r in rows if r["name"] == "openmythos" and "decode" in r), None)
    for r in rows:
        if om and "decode" in r:
            r["speedup_vs_openmythos"] = om["decode"]["p50_ms"] / r["decode"]["p50_ms"]
    return {"copy_bandwidth_gbs": bw, "loops": loops, "prompt": prompt, "new_tokens": new_tokens, "rows": rows}


# every other export form, ungated (the gate's cost is measured once, on loop + ort): each must
# get past protobuf's 2 GiB in the memory the plan gives it. The TensorRT stages run on `plugin`.
MODES = {
    "unroll": ["--loop", "unroll", "--moe", "standard"],
    "stepped": ["--loop", "stepped", "--moe", "ort"],
    "while_loop": ["--loop", "loop", "--loop-export", "while_loop", "--moe", "ort"],
    "fp16": ["--loop", "loop", "--moe", "ort", "--dtype", "fp16"],
    "plugin": ["--loop", "stepped", "--moe", "plugin"],
}
ON_PLUGIN = ("qdq-int4", "qdq-int8", "build-dry-run")
# stage -> (plan stage, export dtype, quantization, MoE lowering)
PLAN_KEYS = {"int8": ("quantize", "fp32", "int8", None), "int4": ("quantize", "fp32", "int4", None),
             "int4-b128": ("quantize", "fp32", "int4", None),
             "generate": ("generate", "fp32", "int4", None), "fp16": ("export", "fp16", None, "ort"),
             "plugin": ("export", "fp32", None, "plugin"), "qdq-int4": ("quantize", "fp32", "qdq-int4", None),
             "qdq-int8": ("quantize", "fp32", "qdq-int8", None),
             **{m: ("export", "fp32", None, None) for m in ("unroll", "stepped", "while_loop")}}


def predict(cfg, row: dict) -> None:
    from mythos_deploy.plan import STAGES, plan_stage
    key = row["stage"]
    stage, dtype, quant, moe = PLAN_KEYS.get(key, (key, "fp32", None, None))
    if stage not in STAGES:  # build --dry-run: no plan of its own
        return
    plan = plan_stage(cfg, stage, dtype=dtype, quant=quant, moe=moe)
    row["predicted_peak_rss_gb"] = round(plan.peak_rss / 1e9, 2)
    row["predicted_seconds"] = round(plan.seconds, 1)
    row["rss_prediction_error"] = round(plan.peak_rss / max(row["peak_rss_bytes"], 1) - 1, 3)


TARGETS = {  # issue 16: per preset, stage -> peak RSS (GB) and seconds it must stay within
    "1b": {"export": (6.0, None), "export+gate": (12.0, 900), "int8": (8.0, 900), "int4": (8.0, 900),
           "generate": (3.0, None)},
    # 3b to int4 on this machine, gated on parity, never more than 16 GB
    "3b": {"init": (16.0, None), "export": (16.0, None), "export+gate": (16.0, None), "int4": (16.0, None),
           "generate": (16.0, None)},
}


def targets(data: dict) -> dict:
    """Each target the run is held to, met or missed, from the recorded numbers."""
    out = {}
    limits = TARGETS.get(data.get("preset"), {})
    for row in data["stages"]:
        if row["stage"] in limits:
            gb, secs = limits[row["stage"]]
            met = row["exit_code"] == 0 and row["peak_rss_gb"] <= gb and (secs is None or row["seconds"] <= secs)
            out[f"{row['stage']}: peak RSS <= {gb} GB" + (f", <= {secs} s" if secs else "")] = {
                "met": met, "measured": {"peak_rss_gb": row["peak_rss_gb"], "seconds": row["seconds"]}}
        out.setdefault("memory model within 25% at every stage", {"met": True, "worst": 0.0})
        if row["exit_code"] != 0:  # refused up front by the plan (or failed): nothing ran to compare
            continue
        worst = out["memory model within 25% at every stage"]
        worst["worst"] = max(worst["worst"], abs(row.get("rss_prediction_error", 0)))
        worst["met"] = worst["worst"] <= 0.25
    rows = {r["name"]: r for r in data.get("decode", {}).get("rows", []) if "decode" in r}
    if "openmythos" in rows and "eager" in rows:
        ratio = rows["openmythos"]["decode"]["p50_ms"] / rows["eager"]["decode"]["p50_ms"]
        out["eager decode at least as fast as OpenMythos"] = {"met": ratio >= 1.0, "speedup": round(ratio, 3)}
    int4 = [r for name, r in rows.items() if name.startswith("onnxruntime int4")]
    if int4:  # the fastest int4 artifact of the run (block 32, the default, or 128)
        r = min(int4, key=lambda r: r["decode"]["p50_ms"])
        out["int4 decode >= 5x OpenMythos"] = {"met": r.get("speedup_vs_openmythos", 0) >= 5, "row": r["name"],
                                               "speedup": round(r.get("speedup_vs_openmythos", 0), 2)}
        out["int4 decode within 1.6x of its floor"] = {"met": r["x_floor"] <= 1.6, "row": r["name"],
                                                       "x_floor": round(r["x_floor"], 2)}
    return out


def repredict(path: Path) -> dict:
    from mythos_deploy.config import MythosConfig
    data = json.loads(path.read_text())
    cfg = MythosConfig.from_name(data["preset"])
    for row in data["stages"]:
        predict(cfg, row)
    if data["preset"] in TARGETS:
        data["targets"] = targets(data)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--workdir", default="/tmp/mythos-scale")
    ap.add_argument("--stages", default="init,export,export+gate,int8,int4,generate,decode",
                    help="Comma-separated, in order. Also: " + ", ".join([*MODES, *ON_PLUGIN]) +
                    " (the other export forms, ungated, and the TensorRT stages on the plugin export).")
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force-plan", action="store_true", help="Pass --force-plan to onnx and quantize.")
    ap.add_argument("--keep", action="store_true", help="Keep the work directory (checkpoint and artifacts).")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true", help="Replace only the rows of the stages run now in an existing "
                                                         "results file (the others keep their last measurement).")
    ap.add_argument("--repredict", metavar="JSON", help="Only recompute the memory model's predictions in a "
                                                        "results file (after its coefficients changed).")
    args = ap.parse_args(argv)
    if args.repredict:
        return repredict(Path(args.repredict))
    from mythos_deploy.config import MythosConfig
    from mythos_deploy.plan import weight_bytes

    cfg = MythosConfig.from_name(args.preset)
    work = Path(args.workdir) / args.preset
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "mythos_deploy.cli"]
    paths = {"preset": args.preset, "ckpt": work / "ckpt", "onnx": work / "onnx-loop-ort",
             "int8": work / "int8", "int4": work / "int4", "int4-b128": work / "int4-b128"}
    stages = args.stages.split(",")
    if "export+gate" not in stages:  # a model too large for the gate here: quantize the ungated export
        paths["onnx"] = work / "onnx-nogate"
    log = lambda s: print(f"[scale {time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    outputs = {"init": paths["ckpt"], "export": work / "onnx-nogate", "export+gate": paths["onnx"],
               **{k: paths[k] for k in ("int8", "int4", "int4-b128")}, **{m: work / f"onnx-{m}" for m in MODES},
               **{q: work / q for q in ("qdq-int4", "qdq-int8")}}

    def quantize(key: str, src: Path, mode: str, *extra: str) -> tuple[str, list[str]]:
        return "quantize", cli + ["quantize", str(src), "-o", str(outputs[key]), "--mode", mode, *extra, "--force",
                                  "--accept-accuracy-loss", "--json"]

    commands = {
        "init": ("init", cli + ["init", "--preset", args.preset, "--seed", "0", "-o", str(paths["ckpt"]), "--force"]),
        "export": ("export", cli + ["onnx", str(paths["ckpt"]), "-o", str(outputs["export"]), "--loop", "loop",
                                    "--moe", "ort", "--no-validate", "--force"]),
        "export+gate": ("export+gate", cli + ["onnx", str(paths["ckpt"]), "-o", str(paths["onnx"]), "--loop", "loop",
                                              "--moe", "ort", "--force"]),
        "int8": quantize("int8", paths["onnx"], "int8"),
        "int4": quantize("int4", paths["onnx"], "int4"),
        # the same with one scale per 128 weights instead of 32: 15% fewer bytes per token
        "int4-b128": quantize("int4-b128", paths["onnx"], "int4", "--block-size", "128"),
        "generate": ("generate", cli + ["generate", str(paths["int4"]), "--prompt-ids", "1,2,3,4,5,6,7,8",
                                        "--max-new-tokens", "8", "--json"]),
        **{m: ("export", cli + ["onnx", str(paths["ckpt"]), "-o", str(outputs[m]), *flags, "--no-validate",
                                "--force"]) for m, flags in MODES.items()},
        "qdq-int4": quantize("qdq-int4", outputs["plugin"], "qdq-int4"),
        "qdq-int8": quantize("qdq-int8", outputs["plugin"], "qdq-int8"),
        "build-dry-run": ("build", cli + ["build", str(outputs["plugin"]), "-o", str(work / "engine"), "--dry-run"]),
    }
    rows = []
    for key in stages:
        if key not in commands:
            continue
        plan_key, argv_ = commands[key]
        row = run_stage(key, argv_ + (["--force-plan"] if args.force_plan and plan_key in ("export", "export+gate", "quantize")
                                      else []), log)
        predict(cfg, row)
        if plan_key == "quantize" and row["exit_code"] == 0:
            try:
                result = json.loads("".join(l for l in row.pop("output_tail")))  # noqa: E741
            except ValueError:
                result = None
            out_json = outputs[key] / "validation.json"
            if out_json.exists():
                row["gate"] = json.loads(out_json.read_text())["quantization_gate"]
            row["result"] = result
        row["artifact_bytes"] = dir_bytes(outputs[key]) if key in outputs else None
        rows.append(row)
        if key == "export" and "export+gate" in stages and outputs["export"].exists():
            shutil.rmtree(outputs["export"])  # the same graph as the gated export; only its cost is measured
        # each export form and Q/DQ artifact is only measured; the plugin export waits for the stages run on it
        done = [outputs[key]] if (key in MODES and key != "plugin") or key in ("qdq-int4", "qdq-int8") else []
        if key in ON_PLUGIN + ("plugin",) and not any(k in ON_PLUGIN for k in stages[stages.index(key) + 1:]):
            done.append(outputs["plugin"])
        for d in done:
            shutil.rmtree(d, ignore_errors=True)
    W, experts = weight_bytes(cfg)
    data = {"benchmark": "scale", "preset": args.preset, "machine": machine(),
            "weights_bytes_fp32": W, "routed_expert_bytes_fp32": experts, "stages": rows}
    if "decode" in stages:
        data["decode"] = decode_table(cfg, paths, args.prompt, args.new_tokens, args.threads, log)
    out_path = Path(args.out or f"benchmarks/results/scale_{args.preset}.json")
    if args.merge and out_path.exists():  # rows of stages not run this time are kept from the last run
        old = json.loads(out_path.read_text())
        ran = {r["stage"] for r in rows}
        data["stages"] = [r for r in old["stages"] if r["stage"] not in ran] + rows
        order = {k: i for i, k in enumerate(commands)}
        data["stages"].sort(key=lambda r: order.get(r["stage"], len(order)))
        if "decode" not in stages and "decode" in old:
            data["decode"] = old["decode"]
        data["merged_from"] = old.get("timestamp")
    if args.preset in TARGETS:
        data["targets"] = targets(data)
    out = write_json(out_path, data)
    log(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"stages": [{k: r.get(k) for k in ("stage", "exit_code", "seconds", "peak_rss_gb",
                                                          "predicted_peak_rss_gb")} for r in rows]}, indent=2))
    return data


if __name__ == "__main__":
    main()
