"""`quantize`: ONNX artifact -> quantized ONNX artifact for onnxruntime, gated on agreement.

Modes for onnxruntime CPU:
- `int8` / `int4`: 2-D weight MatMuls (Gemms with a constant weight rewritten as MatMul
  first) -> MatMulNBits with 8/4-bit symmetric weights in `--block-size` blocks along K,
  accuracy level 4 by default (int8 activations quantized at run time: fast on CPU); the
  tied embedding gathers quantized rows of the head (GatherBlockQuantized); the `standard`
  lowering's routed experts become int8 tables read by integer MatMuls (MatMulInteger on
  the gathered int8 rows) or int4 blocks (GatherBlockQuantized, dequantized per call).
- `fp16`: a native fp16 re-export of the artifact's source checkpoint (recorded in its
  manifest and checked by sha256) with the same options, gated by the export's own fp16
  parity gate against eager fp32. onnxruntime's float16 converter is not used: on these
  graphs it leaves dangling names inside nested Loop/If bodies. For GPUs; onnxruntime CPU
  runs fp16 slowly.
With the `ort` lowering, int8/int4 turn com.microsoft::MoE into com.microsoft::QMoE (int8 per
output row; int4 blocked). `plugin` artifacts are refused (their expert weights belong to the
TensorRT plugin path; see the Q/DQ modes).

Modes for TensorRT (explicit quantization; exporters/qdq.py): `qdq-int8`, `qdq-int4`, `fp8` on
`unroll` or `stepped` exports with the `plugin` or `standard` lowering. Their accuracy gate runs
in onnxruntime on the graph with plugin nodes swapped for their standard form (and int4 weights
dequantized), and every graph must pass the TensorRT lint with no error.

Gate: against the source artifact on fixed prompts (teacher forcing, >= 256 positions):
greedy agreement >= 98% (int8), >= 90% (int4), >= 99% (fp16), and finite logits. When the
source checkpoint was made by `train-demo`, also task accuracy on 400 multi-hop problems
(MAX_TASK_DROP points below the fp32 export at most).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mythos_deploy.exporters.graph_passes import release_memory
from mythos_deploy.exporters.quant_graph import quantize_graph
from mythos_deploy.errors import CheckpointError, InputError, ParityError
from mythos_deploy.manifest import Manifest, atomic_output_dir, carried_fields, check_writable, read_manifest, write_manifest
from mythos_deploy.tokenizer import carry_tokenizer
from mythos_deploy.options import ExportDtype, LoopMode, MoeLowering, QuantMode, choose, plain_dict

MIN_AGREEMENT = {"int8": 0.98, "int4": 0.90, "fp16": 0.99, "qdq-int8": 0.98, "qdq-int4": 0.90, "fp8": 0.98}
# on a model trained on the multi-hop task (the demo checkpoint): largest allowed drop in task
# accuracy (hops 1-4 at the trained depth, 100 problems each), in percentage points
MAX_TASK_DROP = {"int8": 1.0, "int4": 3.0, "fp16": 0.5, "qdq-int8": 1.0, "qdq-int4": 3.0, "fp8": 1.0}
TASK_HOPS, TASK_COUNT = (1, 2, 3, 4), 100


def _trained_on_hops(manifest: Manifest) -> bool:
    """Whether the export's source checkpoint is a train-demo checkpoint (task accuracy applies)."""
    ckpt = Path(manifest.source.get("checkpoint", ""))
    try:
        src = read_manifest(ckpt)
    except Exception:  # missing or unreadable: no task gate, the logit gate still applies
        return False
    return src.get("source", {}).get("task") == "hops"


