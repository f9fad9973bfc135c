"""Commands that make artifacts: onnx, quantize, lint, build, plugin-kernels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mythos_deploy.cli.app import app, out, err, handle_errors, fmt_bytes, stage_progress
from mythos_deploy.errors import InputError
from mythos_deploy.options import (ExportDtype, LoopExport, LoopMode, MlaForm, MoeLowering, PastForm, PluginMode,
                                   Precision, QuantMode)


def print_validation(report: dict) -> None:
    t = Table(title=f"parity vs eager ({report['dtype']}, {report['loop_mode']})")
    for col in ("scenario", "output", "max abs", "max rel", "limit", ""):
        t.add_column(col, justify="right" if col.startswith("max") or col == "limit" else "left")
    worst: dict[tuple, dict] = {}
    for o in report["outputs"]:
        key = (o["scenario"], "new_* (cache)" if o["output"].startswith("new_") else o["output"])
        if key not in worst or o["max_abs"] / o["limit"] > worst[key]["max_abs"] / worst[key]["limit"]:
            worst[key] = o  # the cache slot closest to (or furthest past) its limit
    for (scenario, output), o in worst.items():
        mark = "[green]ok[/green]" if o["ok"] else "[bold red]FAIL[/bold red]"
        t.add_row(scenario, output, f"{o['max_abs']:.2e}", f"{o['max_rel']:.2e}", f"{o['limit']:.3g}", mark)
    out.print(t)
    out.print(f"greedy agreement {report['greedy_agreement']:.4f} over {report['greedy_positions']} positions; "
              f"loops_used mismatches {report['loops_used_mismatches']}/{report['loops_used_positions']}")
    if report.get("note"):
        out.print(f"[yellow]note:[/yellow] {report['note']}")


@app.command("onnx", epilog="Examples:\n\n"
             "mythos-export onnx ckpt/tiny -o out/tiny-onnx\n\n"
             "mythos-export onnx ckpt/tiny -o out/tiny-loop --loop loop --moe ort\n\n"
             "mythos-export onnx ckpt/tiny -o out/tiny-trt --loop stepped --moe plugin --dtype fp16")
def onnx_cmd(
    path: Path = typer.Argument(..., help="A checkpoint directory."),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX artifact directory to create."),
    loop: LoopMode = typer.Option(LoopMode.UNROLL, help="unroll: n_loops fixed in the graph; loop: one ONNX Loop, n_loops and "
                                            "act_threshold are inputs; stepped: prelude/step/coda graphs for a runtime-driven loop."),
    loops: Optional[int] = typer.Option(None, help="Loop count (unroll) / default loop count recorded in the manifest. Default: max_loop_iters."),
    moe: MoeLowering = typer.Option(MoeLowering.STANDARD, help="MoE lowering. standard: plain ONNX ops (runs anywhere); ort: onnxruntime com.microsoft::MoE "
                                             "(fp32 on CPU); plugin: the TensorRT MythosMoE plugin node."),
    opset: int = typer.Option(18, help="ONNX opset (>= 18)."),
    dtype: ExportDtype = typer.Option(ExportDtype.FP32, help="fp32 or fp16 weights and activations (ACT accumulators stay fp32)."),
    mla: MlaForm = typer.Option(MlaForm.ABSORBED, help="MLA attention in the graph. absorbed: kv_up folded into query/output (DeepSeek-V2), "
                                             "attention in latent space, fastest decode; expanded: OpenMythos's form."),
    past: Optional[PastForm] = typer.Option(None, help="Cache rows the graph reads. sliced: only the filled ones, so decode cost follows "
                                                  "the context, not the runtime's buffer (onnxruntime); masked: the whole buffer "
                                                  "with unfilled rows masked, static shapes (TensorRT, CUDA graphs). "
                                                  "Default: masked with --moe plugin, else sliced."),
    loop_export: LoopExport = typer.Option(LoopExport.COMPOSE, "--loop-export",
                                    help="How a --loop loop graph is built. compose: the exported core-step graph placed "
                                         "in an ONNX Loop (the same step graph as --loop stepped); while_loop: the whole "
                                         "model through torch.export while_loop, lowered to an ONNX Loop by torch.onnx."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the onnxruntime parity gate (not recommended)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    force_plan: bool = typer.Option(False, "--force-plan", help="Run even if the memory model predicts the export will "
                                                                "not fit this machine's RAM or disk."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and validation report as JSON."),
) -> None:
    """Export a checkpoint to ONNX and gate it on parity with eager PyTorch.

    The artifact holds the graph(s), manifest.json (options, source sha256, the I/O contract,
    sha256 of every file) and validation.json. Outputs that differ from eager beyond
    tolerance exit with status 4 and write nothing.
    """
    with handle_errors():
        from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
        from mythos_deploy.errors import ParityError

        opts = OnnxExportOptions(loop=loop, loops=loops, moe=moe, opset=opset, dtype=dtype, validate=not no_validate, mla=mla,
                                 past=past, loop_export=loop_export)
        from mythos_deploy.checkpoint import load_config
        from mythos_deploy.plan import check_plan, plan_stage
        plan = plan_stage(load_config(path), "export" if no_validate else "export+gate", str(dtype), moe=str(moe))
        line = check_plan(plan, output, force_plan)  # refused up front, not at minute 2
        if not as_json:
            err.print(f"plan: {escape(line)}")
        try:
            with stage_progress(plan.seconds, quiet=as_json) as stage:
                result = export_onnx(path, output, opts, overwrite=force, stage=stage)
        except ParityError as exc:  # the report is printed after the live display is gone
            if exc.report:
                if as_json:
                    print(json.dumps({"validation": exc.report}, indent=2))
                else:
                    print_validation(exc.report)
            raise
        if as_json:
            print(json.dumps({"manifest": result.manifest, "validation": result.report}, indent=2))
            return
        if result.report:
            print_validation(result.report)
        size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
        out.print(f"wrote {output} ({', '.join(result.manifest['graphs'].values())}; "
                  f"{fmt_bytes(size)}) in {result.seconds:.1f} s")

@app.command(epilog="Examples: mythos-export quantize out/tiny-onnx -o out/tiny-int8 --mode int8\n\n"
                    "mythos-export quantize out/tiny-onnx -o out/tiny-int4 --mode int4 --block-size 32\n\n"
                    "mythos-export quantize out/tiny-trt -o out/tiny-qdq8 --mode qdq-int8 --calib 16")
def quantize(
    path: Path = typer.Argument(..., help="An fp32 ONNX artifact directory (onnxruntime modes: --moe standard or ort; "
                                          "TensorRT modes: --loop unroll or stepped, --moe plugin or standard)."),
    output: Path = typer.Option(..., "-o", "--output", help="Quantized artifact directory to create."),
    mode: QuantMode = typer.Option(QuantMode.INT8, help="onnxruntime CPU: int8 (MatMulNBits int8 weight blocks, int8 activations quantized at run time; "
                                          "embedding int8 too; int8 experts with --moe standard, QMoE with --moe ort), int4 (the same "
                                          "with int4 weights; Jetson-class memory savings), fp16 (native fp16 re-export; GPUs). TensorRT explicit Q/DQ: qdq-int8 "
                                          "(int8 weights + calibrated int8 activations; any NVIDIA GPU incl. Jetson Orin), "
                                          "qdq-int4 (int4 weight-only blocks; Ampere+ incl. Jetson Orin), fp8 (E4M3 weights + "
                                          "activations; Hopper/Ada only: H100/H200/L4/L40, not Jetson Orin)."),
    calib: int = typer.Option(8, "--calib", help="qdq-int8/fp8: generated calibration prompts (16 random tokens + 16 greedy)."),
    gate_tokens: int = typer.Option(256, "--gate-tokens", help="Positions the accuracy gate compares (teacher-forced greedy tokens)."),
    exclude: List[str] = typer.Option([], "--exclude", metavar="NAME", help="Keep nodes whose name contains this in float (repeatable)."),
    block_size: int = typer.Option(32, help="int8 / int4 / qdq-int4 weight block size along K (one scale per block per output channel)."),
    accuracy_level: int = typer.Option(4, help="int8 / int4 accuracy level of MatMulNBits and of blocked QMoE experts "
                                               "(4 = int8 activations and dot products, fastest on CPU; 0 = fp32 activations)."),
    accept_accuracy_loss: bool = typer.Option(False, "--accept-accuracy-loss", help="Write the artifact even if the gate fails (recorded in the manifest)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    force_plan: bool = typer.Option(False, "--force-plan", help="Run even if the memory model predicts it will not fit "
                                                                "this machine's RAM or disk."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantize an ONNX export for onnxruntime or TensorRT, gated on greedy agreement with the
    fp32 export (int8/qdq-int8/fp8 >= 98%, int4/qdq-int4 >= 90%; fp16 uses the export's fp16
    parity gate) and, for train-demo checkpoints, on task accuracy. TensorRT modes are also
    linted for TensorRT's parser; their gate runs in onnxruntime on the same numbers."""
    with handle_errors():
        from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
        from mythos_deploy.errors import ParityError

        opts = QuantizeOptions(mode=mode, block_size=block_size, accuracy_level=accuracy_level, exclude=tuple(exclude),
                               gate_tokens=gate_tokens, calib_prompts=calib, accept_accuracy_loss=accept_accuracy_loss)
        from mythos_deploy.config import MythosConfig
        from mythos_deploy.manifest import read_manifest
        from mythos_deploy.plan import check_plan, plan_stage
        planned = None
        if (path / "manifest.json").is_file():
            manifest = read_manifest(path)
            if isinstance(manifest.get("config"), dict):
                cfg = MythosConfig.from_dict(manifest["config"])
                plan = plan_stage(cfg, "quantize", quant=str(mode))
                line = check_plan(plan, output, force_plan)
                planned = plan.seconds if str(mode) in ("int8", "int4") else None  # fitted for these
                if not as_json:
                    err.print(f"plan: {escape(line)}")
        with stage_progress(planned, quiet=as_json) as stage:
            try:
                result = quantize_artifact(path, output, opts, overwrite=force, stage=stage)
            except ParityError as exc:
                if exc.report and as_json:
                    print(json.dumps({"gate": exc.report}, indent=2))
                raise
        if as_json:
            print(json.dumps({"gate": result.gate, "sizes": result.sizes, "seconds": result.seconds}, indent=2))
            return
        g, z = result.gate, result.sizes
        out.print(f"wrote {output} ({mode}): {fmt_bytes(z['quantized_bytes'])} vs {fmt_bytes(z['source_bytes'])} fp32 "
                  f"({z['source_bytes'] / max(z['quantized_bytes'], 1):.1f}x smaller); greedy agreement "
                  f"{g['greedy_agreement']:.4f}{' (gate overridden)' if g.get('overridden') else ''}")
        if g.get("task"):
            t = g["task"]
            out.print(f"task accuracy (multi-hop, hops 1-4, {t['problems']} problems): {t['accuracy']:.3f} vs fp32 "
                      f"{t['accuracy_fp32']:.3f} ({t['drop_points']:+.2f} points drop; gate {t['max_drop_points']})")
        if mode == QuantMode.INT4 and result.manifest["options"].get("moe") == MoeLowering.STANDARD:
            err.print("note: with the standard MoE lowering, int4 expert tables are dequantized on every call, so "
                      "CPU decode is slower than fp32; for speed, quantize an export made with --moe ort (QMoE)")


