"""`export_onnx`: checkpoint directory -> ONNX artifact directory, parity-gated.

Stages: load -> torch export of the stepped graphs -> the gate's eager reference (then the
torch weights are freed) -> compose (unroll | loop) -> MoE lowering -> onnx.checker + shape
inference + contract check -> write into a temporary directory -> onnxruntime parity gate on
those files -> manifest.json and validation.json -> rename to OUT_DIR. Any failure leaves no
OUT_DIR.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mythos_deploy.checkpoint import checkpoint_sha256, load_checkpoint
from mythos_deploy.exporters.external_data import DEFAULT_EXTERNAL_BYTES, external_bytes_threshold, write_model
from mythos_deploy.exporters.graph_passes import release_memory
from mythos_deploy.config import MythosConfig
from mythos_deploy.contract import GraphContract, contracts_for
from mythos_deploy.errors import InputError, InternalError, MissingDependencyError, ParityError
from mythos_deploy.manifest import atomic_output_dir, check_writable, write_manifest
from mythos_deploy.tokenizer import carry_tokenizer
from mythos_deploy.options import ExportDtype, LoopExport, LoopMode, MoeLowering, OnnxExportOptions

MIN_OPSET = 18  # torch's ONNX exporter emits opset >= 18; every lowering builds on it
MAX_UNROLL = 256
MAX_LOOPS = 4096
EXTERNAL_DATA_BYTES = DEFAULT_EXTERNAL_BYTES  # graphs above this keep their weights in <graph>.onnx.data
# models above this export through a weight store: in protobufs the weights are copied by every
# pass (a 112 MB model peaked at 1.8 GB); the artifact still inlines them below EXTERNAL_DATA_BYTES
STORE_BYTES = 32 << 20


def check_export_options(opts: OnnxExportOptions, cfg: MythosConfig) -> None:
    """What the options' own coercion cannot know: loop-count limits, the opset against this
    onnx, and combinations that cannot be exported or validated here. `opts` is resolved."""
    import onnx
    if opts.loop_export == LoopExport.WHILE_LOOP and opts.loop != LoopMode.LOOP:
        raise InputError(f"--loop-export while_loop builds a --loop loop graph; it does not apply to --loop {opts.loop}")
    if isinstance(opts.loops, bool) or not isinstance(opts.loops, int) or not 1 <= opts.loops <= MAX_LOOPS:
        raise InputError(f"--loops must be an integer in [1, {MAX_LOOPS}], got {opts.loops!r}")
    if opts.loop == LoopMode.UNROLL and opts.loops > MAX_UNROLL:
        raise InputError(f"--loops {opts.loops} is too deep to unroll (max {MAX_UNROLL}); use --loop loop")
    newest = onnx.defs.onnx_opset_version()
    if opts.opset < MIN_OPSET:
        raise InputError(f"--opset {opts.opset} is too old for --moe {opts.moe}: the exporter needs opset >= {MIN_OPSET}")
    if opts.opset > newest:
        raise InputError(f"--opset {opts.opset} is newer than this onnx ({onnx.__version__}) knows (max {newest})")
    if opts.moe == MoeLowering.ORT and opts.dtype == ExportDtype.FP16 and opts.validate:
        raise InputError("--moe ort with --dtype fp16 cannot be validated here: onnxruntime's CPU MoE "
                         "kernel is fp32 only (use --dtype fp32, or --no-validate for a CUDA EP target)")


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    report: dict | None
    seconds: float


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxscript ({exc.name} is missing): "
                                     "pip install onnx onnxscript") from None


def check_contract(model, contract: GraphContract) -> None:
    """Graph inputs/outputs must be exactly the contract's names, dtypes and shapes."""
    from onnx import helper

    def describe(vi):
        tt = vi.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim)
        return vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name, dims

    for kind, got, want in (("inputs", model.graph.input, contract.inputs),
                            ("outputs", model.graph.output, contract.outputs)):
        have = [describe(v) for v in got]
        need = [(s.name, s.dtype, tuple(s.shape)) for s in want]
        if have != need:
            raise InternalError(f"graph {contract.name!r} {kind} do not match the I/O contract:\n"
                                f"  graph:    {have}\n  contract: {need}")


def _check_graph(model, contract: GraphContract) -> None:
    import onnx

    from mythos_deploy.exporters.external_data import check_model_file
    from mythos_deploy.exporters.onnx_ops import register_schemas
    register_schemas()
    try:
        check_model_file(model, contract.name)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InternalError(f"graph {contract.name!r} fails onnx.checker/shape inference: {exc}") from None
    check_contract(model, contract)


