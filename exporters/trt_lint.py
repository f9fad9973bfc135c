"""TensorRT-compatibility lint for exported ONNX graphs. Runs without TensorRT.

Checks every graph of an artifact (subgraphs included) against TensorRT 10.1's ONNX parser
(exporters/trt_ops.py cites the table): default-domain opset range, IR version, every op and
its element types, the parser's restrictions that these graphs can hit (Loop scan outputs
with a dynamic trip count, If branch outputs, TopK `sorted`/K, constant `axes` inputs,
Q/DQ zero points and positive scales), custom-domain nodes (the MythosMoE plugin's attributes,
trt::TRT_INT4DequantizeLinear's int4 data and block attributes; onnxruntime
contrib ops, which TensorRT cannot parse), and INT64 tensors (supported in 10.x, but Jetson
builds and older TensorRT cast them down: reported as info).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mythos_deploy.exporters.onnx_compose import iter_graphs, node_attr
from mythos_deploy.exporters.qdq import TRT_DOMAIN, TRT_INT4_DQ
from mythos_deploy.contract import PLACEHOLDER_DOMAIN, PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_OP, PLUGIN_VERSION
from mythos_deploy.exporters.trt_ops import OPSET_RANGE, SUPPORTED, TRT_VERSION, UNSUPPORTED

MAX_IR = 10
ELEM = {1: "f32", 10: "f16", 16: "bf16", 6: "i32", 7: "i64", 9: "b", 2: "u8", 3: "i8", 22: "i4", 17: "f8", 18: "f8"}
AXES_INPUT = {"ReduceMean", "ReduceMin", "ReduceMax", "ReduceSum", "ReduceProd", "Squeeze", "Unsqueeze"}


@dataclass
class Finding:
    severity: str  # error | warning | info
    graph: str
    node: str
    op: str
    message: str


def lint_model(model, graph_name: str) -> list[Finding]:
    import onnx
    findings: list[Finding] = []

    def add(sev, node, msg):
        findings.append(Finding(sev, graph_name, node.name if node is not None else "", node.op_type if node is not None else "", msg))

    opset = {imp.domain: imp.version for imp in model.opset_import}
    default = opset.get("", opset.get("ai.onnx"))
    if default is None or not OPSET_RANGE[0] <= default <= OPSET_RANGE[1]:
        add("error", None, f"default-domain opset {default} outside TensorRT {TRT_VERSION}'s range {OPSET_RANGE}")
    if model.ir_version > MAX_IR:
        add("error", None, f"IR version {model.ir_version} > {MAX_IR}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    except Exception:  # custom nodes without inference: fall back to declared types
        inferred = model
    types: dict[str, int] = {}
    for g in iter_graphs(inferred.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
    consts = _constant_names(model.graph)
    int64_seen = False

    for g in iter_graphs(model.graph):
        for node in g.node:
            dom = node.domain or ""
            if dom in ("", "ai.onnx"):
                if node.op_type in UNSUPPORTED or node.op_type not in SUPPORTED:
                    add("error", node, f"{node.op_type} is not supported by TensorRT {TRT_VERSION}'s ONNX parser")
                    continue
                allowed = SUPPORTED[node.op_type]  # the table lists the data input's types
                data = node.input[0] if node.input else ""
                et = types.get(data)
                if data and et in ELEM and allowed and node.op_type != "Cast" and ELEM[et] not in allowed:
                    add("error", node, f"input {data!r} has type {ELEM[et]}, not one of {sorted(allowed)}")
                int64_seen |= any(types.get(o) == 7 for o in node.output)
                _restrictions(node, consts, add)
            elif dom == PLUGIN_DOMAIN and node.op_type == PLUGIN_OP:
                ns, ver = node_attr(node, "plugin_namespace"), node_attr(node, "plugin_version")
                ns = ns.decode() if isinstance(ns, bytes) else ns
                ver = ver.decode() if isinstance(ver, bytes) else ver
                if ns != PLUGIN_NAMESPACE or ver != PLUGIN_VERSION:
                    add("error", node, f"plugin node needs plugin_namespace={PLUGIN_NAMESPACE!r}, plugin_version={PLUGIN_VERSION!r}; has {ns!r}, {ver!r}")
                for a in ("num_experts", "top_k", "expert_dim"):
                    if not isinstance(node_attr(node, a), int) or node_attr(node, a) < 1:
                        add("error", node, f"plugin attribute {a} missing or not a positive int")
                add("info", node, "needs the MythosMoE plugin registered with TensorRT (mythos-export build)")
            elif dom == TRT_DOMAIN and node.op_type == TRT_INT4_DQ:
                bs, axis = node_attr(node, "block_size"), node_attr(node, "axis")
                if types.get(node.input[0]) != 22:
                    add("error", node, f"{TRT_INT4_DQ} needs int4 data, has {ELEM.get(types.get(node.input[0]), '?')}")
                if not isinstance(bs, int) or bs < 2 or not isinstance(axis, int):
                    add("error", node, f"{TRT_INT4_DQ} needs int attributes axis and block_size >= 2")
                if len(node.input) > 2 and node.input[2]:
                    add("error", node, f"{TRT_INT4_DQ} takes no zero point (TensorRT int4 is symmetric)")
            elif dom == PLACEHOLDER_DOMAIN:
                add("error", node, "unlowered MoE placeholder (an exporter bug)")
            elif dom == "com.microsoft":
                add("error", node, f"onnxruntime contrib op com.microsoft::{node.op_type}: TensorRT cannot parse it "
                                   "(export with --moe plugin or --moe standard; quantize with TensorRT Q/DQ modes)")
            else:
                add("error", node, f"unknown custom domain {dom!r}")
    if int64_seen:
        add("info", None, "INT64 tensors present: TensorRT 10 supports them; older TensorRT and some Jetson builds cast to INT32")
    return findings


def _constant_names(graph) -> set[str]:
    names = set()
    for g in iter_graphs(graph):
        names.update(t.name for t in g.initializer)
        names.update(n.output[0] for n in g.node if n.op_type == "Constant")
    return names


def _restrictions(node, consts: set[str], add) -> None:
    op = node.op_type
    if op == "Loop":
        body = node_attr(node, "body")
        n_carried = len(node.input) - 2
        n_scan = len(body.output) - 1 - n_carried
        trip = node.input[0]
        if n_scan > 0 and trip and trip not in consts:
            add("error", node, f"{n_scan} scan output(s) with a trip count from graph input {trip!r}: TensorRT requires "
                               "scan output length to be static (export with --loop unroll or --loop stepped for TensorRT)")
    elif op == "If":
        then_g, else_g = node_attr(node, "then_branch"), node_attr(node, "else_branch")
        names_t = [o.name for o in then_g.output]
        names_e = [o.name for o in else_g.output]
        if set(names_t) & set(names_e):
            add("error", node, "If branches must name their outputs differently")
        if len(names_t) != len(names_e):
            add("error", node, "If branches must have the same number of outputs")
    elif op == "TopK":
        if node_attr(node, "sorted", 1) != 1:
            add("error", node, "TopK needs sorted=1")
        if len(node.input) > 1 and node.input[1] not in consts:
            add("warning", node, "TopK K is not a constant")
    elif op in AXES_INPUT or op == "Slice":
        idx = 3 if op == "Slice" else 1
        if len(node.input) > idx and node.input[idx] and node.input[idx] not in consts:
            add("error", node, f"{op} axes must be an initializer or constant")
    elif op in ("DequantizeLinear", "QuantizeLinear"):
        if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
            add("warning", node, "zero point is computed, not a constant: TensorRT needs it to be exactly 0")


def quant_param_findings(model) -> list[Finding]:
    """Q/DQ scales and zero points TensorRT's parser rejects (nonzero zero point, scale <= 0)."""
    from onnx import numpy_helper
    inits = {t.name: t for g in iter_graphs(model.graph) for t in g.initializer}
    out = []
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type in ("DequantizeLinear", "QuantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
                if np.any(numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) != 0):
                    out.append(Finding("error", "", n.name, n.op_type, "nonzero zero point: TensorRT requires symmetric (zero_point = 0)"))
            if (n.op_type in ("DequantizeLinear", "QuantizeLinear") or n.op_type == TRT_INT4_DQ) and len(n.input) > 1 \
                    and n.input[1] in inits and not np.all(numpy_helper.to_array(inits[n.input[1]]) > 0):
                out.append(Finding("error", "", n.name, n.op_type, "scale not strictly positive: TensorRT's parser rejects it"))
    return out


@dataclass(frozen=True)
class LintReport:
    target: str
    artifact: str
    options: dict
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == "warning" for f in self.findings)

    @property
    def passed(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict:
        return {"target": self.target, "artifact": self.artifact, "options": self.options, "passed": self.passed,
                "errors": self.errors, "warnings": self.warnings, "findings": [asdict(f) for f in self.findings]}


def lint_artifact(path: str | Path) -> LintReport:
    import onnx

    from mythos_deploy.errors import InputError
    from mythos_deploy.manifest import Manifest
    from mythos_deploy.runtimes.onnx_runner import artifact_graphs
    path = Path(path)
    manifest = Manifest.read(path)
    if manifest.kind != "onnx":
        raise InputError(f"{path} is a {manifest.kind!r} artifact; lint takes an ONNX export")
    findings: list[Finding] = []
    for name, f in artifact_graphs(path, manifest).items():
        model = onnx.load(str(f), load_external_data=False)
        findings += lint_model(model, name)
        findings += [Finding(x.severity, name, x.node, x.op, x.message) for x in quant_param_findings(model)]
    return LintReport(f"tensorrt {TRT_VERSION}", str(path), manifest.options.to_dict(), tuple(findings))
