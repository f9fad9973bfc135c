"""Render benchmark JSON results as the markdown tables the README quotes.

    .venv/bin/python -m benchmarks.report [benchmarks/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def runtime(d: dict) -> str:
    lines = [f"`{d['preset']}` preset, batch 1, prompt {d['prompt']}, {d['new_tokens']} new tokens, "
             f"{d['loops']} loops, {d['threads']} threads; copy bandwidth {d['copy_bandwidth_gbs']:.1f} GB/s, "
             f"floor {d['bandwidth_floor']['ms_per_token']:.2f} ms/token at {d['loops']} loops "
             f"({d['bandwidth_floor']['total'] / 1e6:.0f} MB read per token).", "",
             "| configuration | decode p50 ms | p90 ms | prefill tok/s | x OpenMythos | x own floor | loops run | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in d["results"]:
        lines.append(f"| {r['name']} | {r['decode']['p50_ms']:.2f} | {r['decode']['p90_ms']:.2f} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {r['speedup_vs_openmythos']:.2f} | {r['x_floor']:.2f} | "
                     f"{r['mean_loops_run']:.1f} | {r['peak_rss_mb']:.0f} |")
    t = d["targets"]
    a, b = t["ort_fp32_decode_3x_faster_than_openmythos"], t["best_within_2x_of_floor"]
    lines += ["", f"- onnxruntime fp32 decode >= 3x OpenMythos (exit none): best {a['best_ort_exit_none']} at "
              f"{a['speedup']:.2f}x: **{'met' if a['met'] else 'not met'}**",
              f"- best configuration within 2x of its bandwidth floor: {b['best']} at {b['x_floor']:.2f}x: "
              f"**{'met' if b['met'] else 'not met'}**"]
    return "\n".join(lines)


def fill_forward(d: dict) -> str:
    lines = ["| model | threshold | loops exact -> fill-forward | loops saved | argmax agreement | max abs logit error | free-run identical prefix | halting depths (loops: tokens) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in d["results"]:
        depths = ", ".join(f"{k}: {v}" for k, v in r["halting_depth_histogram"].items())
        lines.append(f"| {r['model']} | {r['act_threshold']} | {r['mean_loops_run_exact']:.2f} -> "
                     f"{r['mean_loops_run_fill_forward']:.2f} | {r['loops_saved']:.0%} | {r['greedy_agreement']:.3f} | "
                     f"{r['max_abs_logit_error']:.3g} | {r['free_running_identical_prefix']}/{r['tokens'] - 8} | {depths} |")
    return "\n".join(lines)


def export(d: dict) -> str:
    lines = [f"`{d['preset']}` preset ({d['parameters'] / 1e6:.1f}M parameters); torch export of the stepped "
             f"graphs {d['torch_export_s']:.1f} s, shared by every composed configuration.", "",
             "| loop | MoE | `--loop-export` | nodes (all graphs, subgraphs included) | file MiB | export s | decode p50 ms |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in d["results"]:
        dec = f"{r['decode_p50_ms']:.2f}" if "decode_p50_ms" in r else ""
        lines.append(f"| {r['loop']} | {r['moe']} | {r.get('loop_export') or '-'} | {sum(r['nodes'].values())} | "
                     f"{r['file_bytes'] / 2**20:.1f} | {r['export_s']:.1f} | {dec} |")
    if "loop_decode_while_loop_over_compose" in d:
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in d["loop_decode_while_loop_over_compose"].items())
        lines += ["", f"`loop` decode time, while_loop / compose, same run: {ratios}."]
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    for name, fn in (("runtime.json", runtime), ("fill_forward.json", fill_forward), ("export.json", export)):
        path = root / name
        if path.exists():
            print(f"### {name}\n\n{fn(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main()