def _set_contract_io(model, contract: GraphContract) -> None:
    """Stamp the contract's symbolic axis names on the graph's inputs and outputs (the torch
    exporter names them after its own symbols)."""
    from onnx import helper
    by_name = {s.name: s for s in (*contract.inputs, *contract.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        spec = by_name.get(vi.name)
        if spec is None:
            raise InternalError(f"graph {contract.name!r} has {vi.name!r}, which the contract lacks")
        elem = vi.type.tensor_type.elem_type
        vi.CopyFrom(helper.make_tensor_value_info(spec.name, elem, list(spec.shape)))


def export_form(model, opts: OnnxExportOptions):
    """The model as it is traced: in the export dtype and MLA form. The eager reference
    passed in stays untouched for validation: the modules are copied, the weights are not
    (fp32 shares them; fp16 holds one half-precision copy), so a 4 GB model is not doubled."""
    import torch
    tensors = [*model.parameters(), *model.buffers()]
    if opts.dtype == "fp16":
        memo = {id(t): (torch.nn.Parameter(t.detach().to(torch.float16), requires_grad=False)
                        if isinstance(t, torch.nn.Parameter) else t.to(torch.float16) if t.is_floating_point() else t)
                for t in tensors}
    else:
        memo = {id(t): t for t in tensors}
    export_model = copy.deepcopy(model, memo)
    if opts.dtype == "fp16":
        export_model = export_model.to(torch.float16)
    return export_model.set_mla_absorb(opts.mla == "absorbed").eval()


def build_graphs(model, cfg: MythosConfig, opts: OnnxExportOptions, stage: Callable[[str], None],
                 stepped: dict | None = None, store: Path | None = None) -> dict:
    """Eager model -> {graph name: ModelProto}, lowered and checked. `stepped` reuses already
    exported prelude/step/coda graphs (they are not modified). With a weight `store`
    (exporters/external_data.py) the weights are streamed there and never sit in a protobuf;
    otherwise nothing touches the disk."""
    return assemble_graphs(trace_graphs(model, cfg, opts, stage, stepped, store), cfg, opts, stage)


def trace_graphs(model, cfg: MythosConfig, opts: OnnxExportOptions, stage: Callable[[str], None],
                 stepped: dict | None = None, store: Path | None = None) -> dict:
    """The torch export: {"model"} for while_loop, else the stepped graphs this export needs.
    After it the torch model is no longer needed (except by the parity gate)."""
    from mythos_deploy.exporters.torch_to_onnx import export_fill, export_stepped, export_while_loop
    shared = set(stepped or ())  # the caller's graphs, copied before they are modified
    if opts.loop_export == "while_loop":  # `stepped` is not used
        stage("torch export (the whole model, the core as a while_loop)")
        # traced without logits_from (select_logits adds it)
        contract = next(c for c in contracts_for(cfg, opts.loop, opts.loops, opts.dtype) if c.name == "model")
        return {"model": export_while_loop(export_form(model, opts), contract, opts.opset, store=store)}
    if stepped is None:
        stage("torch export (prelude, core step, coda, propagate fill)")
        stepped = export_stepped(export_form(model, opts), opts.dtype, opts.opset, store=store)
    if opts.loop != "unroll" and "fill" not in stepped:  # the exit=propagate fill (a cache without it)
        stepped = {**stepped, "fill": export_fill(export_form(model, opts), opts.dtype, opts.opset, store=store)}
    return {k: copy.deepcopy(v) if k in shared else v for k, v in stepped.items()
            if opts.loop != "unroll" or k != "fill"}


def assemble_graphs(traced: dict, cfg: MythosConfig, opts: OnnxExportOptions, stage: Callable[[str], None]) -> dict:
    """Traced graphs (owned: modified in place) -> the artifact's graphs, composed, lowered
    and checked."""
    from mythos_deploy.exporters.graph_passes import clear_metadata
    from mythos_deploy.exporters.onnx_compose import compose, share_tied_embedding

    for g in traced.values():  # no exporter metadata (it carries local paths); our IR version
        clear_metadata(g)
    contracts = {c.name: c for c in contracts_for(cfg, opts.loop, opts.loops, opts.dtype, opts.past == "sliced")}
    if opts.loop_export == "while_loop":
        graphs = traced
        _set_contract_io(graphs["model"], contracts["model"])
        share_tied_embedding(graphs["model"])
    elif opts.loop == "stepped":
        graphs = traced
        for name, g in graphs.items():
            _set_contract_io(g, contracts[name])
    else:
        stage(f"compose ({opts.loop}, {opts.loops} loops)")
        graphs = {"model": compose(traced, contracts["model"], opts.loop, opts.loops,
                                   cfg.prelude_layers, cfg.coda_layers)}
        share_tied_embedding(graphs["model"])
    return _finish_graphs(graphs, contracts, opts, stage)


def _finish_graphs(graphs: dict, contracts: dict, opts: OnnxExportOptions, stage: Callable[[str], None]) -> dict:
    """Lower the MoE placeholder, slice the pasts, keep one copy of identical initializers,
    prune, name and check every graph."""
    from mythos_deploy.exporters.moe_lowering import lower_moe
    from mythos_deploy.exporters.graph_passes import finish
    from mythos_deploy.exporters.onnx_compose import select_logits, slice_pasts

    stage(f"lower MoE ({opts.moe})")
    for name, g in graphs.items():
        lower_moe(g, opts.moe)
        if opts.past == "sliced":
            slice_pasts(g, contracts[name])
        if any(s.name == "logits_from" for s in contracts[name].inputs):
            select_logits(g)
        finish(g)  # one copy of repeated initializers, no dead code, unique names, sorted
    stage("onnx.checker + shape inference + contract")
    for name, g in graphs.items():
        _check_graph(g, contracts[name])
    return graphs


def gate_scenarios(cfg: MythosConfig, opts: OnnxExportOptions) -> list:
    """The parity gate's scenarios for this export: exit=propagate too where the export carries
    it (`loop` composed with the fill, `stepped` with the fill graph)."""
    from mythos_deploy.exporters.onnx_validate import default_scenarios
    propagate = opts.loop == "stepped" or (opts.loop == "loop" and opts.loop_export != "while_loop")
    return default_scenarios(opts.loop, opts.loops, cfg.max_loop_iters, cfg.max_seq_len, propagate=propagate)


def record_reference(model, cfg: MythosConfig, opts: OnnxExportOptions, stage: Callable[[str], None]) -> list:
    """The eager half of the gate (exporters/onnx_validate.py): after it the torch model can go."""
    from mythos_deploy.exporters.onnx_validate import record_eager
    return record_eager(model, gate_scenarios(cfg, opts), progress=lambda s: stage(f"parity gate, eager reference: {s}"))


def check_graphs(records: list, cfg: MythosConfig, graphs: dict, opts: OnnxExportOptions,
                 stage: Callable[[str], None], paths: dict | None = None):
    """The onnxruntime half of the gate, on the graph files at `paths` (the artifact being
    written) or, without them, on a scratch copy. `plugin` graphs run with each MythosMoE node
    swapped for its standard-op form (onnxruntime cannot run the plugin)."""
    from mythos_deploy.exporters.moe_lowering import count_moe_nodes, lower_moe
    from mythos_deploy.exporters.onnx_validate import compare_records
    from mythos_deploy.runtimes.onnx_runner import OnnxModelRunner

    note = ""
    if opts.moe == "plugin":
        graphs = {k: lower_moe(copy.deepcopy(g), "standard") for k, g in graphs.items()}
        note = ("plugin nodes cannot run in onnxruntime: validated the same graph with each "
                "MythosMoE plugin node swapped for its standard-op form")
        paths = None  # the artifact's graphs are not the ones that run
    elif any(count_moe_nodes(g) for g in graphs.values()):
        raise InternalError("an MoE placeholder survived lowering")
    with contextlib.ExitStack() as scratch:
        if paths is None:  # via files: graphs over 2 GB cannot be serialised in memory
            root = Path(scratch.enter_context(tempfile.TemporaryDirectory(dir=scratch_root())))
            paths = {name: write_model(g, root, f"{name}.onnx") for name, g in graphs.items()}
        stage("parity gate, onnxruntime: loading the session")
        runner = OnnxModelRunner(paths, opts.loop, opts.loops)
        if any(r.scenario.exit == "propagate" for r in records) and not runner.supports_propagate:
            raise InternalError("the gate expected an export that carries exit=propagate; it does not")
        return compare_records(records, runner, cfg, opts.loop, opts.dtype, note,
                               progress=lambda s: stage(f"parity gate, onnxruntime: {s}"))


def validate_graphs(model, cfg: MythosConfig, graphs: dict, opts: OnnxExportOptions,
                    stage: Callable[[str], None]):
    """Both halves of the gate on graphs in memory (tests; the export frees the model between them)."""
    return check_graphs(record_reference(model, cfg, opts, stage), cfg, graphs, opts, stage)


def save_graph(model, directory: Path, filename: str, external_bytes: int | None = None) -> Path:
    """One graph file (weights in `<filename>.data` above `external_bytes`)."""
    return write_model(model, directory, filename, external_bytes)


def scratch_root() -> str | None:
    """Where scratch weight stores go: MYTHOS_SCRATCH_DIR, else the system temp directory."""
    return os.environ.get("MYTHOS_SCRATCH_DIR") or None


def remove_stale_stores() -> list[str]:
    """Weight stores left by exports that were killed (SIGKILL skips cleanup; a 1b store is
    6 GB): `mythos-store-<pid>-*` whose process is gone. Returns what was removed."""
    import shutil
    root = Path(scratch_root() or tempfile.gettempdir())
    removed = []
    for d in root.glob("mythos-store-*-*"):
        try:
            pid = int(d.name.split("-")[2])
            os.kill(pid, 0)
            continue  # its export is still running
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed


def model_bytes(model, dtype: str) -> int:
    """Bytes of the model's weights in the export dtype."""
    n = sum(t.numel() * (2 if dtype == "fp16" and t.is_floating_point() else t.element_size())
            for t in (*model.parameters(), *model.buffers()))
    return int(n)


def export_onnx(ckpt_dir: str | Path, out_dir: str | Path, options: OnnxExportOptions = OnnxExportOptions(),
                overwrite: bool = False, stage: Callable[[str], None] | None = None,
                external_bytes: int | None = None, stepped: dict | None = None,
                extra_manifest: dict | None = None) -> ExportResult:
    """Export a checkpoint; raises ParityError (nothing written) if validation fails.
    `stepped` reuses stepped graphs already exported from this same checkpoint."""
    _require_onnx()
    t0 = time.perf_counter()
    stage = stage or (lambda s: None)
    stage("load checkpoint")
    model = load_checkpoint(ckpt_dir)
    cfg = model.cfg
    opts = options.resolved(cfg)
    check_export_options(opts, cfg)
    out_dir = Path(out_dir)
    check_writable(out_dir, overwrite)  # fail before minutes of work, not after
    external_bytes = external_bytes_threshold() if external_bytes is None else external_bytes
    with contextlib.ExitStack() as scratch:
        store = None
        if stepped is None and model_bytes(model, opts.dtype) > min(external_bytes, STORE_BYTES):
            # a large model: weights go from torch to a scratch store, never into a protobuf
            remove_stale_stores()
            store = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix=f"mythos-store-{os.getpid()}-",
                                                                           dir=scratch_root())))
        traced = trace_graphs(model, cfg, opts, stage, stepped, store)
        # the gate's eager half runs now, so that the torch weights (4 GB at 1b) are gone before
        # onnxruntime maps the export's: one copy of the weights at a time
        records = record_reference(model, cfg, opts, stage) if opts.validate else None
        del model
        release_memory()
        graphs = assemble_graphs(traced, cfg, opts, stage)
        del traced
        return _write_artifact(ckpt_dir, out_dir, overwrite, graphs, cfg, opts, records, external_bytes,
                               extra_manifest, stage, t0)


