"""Rewrite MoE nodes (the export placeholder, or a plugin node) into one of three lowerings.

- `plugin`:   one `trt.plugins::MythosMoE` node per MoE call, with plugin_namespace /
              plugin_version attributes, for TensorRT's plugin registry.
- `ort`:      onnxruntime's `com.microsoft::MoE` (SwiGLU, interleaved fused gate/up weights
              prepared here once, alpha=1, beta=0, no clamp). The op routes internally from
              `router_probs`; we feed it log(gates) on the chosen experts and -1e4 elsewhere,
              so its softmax + top-k + renormalise reproduces our gates exactly (selection may
              use the load-balancing bias, gating must not, which the op cannot express).
- `standard`: plain ONNX ops behind an `If` on token count: few tokens gather the K chosen
              experts' weights (decode reads only what it uses); many tokens run every
              expert densely (batched MatMul over E) weighted by a scattered [N, E] gate
              matrix. Both branches read one copy of the weights in [E,D,F]/[E,F,D] layout.
"""

from __future__ import annotations

import numpy as np

from mythos_deploy.exporters.external_data import new_tensor, new_tensor_rows, tensor_rows
from mythos_deploy.exporters.graph_passes import drop_unused_opsets
from mythos_deploy.exporters.onnx_compose import iter_graphs, subgraphs
from mythos_deploy.contract import (PLACEHOLDER_DOMAIN, PLACEHOLDER_OP, PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_OP,
                                    PLUGIN_VERSION)
from mythos_deploy.exporters.onnx_ops import register_schemas
from mythos_deploy.errors import InternalError

LOWERINGS = ("plugin", "ort", "standard")
MOE_OPS = {(PLACEHOLDER_DOMAIN, PLACEHOLDER_OP), (PLUGIN_DOMAIN, PLUGIN_OP)}


