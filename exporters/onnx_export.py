"""`export_onnx`: checkpoint directory -> ONNX artifact directory, parity-gated.

Stages: load -> torch export of the stepped graphs -> compose (unroll | loop) -> MoE
lowering -> onnx.checker + shape inference + contract check -> onnxruntime parity gate ->
atomic write with manifest.json and validation.json. Any failure leaves no OUT_DIR.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mythos_deploy.checkpoint import checkpoint_sha256, load_checkpoint
from mythos_deploy.config import MythosConfig
from mythos_deploy.contract import LOOP_MODES, GraphContract, contracts_for
from mythos_deploy.errors import InputError, InternalError, MissingDependencyError, ParityError
from mythos_deploy.manifest import atomic_output_dir, check_writable, write_manifest

MOE_LOWERINGS = ("plugin", "ort", "standard")
MLA_FORMS = ("absorbed", "expanded")
PAST_FORMS = ("sliced", "masked")
LOOP_EXPORTS = ("compose", "while_loop")
DTYPES = ("fp32", "fp16")
MIN_OPSET = 18  # torch's ONNX exporter emits opset >= 18; every lowering builds on it
MAX_UNROLL = 256
MAX_LOOPS = 4096
EXTERNAL_DATA_BYTES = 1 << 30  # graphs above this keep their weights in <graph>.onnx.data


@dataclass(frozen=True)
class OnnxExportOptions:
    loop: str = "unroll"
    loops: int | None = None  # default: the config's max_loop_iters
    moe: str = "standard"
    opset: int = MIN_OPSET
    dtype: str = "fp32"
    validate: bool = True
    mla: str = "absorbed"  # MLA attention form in the graph (ignored for GQA)
    # past rows read: "sliced" (only [0, past_len): cost follows the context, not the buffer;
    # a data-dependent shape) or "masked" (the whole buffer, unfilled rows masked: static
    # shapes, as TensorRT engines captured in CUDA graphs need). None: masked for the plugin
    # lowering (the TensorRT path), sliced otherwise.
    past: str | None = None
    # how a `loop` graph is built: "compose" (the exported step graph placed in an ONNX Loop at
    # the ONNX level, shared with unroll/stepped) or "while_loop" (the whole model through
    # torch.export while_loop, lowered to an ONNX Loop by torch.onnx)
    loop_export: str = "compose"

    @classmethod
    def from_manifest(cls, options: dict) -> "OnnxExportOptions":
        """The options an artifact was exported with (its manifest's `options`). Manifests
        written before `past` existed describe graphs that read the whole buffer: masked."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"past": "masked", **{k: v for k, v in options.items() if k in known}})

    def resolved(self, cfg: MythosConfig) -> "OnnxExportOptions":
        loops = cfg.max_loop_iters if self.loops is None else self.loops
        past = self.past or ("masked" if self.moe == "plugin" else "sliced")
        return dataclasses.replace(self, loops=loops, past=past)

    def check(self, cfg: MythosConfig) -> None:
        import onnx
        if self.loop not in LOOP_MODES:
            raise InputError(f"--loop must be one of {', '.join(LOOP_MODES)}, got {self.loop!r}")
        if self.moe not in MOE_LOWERINGS:
            raise InputError(f"--moe must be one of {', '.join(MOE_LOWERINGS)}, got {self.moe!r}")
        if self.mla not in MLA_FORMS:
            raise InputError(f"--mla must be one of {', '.join(MLA_FORMS)}, got {self.mla!r}")
        if self.loop_export not in LOOP_EXPORTS:
            raise InputError(f"--loop-export must be one of {', '.join(LOOP_EXPORTS)}, got {self.loop_export!r}")
        if self.loop_export == "while_loop" and self.loop != "loop":
            raise InputError(f"--loop-export while_loop builds a --loop loop graph; it does not apply to --loop {self.loop}")
        if self.past not in (None, *PAST_FORMS):
            raise InputError(f"--past must be one of {', '.join(PAST_FORMS)}, got {self.past!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.loops, bool) or not isinstance(self.loops, int) or not 1 <= self.loops <= MAX_LOOPS:
            raise InputError(f"--loops must be an integer in [1, {MAX_LOOPS}], got {self.loops!r}")
        if self.loop == "unroll" and self.loops > MAX_UNROLL:
            raise InputError(f"--loops {self.loops} is too deep to unroll (max {MAX_UNROLL}); use --loop loop")
        newest = onnx.defs.onnx_opset_version()
        if self.opset < MIN_OPSET:
            raise InputError(f"--opset {self.opset} is too old for --moe {self.moe}: the exporter needs opset >= {MIN_OPSET}")
        if self.opset > newest:
            raise InputError(f"--opset {self.opset} is newer than this onnx ({onnx.__version__}) knows (max {newest})")
        if self.moe == "ort" and self.dtype == "fp16" and self.validate:
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

    from mythos_deploy.exporters.onnx_ops import register_schemas
    register_schemas()
    try:
        onnx.checker.check_model(model, full_check=True)
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
    """The model as it is traced: a copy in the export dtype and MLA form (the eager
    reference passed in stays untouched for validation)."""
    import torch
    export_model = copy.deepcopy(model)
    if opts.dtype == "fp16":
        export_model = export_model.to(torch.float16)
    return export_model.set_mla_absorb(opts.mla == "absorbed").eval()


def build_graphs(model, cfg: MythosConfig, opts: OnnxExportOptions, stage: Callable[[str], None],
                 stepped: dict | None = None) -> dict:
    """Eager model -> {graph name: ModelProto}, lowered and checked (no disk I/O).
    `stepped` reuses already exported prelude/step/coda graphs (they are not modified)."""
    from mythos_deploy.exporters.onnx_compose import IR_VERSION, compose, share_tied_embedding, strip_metadata
    from mythos_deploy.exporters.torch_to_onnx import export_stepped, export_while_loop

    def clean(g):  # no exporter metadata (it carries local paths); our IR version
        strip_metadata(g.graph)
        del g.metadata_props[:]
        g.ir_version = IR_VERSION
        return g

    contracts = {c.name: c for c in contracts_for(cfg, opts.loop, opts.loops, opts.dtype)}
    if opts.loop_export == "while_loop":  # `stepped` is not used
        stage("torch export (the whole model, the core as a while_loop)")
        graphs = {"model": clean(export_while_loop(export_form(model, opts), contracts["model"], opts.opset))}
        _set_contract_io(graphs["model"], contracts["model"])
        share_tied_embedding(graphs["model"])
        return _finish_graphs(graphs, contracts, opts, stage)
    if stepped is None:
        stage("torch export (prelude, core step, coda)")
        stepped = export_stepped(export_form(model, opts), opts.dtype, opts.opset)
    stepped = {k: clean(copy.deepcopy(v)) for k, v in stepped.items()}
    if opts.loop == "stepped":
        graphs = stepped
        for name, g in graphs.items():
            _set_contract_io(g, contracts[name])
    else:
        stage(f"compose ({opts.loop}, {opts.loops} loops)")
        graphs = {"model": compose(stepped, contracts["model"], opts.loop, opts.loops,
                                   cfg.prelude_layers, cfg.coda_layers)}
        share_tied_embedding(graphs["model"])
    return _finish_graphs(graphs, contracts, opts, stage)


def _finish_graphs(graphs: dict, contracts: dict, opts: OnnxExportOptions, stage: Callable[[str], None]) -> dict:
    """Lower the MoE placeholder, slice the pasts, keep one copy of identical initializers,
    prune, name and check every graph."""
    from mythos_deploy.exporters.moe_lowering import lower_moe
    from mythos_deploy.exporters.onnx_compose import dedupe_initializers, name_nodes, prune_initializers, slice_pasts

    stage(f"lower MoE ({opts.moe})")
    for name, g in graphs.items():
        lower_moe(g, opts.moe)
        if opts.past == "sliced":
            slice_pasts(g, contracts[name])
        dedupe_initializers(g)  # a composed graph brings the prelude's, step's and coda's RoPE tables
        prune_initializers(g)
        name_nodes(g.graph)
    stage("onnx.checker + shape inference + contract")
    for name, g in graphs.items():
        _check_graph(g, contracts[name])
    return graphs


def validate_graphs(model, cfg: MythosConfig, graphs: dict, opts: OnnxExportOptions,
                    stage: Callable[[str], None]):
    from mythos_deploy.exporters.moe_lowering import count_moe_nodes, lower_moe
    from mythos_deploy.exporters.onnx_validate import default_scenarios, validate
    from mythos_deploy.runtimes.onnx_runner import OnnxModelRunner

    note = ""
    if opts.moe == "plugin":
        graphs = {k: lower_moe(copy.deepcopy(g), "standard") for k, g in graphs.items()}
        note = ("plugin nodes cannot run in onnxruntime: validated the same graph with each "
                "MythosMoE plugin node swapped for its standard-op form")
    elif any(count_moe_nodes(g) for g in graphs.values()):
        raise InternalError("an MoE placeholder survived lowering")
    with tempfile.TemporaryDirectory() as scratch:
        paths = {}
        for name, g in graphs.items():  # via files: graphs over 2 GB cannot be serialised in memory
            paths[name] = _save(g, Path(scratch), f"{name}.onnx")
        runner = OnnxModelRunner(paths, opts.loop, opts.loops, cfg.prelude_layers, cfg.coda_layers)
        scenarios = default_scenarios(opts.loop, opts.loops, cfg.max_loop_iters, cfg.max_seq_len)
        return validate(model, runner, opts.loop, opts.dtype, scenarios, note,
                        progress=lambda s: stage(f"validate: {s}"))


def _save(model, directory: Path, filename: str, external_bytes: int = EXTERNAL_DATA_BYTES) -> Path:
    import onnx
    path = directory / filename
    if model.ByteSize() > external_bytes:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{filename}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def export_onnx(ckpt_dir: str | Path, out_dir: str | Path, options: OnnxExportOptions = OnnxExportOptions(),
                overwrite: bool = False, stage: Callable[[str], None] | None = None,
                external_bytes: int = EXTERNAL_DATA_BYTES, stepped: dict | None = None,
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
    opts.check(cfg)
    out_dir = Path(out_dir)
    check_writable(out_dir, overwrite)  # fail before minutes of work, not after
    graphs = build_graphs(model, cfg, opts, stage, stepped=stepped)
    report = None
    if opts.validate:
        report = validate_graphs(model, cfg, graphs, opts, stage).to_dict()
        if not report["passed"]:
            raise ParityError("export differs from eager PyTorch beyond tolerance: "
                              + "; ".join(report["failures"][:6]), report)
    stage("write artifact")
    from mythos_deploy.runtimes.onnx_runner import graph_files
    files = graph_files(opts.loop)
    contracts = contracts_for(cfg, opts.loop, opts.loops, opts.dtype)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for name, g in graphs.items():
            _save(g, tmp, files[name], external_bytes)
        if report is not None:
            (tmp / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
        manifest = write_manifest(
            tmp, "onnx", options=asdict(opts), config=cfg.to_dict(),
            source={"checkpoint": str(ckpt_dir), "sha256": checkpoint_sha256(ckpt_dir)},
            graphs=files, contract=[c.to_dict() for c in contracts],
            validation=None if report is None else {k: report[k] for k in ("passed", "note", "greedy_agreement")},
            **(extra_manifest or {}))
    return ExportResult(out_dir, manifest, report, time.perf_counter() - t0)