def _write_artifact(ckpt_dir, out_dir: Path, overwrite: bool, graphs: dict, cfg: MythosConfig,
                    opts: OnnxExportOptions, records: list | None, external_bytes: int,
                    extra_manifest: dict | None, stage: Callable[[str], None], t0: float) -> ExportResult:
    """Write the graphs into the artifact's temporary directory, run the gate's onnxruntime half
    on those very files (no second copy), and only then let the directory become OUT_DIR."""
    stage("write artifact")
    from mythos_deploy.runtimes.onnx_runner import graph_files
    files = graph_files(opts.loop)
    contracts = contracts_for(cfg, opts.loop, opts.loops, opts.dtype, opts.past == "sliced")
    report = None
    with atomic_output_dir(out_dir, overwrite) as tmp:
        paths = {name: save_graph(g, tmp, files[name], external_bytes) for name, g in graphs.items()}
        if records is not None:
            report = check_graphs(records, cfg, graphs, opts, stage, paths).to_dict()
            if not report["passed"]:
                raise ParityError("export differs from eager PyTorch beyond tolerance: "
                                  + "; ".join(report["failures"][:6]), report)
            (tmp / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
        carry_tokenizer(ckpt_dir, tmp)
        stage("hash and manifest")
        manifest = write_manifest(
            tmp, "onnx", options=opts.to_dict(), config=cfg.to_dict(),
            source={"checkpoint": str(ckpt_dir), "sha256": checkpoint_sha256(ckpt_dir)},
            graphs=files, contract=[c.to_dict() for c in contracts],
            validation=None if report is None else {k: report[k] for k in ("passed", "note", "greedy_agreement")},
            **(extra_manifest or {}))
    return ExportResult(out_dir, manifest, report, time.perf_counter() - t0)