def task_gate(base, quant, mode: str) -> dict:
    """Task accuracy of the fp32 and quantized artifacts on the same problems."""
    from mythos_deploy.runtimes import hops_eval
    a = hops_eval.evaluate(base, TASK_HOPS, (base.default_loops,), TASK_COUNT)
    b = hops_eval.evaluate(quant, TASK_HOPS, (quant.default_loops,), TASK_COUNT)
    acc_a = float(np.mean([c["accuracy"] for c in a["cells"]]))
    acc_b = float(np.mean([c["accuracy"] for c in b["cells"]]))
    drop = round((acc_a - acc_b) * 100, 2)
    return {"task": "hops 1-4", "problems": TASK_COUNT * len(TASK_HOPS), "accuracy_fp32": acc_a,
            "accuracy": acc_b, "drop_points": drop, "max_drop_points": MAX_TASK_DROP[mode],
            "by_hops": {c["hops"]: c["accuracy"] for c in b["cells"]}, "passed": drop <= MAX_TASK_DROP[mode]}


@dataclass(frozen=True)
class QuantizeOptions:
    mode: QuantMode = QuantMode.INT8
    block_size: int = 32  # int4
    accuracy_level: int = 4  # int4: 4 = int8 compute (fast); 0 = fp32 compute
    exclude: tuple[str, ...] = ()  # node names (or substrings) left in float
    gate_tokens: int = 256
    calib_prompts: int = 8  # qdq-int8 / fp8 activation calibration
    accept_accuracy_loss: bool = False  # record and skip the gate

    def __post_init__(self):
        object.__setattr__(self, "mode", choose(QuantMode, self.mode, "--mode"))

    def to_dict(self) -> dict:
        return plain_dict(self)

    def check(self) -> None:
        if self.block_size not in (16, 32, 64, 128, 256):
            raise InputError(f"--block-size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"--accuracy-level must be in 0..4, got {self.accuracy_level}")
        if self.gate_tokens < 16:
            raise InputError(f"--gate-tokens must be >= 16, got {self.gate_tokens}")
        if not 1 <= self.calib_prompts <= 1024:
            raise InputError(f"--calib must be in 1..1024 prompts, got {self.calib_prompts}")


@dataclass(frozen=True)
class QuantizeResult:
    manifest: dict  # the quantized artifact's manifest, as written
    gate: dict  # the accuracy gate: agreement, task accuracy, passed / overridden
    sizes: dict  # source_bytes, quantized_bytes (graph files)
    seconds: float


def _sizes(src_dir: Path, out_dir: Path, files: dict[str, str]) -> dict[str, int]:
    """Bytes of the source and the quantized graph files."""
    def size(d: Path) -> int:  # graphs and their external data
        return sum(p.stat().st_size for f in files.values() for p in (d / f, d / f"{f}.data") if p.is_file())
    return {"source_bytes": size(src_dir), "quantized_bytes": size(out_dir)}


def quantize_artifact(src_dir: str | Path, out_dir: str | Path, opts: QuantizeOptions = QuantizeOptions(),
                      overwrite: bool = False, stage: Callable[[str], None] | None = None) -> QuantizeResult:
    from mythos_deploy.runtimes.loader import load
    from mythos_deploy.runtimes.onnx_runner import artifact_files, open_onnx_artifact
    from mythos_deploy.runtimes.parity import compare_to, record
    stage = stage or (lambda s: None)
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    opts.check()
    manifest, _ = open_onnx_artifact(src_dir, "quantize")
    if manifest.quantization:
        raise InputError(f"{src_dir} is already quantized ({manifest.quantization['mode']}); quantize the fp32 export")
    options = manifest.options
    if opts.mode.is_qdq:
        if options.loop == LoopMode.LOOP and opts.mode != QuantMode.QDQ_INT4:
            raise InputError(f"{opts.mode} takes a --loop unroll or --loop stepped export: activations inside an ONNX "
                             "Loop body cannot be calibrated (qdq-int4, weight-only, takes loop exports too)")
        if options.moe == MoeLowering.ORT:
            raise InputError(f"{opts.mode} is for TensorRT, which cannot parse the ort lowering's com.microsoft::MoE; "
                             "export with --moe plugin (or standard)")
    elif options.moe == MoeLowering.PLUGIN:
        raise InputError(f"this artifact uses the TensorRT MoE plugin; {opts.mode} is an onnxruntime mode and needs a "
                         "--moe standard or ort export (the TensorRT modes are qdq-int8, qdq-int4, fp8)")
    if options.dtype != ExportDtype.FP32:
        raise InputError(f"quantize an fp32 export (this one is {options.dtype})")
    check_writable(out_dir, overwrite)
    t0 = time.perf_counter()
    if opts.mode == QuantMode.FP16:
        return _fp16_reexport(src_dir, out_dir, manifest, opts, overwrite, stage, t0)
    files = artifact_files(manifest)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        from mythos_deploy.runtimes.onnxruntime_backend import OrtBackend
        if opts.mode.is_qdq:
            info, base, load_quant = _qdq_graphs(src_dir, work, files, manifest, opts, stage)
        else:
            info = {}
            for name, f in files.items():
                stage(f"quantize {f} ({opts.mode})")
                info[name] = quantize_graph(src_dir / f, work / f, opts.mode, options.moe, block_size=opts.block_size,
                                         accuracy_level=opts.accuracy_level, exclude=opts.exclude)
            release_memory()  # the graphs quantize_graph held are gone before a session loads
            base = load(src_dir, verify=False)
            load_quant = lambda: OrtBackend(work, manifest.with_fields(  # noqa: E731
                quantization={**opts.to_dict(), "graphs": info}))
        for f in files.values():
            if (work / f).stat().st_size == 0:
                raise ParityError(f"quantized {f} is empty")
        stage("accuracy gate")
        cfg = base.cfg
        per = min(64, cfg.max_seq_len - 8)
        n_prompts = max(1, -(-opts.gate_tokens // per))
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(n_prompts, 8)).tolist()
        # the fp32 run first, then the quantized one: the two sessions are never resident together
        reference = record(base, prompts, per)
        task_gate_needed = _trained_on_hops(manifest)
        if not task_gate_needed:
            base = None
            release_memory()
        quant = load_quant()
        parity = compare_to(reference, quant, tolerance=float("inf"), min_agreement=MIN_AGREEMENT[opts.mode])
        report = {**parity.to_dict(), "passed": bool(parity.passed and parity.all_finite)}
        task = None
        if task_gate_needed:
            stage("accuracy gate: task accuracy")
            task = task_gate(base, quant, opts.mode)
        passed = report["passed"] and (task is None or task["passed"])
        gate = {"positions": n_prompts * per, "greedy_agreement": parity.greedy_agreement,
                "min_agreement": MIN_AGREEMENT[opts.mode], "max_abs_logit_error": parity.max_abs_logit_error,
                "task": task, "passed": passed, "overridden": bool(opts.accept_accuracy_loss and not passed)}
        if not passed and not opts.accept_accuracy_loss:
            why = (f"greedy agreement {parity.greedy_agreement:.4f} < {MIN_AGREEMENT[opts.mode]} over "
                   f"{gate['positions']} positions (max abs logit error {parity.max_abs_logit_error:.3g})"
                   if not report["passed"] else
                   f"task accuracy {task['accuracy']:.3f} vs fp32 {task['accuracy_fp32']:.3f}: a drop of "
                   f"{task['drop_points']} points > {task['max_drop_points']}")
            raise ParityError(f"{opts.mode} quantization fails the accuracy gate: {why}; "
                              "--accept-accuracy-loss overrides (recorded in the manifest)", {**report, "task": task})
        stage("write artifact")
        with atomic_output_dir(out_dir, overwrite) as tmp:
            for f in files.values():
                for name in (f, f"{f}.data"):  # a graph and its external data, if it has any
                    if (work / name).is_file():
                        shutil.copyfile(work / name, tmp / name)
            (tmp / "validation.json").write_text(json.dumps({"quantization_gate": gate, "report": report}, indent=2) + "\n")
            fields = carried_fields(manifest.data)
            fields["quantization"] = {**opts.to_dict(), "graphs": info, "gate": gate,
                                      "source": {"artifact": str(src_dir)}}
            carry_tokenizer(src_dir, tmp)
            out_manifest = write_manifest(tmp, "onnx", **fields)
    return QuantizeResult(out_manifest, gate, _sizes(src_dir, out_dir, files), time.perf_counter() - t0)


def _qdq_graphs(src_dir: Path, work: Path, files: dict, manifest: Manifest, opts: QuantizeOptions, stage):
    """TensorRT Q/DQ: quantize each graph into `work` (the artifact's files), lint it, and
    return what was done, the fp32 source as onnxruntime runs it (a backend) and a function
    that loads the quantized graphs as onnxruntime runs them, both with plugin nodes in their
    standard form (int4 weights dequantized): the gate records the first, frees it, then loads
    the second. The graphs are read without their weights: each weight is read in place when
    it is quantized, and new large tensors (the standard lowering's expert tables, the gate's
    dequantized weights) go to a scratch store in `work`, so no graph is ever whole in memory."""
    import copy

    import onnx

    from mythos_deploy.exporters import qdq
    from mythos_deploy.exporters.external_data import adopt, clear_store, make_store, use_store, write_model
    from mythos_deploy.exporters.moe_lowering import lower_moe
    from mythos_deploy.exporters.graph_passes import IR_VERSION
    from mythos_deploy.exporters.onnx_ops import register_schemas
    from mythos_deploy.exporters.trt_lint import quant_param_findings, lint_model
    from mythos_deploy.errors import InternalError
    from mythos_deploy.runtimes.onnxruntime_backend import OrtBackend
    register_schemas()
    plugin = manifest.options.moe == MoeLowering.PLUGIN
    (work / "store").mkdir()
    store = make_store(work / "store")

    def graph(f: str):
        m = onnx.load(str(src_dir / f), load_external_data=False)
        adopt(m, src_dir)
        use_store(m, store)
        return m

    def runnable(m):  # a copy as onnxruntime runs it (the copy holds no weights: cheap)
        m = copy.deepcopy(m)
        return lower_moe(m, "standard") if plugin else m
    models = {name: graph(f) for name, f in files.items()}
    uses = {name: qdq.weight_matmuls(m, opts.exclude, subgraphs=opts.mode == "qdq-int4") for name, m in models.items()}
    kind = {"qdq-int8": "int8", "fp8": "fp8"}.get(opts.mode)
    amax = {}
    if kind:
        stage(f"calibrate activations ({opts.calib_prompts} generated prompts)")
        (work / "calib").mkdir()
        amax = qdq.calibrate({n: runnable(m) for n, m in models.items()}, {n: qdq.activations(u) for n, u in uses.items()},
                             manifest, work / "calib", n_prompts=opts.calib_prompts)
        shutil.rmtree(work / "calib")
        release_memory()
    std_manifest = manifest.with_options(moe=MoeLowering.STANDARD)
    (work / "ort").mkdir()
    if plugin:
        (work / "base").mkdir()
    info = {}
    for name, f in files.items():
        stage(f"quantize {f} ({opts.mode})")
        m = models[name]
        if plugin:
            write_model(runnable(m), work / "base", f)
        done = (qdq.insert_qdq(m, uses[name], amax.get(name, {}), kind) if kind
                else qdq.insert_int4(m, uses[name], opts.block_size))
        m.ir_version = IR_VERSION
        findings = [x for x in lint_model(m, name) + quant_param_findings(m) if x.severity == "error"]
        if findings:
            raise InternalError(f"{opts.mode} graph {f} fails the TensorRT lint: " + "; ".join(x.message for x in findings[:3]))
        write_model(m, work, f)  # external data above the threshold: past 2 GiB too
        onnx.checker.check_model(str(work / f), full_check=True)
        write_model(qdq.ort_copy(runnable(m)), work / "ort", f)
        models[name] = None  # its quantized weights (inline) are written
        clear_store(store)  # this graph's lowered tables and dequantized weights are written too
        info[name] = {"mode": opts.mode, **done, "target": "tensorrt (explicit quantization)",
                      "experts": ("float inside the MythosMoE plugin (no int path)" if plugin
                                  else "float (standard lowering's expert tables and If branches)"),
                      **({"block_size": opts.block_size} if opts.mode == "qdq-int4" else
                         {"calibration": f"max |x| over {opts.calib_prompts} generated prompts"})}
    release_memory()
    base = OrtBackend(work / "base" if plugin else src_dir, std_manifest if plugin else manifest)
    return info, base, lambda: OrtBackend(work / "ort", std_manifest.with_fields(quantization={"mode": str(opts.mode)}))


def _fp16_reexport(src_dir: Path, out_dir: Path, manifest: Manifest, opts: QuantizeOptions, overwrite: bool,
                   stage, t0: float) -> dict:
    """Re-export the source checkpoint in fp16 into scratch space (the export's fp16 parity gate
    runs there), add the task gate for train-demo checkpoints, then write OUT_DIR atomically."""
    from mythos_deploy.exporters.onnx_export import export_onnx
    from mythos_deploy.checkpoint import checkpoint_sha256
    from mythos_deploy.runtimes.loader import load
    from mythos_deploy.runtimes.onnx_runner import artifact_files
    from mythos_deploy.runtimes.onnxruntime_backend import OrtBackend
    source = manifest.source
    ckpt = Path(source.get("checkpoint", ""))
    if not (ckpt / "model.safetensors").is_file():
        raise InputError(f"--mode fp16 re-exports from the source checkpoint, which is not at {ckpt}; "
                         "run: mythos-export onnx CKPT --dtype fp16")
    if checkpoint_sha256(ckpt) != source.get("sha256"):
        raise CheckpointError(f"{ckpt} changed since {src_dir} was exported (sha256 differs)")
    if manifest.options.moe == MoeLowering.ORT:
        raise InputError("fp16 with the ort MoE lowering cannot be validated on onnxruntime CPU (fp32-only MoE kernel)")
    files = artifact_files(manifest)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "fp16"
        # the same export in fp16; its fp16 parity gate always runs
        again = dataclasses.replace(manifest.options, dtype=ExportDtype.FP16, validate=True)
        result = export_onnx(ckpt, work, again, stage=stage)
        exported = Manifest.read(work)
        task = None
        if _trained_on_hops(manifest):
            stage("accuracy gate: task accuracy")
            task = task_gate(load(src_dir, verify=False), OrtBackend(work, exported), opts.mode)
        passed = bool(result.report["passed"] and (task is None or task["passed"]))
        gate = {"passed": passed, "greedy_agreement": result.report["greedy_agreement"], "task": task,
                "method": "export parity gate (fp16 tolerances) against eager fp32",
                "overridden": bool(opts.accept_accuracy_loss and not passed)}
        if not passed and not opts.accept_accuracy_loss:
            raise ParityError(f"fp16 fails the accuracy gate: task accuracy {task['accuracy']:.3f} vs fp32 "
                              f"{task['accuracy_fp32']:.3f}: a drop of {task['drop_points']} points > "
                              f"{task['max_drop_points']}; --accept-accuracy-loss overrides (recorded in the manifest)",
                              {"task": task})
        stage("write artifact")
        with atomic_output_dir(out_dir, overwrite) as tmp:
            for f in exported.files:  # graphs, external weights, validation.json
                shutil.copyfile(work / f, tmp / f)
            fields = carried_fields(exported.data)
            fields["quantization"] = {**opts.to_dict(), "method": "native fp16 re-export", "gate": gate,
                                      "source": {"artifact": str(src_dir)}}
            carry_tokenizer(src_dir, tmp)
            out_manifest = write_manifest(tmp, "onnx", **fields)
    return QuantizeResult(out_manifest, gate, _sizes(src_dir, out_dir, files), time.perf_counter() - t0)