@app.command(epilog="Examples: mythos-export lint out/tiny-trt --target trt\n\nmythos-export lint out/tiny-onnx --json")
def lint(
    path: Path = typer.Argument(..., help="An ONNX artifact directory."),
    target: str = typer.Option("trt", metavar="trt", help="Target to lint for (trt: TensorRT 10.1's ONNX parser)."),
    show_info: bool = typer.Option(False, "--info", help="Also list informational findings."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """Check an export against TensorRT's ONNX parser without TensorRT: ops and types, opset and
    IR version, Loop/If/TopK/axes restrictions, plugin attributes, Q/DQ zero points. Exit 1 on errors."""
    with handle_errors():
        from mythos_deploy.exporters.trt_lint import lint_artifact
        if target != "trt":
            raise InputError(f"--target must be trt, got {target!r}")
        report = lint_artifact(path)
        if as_json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            shown = [f for f in report.findings if show_info or f.severity != "info"]
            if shown:
                t = Table(title=f"{escape(report.target)} lint: {escape(str(path))}")
                for col in ("severity", "graph", "node", "op", "message"):
                    t.add_column(col)
                for f in shown:
                    color = {"error": "red", "warning": "yellow"}.get(f.severity, "dim")
                    t.add_row(f"[{color}]{f.severity}[/{color}]", f.graph, escape(f.node), f.op, escape(f.message))
                out.print(t)
            verdict = "[green]passes[/green]" if report.passed else "[bold red]fails[/bold red]"
            out.print(f"{verdict}: {report.errors} error(s), {report.warnings} warning(s)")
        if not report.passed:
            raise typer.Exit(1)


@app.command(epilog="Examples: mythos-export build out/tiny-trt -o out/tiny-engines --precision fp16\n\n"
                    "mythos-export build out/tiny-qdq8 -o out/tiny-int8 --precision int8 --profile batch=1:1:8 "
                    "--timing-cache out/trt.cache\n\n"
                    "mythos-export build out/tiny-trt -o x --dry-run   (profiles and checks, no TensorRT needed)")
def build(
    path: Path = typer.Argument(..., help="An ONNX artifact: --loop unroll or stepped, --moe plugin (or standard); "
                                          "Q/DQ-quantized ones too."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine directory to create (engines + manifest.json)."),
    precision: Precision = typer.Option(Precision.FP16, help="fp32 | fp16 | bf16 | int8 (needs a qdq-int8 artifact) | fp8 (needs an fp8 "
                                               "artifact; Hopper/Ada). Jetson Orin: fp16, int8."),
    profile: List[str] = typer.Option([], "--profile", metavar="AXIS=MIN:OPT:MAX", help="AXIS=MIN:OPT:MAX for batch, seq, past or loops (repeatable). "
                                                            "Defaults: batch=1:1:4, seq=1:32:max_seq_len, past=0:64:max_seq_len."),
    decode_profile: bool = typer.Option(True, "--decode-profile/--no-decode-profile",
                                        help="Add a second optimization profile with seq=1 (decode)."),
    workspace: int = typer.Option(4096, "--workspace", help="Builder workspace limit, MiB."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Read and update this timing cache file "
                                                                              "(faster rebuilds)."),
    plugin: PluginMode = typer.Option(PluginMode.AOT, help="aot: the MoE kernel is compiled into the engine (runs without Python); "
                                           "jit: the plugin's Python implementation runs at inference time."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the artifact, lint it and print the optimization "
                                                          "profiles; build nothing (works without TensorRT)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build TensorRT engines from an ONNX export: parse, register the MythosMoE plugin, set
    optimization profiles from the I/O contract, build each graph, write atomically. Needs
    TensorRT (pip install 'mythos-deploy[tensorrt]'); everything before it runs anywhere."""
    with handle_errors():
        from mythos_deploy.exporters.trt_build import BuildOptions, build_engines, parse_profile, plan

        opts = BuildOptions(precision=precision, profile=parse_profile(profile), decode_profile=decode_profile,
                            workspace_mib=workspace, timing_cache=str(timing_cache) if timing_cache else None, plugin=plugin)
        if dry_run:
            p = plan(path, opts)
            if as_json:
                print(json.dumps(p.to_dict(), indent=2))
                return
            t = Table(title=f"TensorRT build plan: {escape(str(path))} ({precision})")
            for col in ("graph", "profile", "input", "min", "opt", "max"):
                t.add_column(col, no_wrap=col == "input")
            for g, profs in p.profiles.items():
                for pname, shapes in profs.items():
                    for name, (lo, opt, hi) in shapes.items():
                        t.add_row(g, pname, name, str(lo), str(opt), str(hi))
            out.print(t)
            out.print("dry run: checks and lint pass; nothing built")
            return
        with stage_progress(None, quiet=as_json) as stage:
            result = build_engines(path, output, opts, overwrite=force, stage=stage)
        if as_json:
            print(json.dumps({"manifest": result.manifest, "seconds": result.seconds}, indent=2))
            return
        out.print(f"wrote {output}: {', '.join(result.manifest['engines'].values())} in {result.seconds:.1f} s")


@app.command("plugin-kernels", epilog="Example: mythos-export plugin-kernels -o out/moe-kernels --sm 87 --sm 90 --dtype fp16")
def plugin_kernels(
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the PTX/cubin files and kernels.json."),
    sm: List[int] = typer.Option([87, 90], "--sm", help="CUDA compute capability (87 Jetson Orin, 90 H100/H200); repeatable."),
    dtype: List[str] = typer.Option(["fp32", "fp16", "bf16"], "--dtype", help="Kernel storage type; repeatable."),
) -> None:
    """Compile the MoE plugin's Triton kernels ahead of time to PTX and cubin (no GPU needed)."""
    with handle_errors():
        import os
        from mythos_deploy.moe_aot import DTYPES, compile_kernels
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise InputError("unset TRITON_INTERPRET to compile kernels (the interpreter replaces the compiler)")
        bad = [d for d in dtype if d not in DTYPES]
        if bad or any(c < 70 for c in sm):
            raise InputError(f"--dtype must be among {', '.join(DTYPES)} and --sm >= 70; got {dtype}, {sm}")
        with err.status("compiling Triton kernels"):
            index = compile_kernels(output, tuple(dtype), tuple(sm))
        out.print(f"wrote {len(index['kernels'])} kernels (PTX + cubin) for sm {', '.join(map(str, sm))} to {output}")