def _set_opset(model, domain: str, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain == domain:
            return
    model.opset_import.add(domain=domain, version=version)


def count_moe_nodes(model, kinds=MOE_OPS) -> int:
    return sum((node.domain, node.op_type) in kinds for g in iter_graphs(model.graph) for node in g.node)


class _Lowerer:
    def __init__(self, model, target: str):
        if target not in LOWERINGS:
            raise InternalError(f"unknown MoE lowering {target!r}")
        self.model, self.target = model, target
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: dict[str, np.ndarray] = {}  # small constants
        self.derived_shapes: dict[str, tuple[int, ...]] = {}
        self.derived_tensors: list = []

    def weight(self, name: str) -> np.ndarray:
        """A weight's value (memory-mapped when it lives in external data)."""
        if name in self.new_inits:
            return self.new_inits[name]
        if name in self.derived_shapes:
            raise InternalError(f"derived MoE table {name!r} is not read back")
        if name not in self.inits:
            raise InternalError(f"MoE weight {name!r} is not an initializer of the main graph")
        return tensor_rows(self.inits[name])

    def derived(self, base: str, tag: str, fn) -> str:
        """An initializer computed once from an expert table, expert by expert (`fn(w[e:e+1], e)`
        -> [1, ...]); shared by every MoE node using it. In a store-backed model it
        is streamed to the store, never whole in memory."""
        name = f"{base}::{tag}"
        if name not in self.derived_shapes:
            w = self.weight(base)
            first = np.ascontiguousarray(fn(w[:1], 0))
            shape = (w.shape[0], *first.shape[1:])
            self.derived_shapes[name] = shape
            chunks = (first if e == 0 else fn(w[e:e + 1], e) for e in range(w.shape[0]))
            self.derived_tensors.append(new_tensor_rows(self.model, name, shape, first.dtype, chunks))
        return name

    def run(self):
        register_schemas()
        self.walk(self.model.graph)
        self.model.graph.initializer.extend(self.derived_tensors)
        for name, arr in self.new_inits.items():
            self.model.graph.initializer.append(new_tensor(self.model, arr, name))
        if self.target == "plugin":
            _set_opset(self.model, PLUGIN_DOMAIN, 1)
        elif self.target == "ort":
            _set_opset(self.model, "com.microsoft", 1)
        drop_unused_opsets(self.model)
        return self.model

    def walk(self, graph):
        out = []
        for node in graph.node:
            for g in subgraphs(node):
                self.walk(g)
            if (node.domain, node.op_type) in MOE_OPS:
                out.extend(getattr(self, self.target)(node))
            else:
                out.append(node)
        del graph.node[:]
        graph.node.extend(out)

    # ---- the three lowerings ----------------------------------------------------------------
    def plugin(self, node):
        from onnx import helper
        E, F, _ = self.weight(node.input[3]).shape
        return [helper.make_node(
            PLUGIN_OP, list(node.input), list(node.output), name=node.name or None, domain=PLUGIN_DOMAIN,
            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
            num_experts=int(E), top_k=self._k(node), expert_dim=int(F))]

    def ort(self, node):
        from onnx import helper
        x, idx, gates, wg, wu, wd = node.input
        E = self.weight(wg).shape[0]
        u = self.weight(wu)
        # [E, 2F, D], rows interleaved gate0, up0, gate1, ...
        fc1 = self.derived(wg, "ort_fc1", lambda g, e: np.stack([g, u[e:e + 1]], axis=2)
                           .reshape(1, 2 * g.shape[1], g.shape[2]))
        p = (node.name or node.output[0]) + "/ort"
        dtype = self.weight(wg).dtype
        k = self._k(node)
        return [
            helper.make_node("Shape", [x], [f"{p}/shape"], start=0, end=1),
            helper.make_node("Concat", [f"{p}/shape", self.const(f"{p}/E", np.array([E], np.int64))], [f"{p}/ne"], axis=0),
            helper.make_node("ConstantOfShape", [f"{p}/ne"], [f"{p}/floor"],
                             value=helper.make_tensor("v", _onnx_type(dtype), [1], [-1e4])),
            helper.make_node("Log", [gates], [f"{p}/loggates"]),
            helper.make_node("ScatterElements", [f"{p}/floor", idx, f"{p}/loggates"], [f"{p}/router"], axis=1),
            helper.make_node("MoE", [x, f"{p}/router", fc1, "", wd], list(node.output), domain="com.microsoft",
                             k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                             activation_beta=0.0, normalize_routing_weights=1),
        ]

    @staticmethod
    def _k(node) -> int:
        for attr in node.attribute:
            if attr.name == "top_k":
                return int(attr.i)
        raise InternalError(f"MoE node {node.name!r} has no top_k attribute")

    def const(self, name: str, value: np.ndarray) -> str:
        self.new_inits.setdefault(name, value)
        return name

    def standard(self, node):
        from onnx import helper
        x, idx, gates, wg, wu, wd = node.input
        y = node.output[0]
        E, F, D = self.weight(wg).shape
        dtype = self.weight(wg).dtype
        p = (node.name or y) + "/std"
        wgT = self.derived(wg, "EDF", lambda w, e: w.transpose(0, 2, 1))  # [E,D,F]
        wuT = self.derived(wu, "EDF", lambda w, e: w.transpose(0, 2, 1))
        wdT = self.derived(wd, "EFD", lambda w, e: w.transpose(0, 2, 1))  # [E,F,D]
        ax12 = self.const("moe/axes_1_2", np.array([1, 2], np.int64))
        ax1 = self.const("moe/axes_1", np.array([1], np.int64))
        ax2 = self.const("moe/axes_2", np.array([2], np.int64))

        def swiglu(g, u, out, q):
            return [helper.make_node("Sigmoid", [g], [f"{q}/sig"]),
                    helper.make_node("Mul", [g, f"{q}/sig"], [f"{q}/silu"]),
                    helper.make_node("Mul", [f"{q}/silu", u], [out])]

        q = f"{p}/gather"
        gather_nodes = [
            helper.make_node("Unsqueeze", [x, ax12], [f"{q}/x4"]),  # [N,1,1,D]
            helper.make_node("Gather", [wgT, idx], [f"{q}/wg"], axis=0),  # [N,K,D,F]
            helper.make_node("Gather", [wuT, idx], [f"{q}/wu"], axis=0),
            helper.make_node("Gather", [wdT, idx], [f"{q}/wd"], axis=0),  # [N,K,F,D]
            helper.make_node("MatMul", [f"{q}/x4", f"{q}/wg"], [f"{q}/g"]),  # [N,K,1,F]
            helper.make_node("MatMul", [f"{q}/x4", f"{q}/wu"], [f"{q}/u"]),
            *swiglu(f"{q}/g", f"{q}/u", f"{q}/h", q),
            helper.make_node("MatMul", [f"{q}/h", f"{q}/wd"], [f"{q}/y4"]),  # [N,K,1,D]
            helper.make_node("Squeeze", [f"{q}/y4", ax2], [f"{q}/y3"]),  # [N,K,D]
            helper.make_node("Unsqueeze", [gates, ax2], [f"{q}/g3"]),  # [N,K,1]
            helper.make_node("Mul", [f"{q}/y3", f"{q}/g3"], [f"{q}/wy"]),
            helper.make_node("ReduceSum", [f"{q}/wy", ax1], [f"{q}/out"], keepdims=0),
        ]
        r = f"{p}/dense"  # every expert on every token, batched over E with the same layouts
        ax0 = self.const("moe/axes_0", np.array([0], np.int64))
        dense_nodes = [
            helper.make_node("Shape", [x], [f"{r}/n"], start=0, end=1),
            helper.make_node("Concat", [f"{r}/n", self.const(f"moe/E{E}", np.array([E], np.int64))], [f"{r}/ne"], axis=0),
            helper.make_node("ConstantOfShape", [f"{r}/ne"], [f"{r}/zeros"],
                             value=helper.make_tensor("v", _onnx_type(dtype), [1], [0.0])),
            helper.make_node("ScatterElements", [f"{r}/zeros", idx, gates], [f"{r}/G"], axis=1),  # [N,E]
            helper.make_node("Transpose", [f"{r}/G"], [f"{r}/GT"], perm=[1, 0]),  # [E,N]
            helper.make_node("Unsqueeze", [f"{r}/GT", ax2], [f"{r}/G3"]),  # [E,N,1]
            helper.make_node("Unsqueeze", [x, ax0], [f"{r}/x3"]),  # [1,N,D]
            helper.make_node("MatMul", [f"{r}/x3", wgT], [f"{r}/g"]),  # [E,N,F]
            helper.make_node("MatMul", [f"{r}/x3", wuT], [f"{r}/u"]),
            *swiglu(f"{r}/g", f"{r}/u", f"{r}/h", r),
            helper.make_node("Mul", [f"{r}/h", f"{r}/G3"], [f"{r}/hg"]),
            helper.make_node("MatMul", [f"{r}/hg", wdT], [f"{r}/y"]),  # [E,N,D]
            helper.make_node("ReduceSum", [f"{r}/y", ax0], [f"{r}/out"], keepdims=0),  # [N,D]
        ]
        elem = _onnx_type(dtype)
        then_g = helper.make_graph(gather_nodes, f"{p}_gather", [],
                                   [helper.make_tensor_value_info(f"{q}/out", elem, None)])
        else_g = helper.make_graph(dense_nodes, f"{p}_dense", [],
                                   [helper.make_tensor_value_info(f"{r}/out", elem, None)])
        k = self._k(node)
        return [
            helper.make_node("Shape", [x], [f"{p}/n"], start=0, end=1),
            helper.make_node("Mul", [f"{p}/n", self.const(f"moe/K{k}", np.array([k], np.int64))], [f"{p}/nk"]),
            helper.make_node("Less", [f"{p}/nk", self.const(f"moe/E{E}", np.array([E], np.int64))], [f"{p}/few"]),
            helper.make_node("If", [f"{p}/few"], [y], then_branch=then_g, else_branch=else_g),
        ]


def _onnx_type(dtype: np.dtype) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def lower_moe(model, target: str):
    """Rewrite every MoE node of `model` (in place, subgraphs included) to `target`."""
    return _Lowerer(model, target).run()
