"""Compose the stepped graphs (prelude, step, coda) into one `unroll` or `loop` graph.

Names inside each piece are prefixed so pieces cannot collide; the step's weights are
shared by every unrolled copy (and referenced from the Loop body as outer-scope values), so
the unrolled file is not n_loops times larger. In `loop` mode the recurrent cache slots are
one stacked tensor: the body gathers slot `iteration` from `past_recurrent` and writes its new
rows into a loop-carried [n_loops, B, T, W] tensor (ScatterND at the iteration; no scan
outputs, whose length TensorRT needs static), so the node count does not depend on n_loops.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mythos_deploy.contract import GraphContract
from mythos_deploy.exporters.graph_passes import IR_VERSION, iter_graphs, prune, subgraphs  # noqa: F401 (re-exported)
from mythos_deploy.errors import InternalError

ACT_STATE = ("h_out", "cum", "halted", "loops_used")


def node_attr(node, name: str, default=None):
    """The value of a node's attribute, or `default` when the node does not set it."""
    from onnx import helper
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def rename_graph(graph, f: Callable[[str], str]) -> None:
    """Apply `f` to every value name in `graph` and its subgraphs ("" stays "")."""
    def r(name: str) -> str:
        return f(name) if name else name
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = r(vi.name)
    for t in graph.initializer:
        t.name = r(t.name)
    for node in graph.node:
        node.input[:] = [r(n) for n in node.input]
        node.output[:] = [r(n) for n in node.output]
        if node.name:
            node.name = r(node.name)
        for g in subgraphs(node):
            rename_graph(g, f)


class _Piece:
    """One stepped graph, copied and renamed into the composed graph's namespace."""

    def __init__(self, model, prefix: str, inputs: dict[str, str], outputs: dict[str, str],
                 shared_init_prefix: str | None = None):
        import copy
        if len(model.functions):
            raise InternalError("stepped graphs must not contain local functions")
        graph = copy.deepcopy(model.graph)
        init_names = {t.name for t in graph.initializer}
        init_prefix = shared_init_prefix or prefix
        mapping = {**inputs, **outputs, **{n: init_prefix + n for n in init_names}}
        rename_graph(graph, lambda n: mapping.get(n, prefix + n))
        self.nodes = list(graph.node)
        self.initializers = list(graph.initializer)
        self.value_info = list(graph.value_info)


def _vi(spec):
    from onnx import helper
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    return helper.make_tensor_value_info(spec.name, elem, list(spec.shape))


def _opsets(*models):
    merged: dict[str, int] = {}
    for m in models:
        for imp in m.opset_import:
            merged[imp.domain] = max(merged.get(imp.domain, 0), imp.version)
    return merged


def _initial_act_state(e: str):
    """ConstantOfShape nodes for h_out (fp32 [B,T,D]), cum, halted, loops_used ([B,T])."""
    from onnx import TensorProto, helper
    z = lambda dt, v: helper.make_tensor("v", dt, [1], [v])  # noqa: E731
    return [
        helper.make_node("Shape", [e], ["act0/shape"]),
        helper.make_node("Shape", [e], ["act0/bt"], start=0, end=2),
        helper.make_node("ConstantOfShape", ["act0/shape"], ["act0/h_out"], value=z(TensorProto.FLOAT, 0.0)),
        helper.make_node("ConstantOfShape", ["act0/bt"], ["act0/cum"], value=z(TensorProto.FLOAT, 0.0)),
        helper.make_node("ConstantOfShape", ["act0/bt"], ["act0/halted"], value=z(TensorProto.BOOL, False)),
        helper.make_node("ConstantOfShape", ["act0/bt"], ["act0/loops_used"], value=z(TensorProto.INT32, 0)),
    ]


def _shapes_from(nodes, same_shape: dict[str, tuple[str, int]]) -> int:
    """Point Shape nodes at a tensor of the same shape that does not change from loop to
    loop: `same_shape` maps a per-loop tensor to (invariant tensor, leading axes the
    invariant one has in addition). Each loop's positions, RoPE rows, mask and reshape
    targets then depend only on invariant values, so onnxruntime's common-subexpression
    elimination computes them once for an unrolled graph, and _hoist_invariants moves them
    out of a Loop body. Returns the number of Shape nodes rewritten."""
    from onnx import helper
    done = 0
    for n in nodes:
        if n.op_type != "Shape" or n.input[0] not in same_shape:
            continue
        src, lead = same_shape[n.input[0]]
        start, end = node_attr(n, "start", 0), node_attr(n, "end", None)
        # negative indices count from the end: the same dims in either tensor
        attrs = {"start": start + lead if start >= 0 else start}
        if end is not None:
            attrs["end"] = end + lead if end >= 0 else end
        n.CopyFrom(helper.make_node("Shape", [src], list(n.output), name=n.name, **attrs))
        done += 1
    return done


def _hoist_invariants(body, outer_available: set[str]) -> list:
    """Loop-invariant code motion: body nodes whose inputs are all outer-scope values,
    initializers or other hoisted outputs (no subgraphs, deterministic ops) are removed from
    the body and returned, in order, to run once before the Loop."""
    local = {i.name for i in body.input}
    produced = {o for n in body.node for o in n.output}
    hoisted, keep, moved = [], [], set()
    for n in body.node:
        ins = [i for i in n.input if i]
        invariant = (not list(subgraphs(n)) and not n.op_type.startswith("Random")
                     and all((i in moved) or (i not in local and i not in produced and i in outer_available) for i in ins))
        if invariant:
            hoisted.append(n)
            moved.update(n.output)
        else:
            keep.append(n)
    del body.node[:]
    body.node.extend(keep)
    return hoisted


def _finish(nodes, inits, value_info, contract: GraphContract, opsets, name: str):
    from onnx import helper
    graph = helper.make_graph(nodes, name, [_vi(s) for s in contract.inputs], [_vi(s) for s in contract.outputs],
                              initializer=inits, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="mythos-deploy")
    model.ir_version = IR_VERSION
    return model


def _ends(cfg_prelude: int, cfg_coda: int):
    pre = {f"past_prelude_{i}": f"past_prelude_{i}" for i in range(cfg_prelude)}
    pre.update({f"new_prelude_{i}": f"new_prelude_{i}" for i in range(cfg_prelude)})
    coda = {f"past_coda_{i}": f"past_coda_{i}" for i in range(cfg_coda)}
    coda.update({f"new_coda_{i}": f"new_coda_{i}" for i in range(cfg_coda)})
    return pre, coda


def _propagate_fill(fill_model, inits: list) -> list:
    """After the Loop: with `propagate`, rows from `loops_run` on are computed from the frozen
    final state by the fill graph (one batched projection); otherwise `loop/rec` as it is.
    The fill always computes at least one row, so no tensor has a zero-sized axis (ONNX
    Reshape reads 0 as "copy"); rows it need not fill are taken from the Loop."""
    from onnx import helper, numpy_helper
    f = "fill/"
    inits += [numpy_helper.from_array(np.array(0, np.int64), f"{f}zero"),
              numpy_helper.from_array(np.array([0], np.int64), f"{f}axes0"),
              numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), f"{f}col4")]
    piece = _Piece(fill_model, f, {"h": "loop/h", "e": "pre/e_out", "loop_indices": f"{f}rest",
                                    "past_len": "past_len"}, {"rows": f"{f}rows"})
    inits += piece.initializers
    return [
        helper.make_node("Where", ["propagate", "loops_run", "n_loops"], [f"{f}start"]),  # first row to fill
        helper.make_node("Sub", ["n_loops", "loop/one_i64"], [f"{f}last"]),
        helper.make_node("Min", [f"{f}start", f"{f}last"], [f"{f}s1"]),
        helper.make_node("Range", [f"{f}s1", "n_loops", "loop/one_i64"], [f"{f}rest"]),
        *piece.nodes,
        helper.make_node("Unsqueeze", [f"{f}s1", f"{f}axes0"], [f"{f}s1_1"]),
        helper.make_node("Slice", ["loop/rec", f"{f}axes0", f"{f}s1_1", f"{f}axes0"], [f"{f}head"]),
        helper.make_node("Concat", [f"{f}head", f"{f}rows"], [f"{f}all"], axis=0),
        helper.make_node("Range", [f"{f}zero", "n_loops", "loop/one_i64"], [f"{f}idx"]),
        helper.make_node("GreaterOrEqual", [f"{f}idx", f"{f}start"], [f"{f}take"]),
        helper.make_node("Reshape", [f"{f}take", f"{f}col4"], [f"{f}take4"]),
        helper.make_node("Where", [f"{f}take4", f"{f}all", "loop/rec"], ["new_recurrent"]),
    ]


def compose(stepped: dict, contract: GraphContract, mode: str, n_loops: int,
            prelude_layers: int, coda_layers: int):
    """Build the single `unroll` or `loop` graph named by `contract` from stepped graphs."""
    from onnx import TensorProto, helper, numpy_helper

    pre_io, coda_io = _ends(prelude_layers, coda_layers)
    prelude = _Piece(stepped["prelude"], "pre/", {"input_ids": "input_ids", "past_len": "past_len", **pre_io,
                                                   "e": "pre/e_out"}, {})
    nodes, inits, vinfo = list(prelude.nodes), list(prelude.initializers), list(prelude.value_info)
    nodes += _initial_act_state("pre/e_out")
    step_model = stepped["step"]

    if mode == "unroll":
        state = {"h": "pre/e_out", **{k: f"act0/{k}" for k in ACT_STATE}}
        news = []
        for t in range(n_loops):
            p = f"step{t}/"
            inits.append(numpy_helper.from_array(np.array(t, np.int64), f"{p}loop_index"))
            nodes.append(helper.make_node("Gather", ["past_recurrent", f"{p}loop_index"], [f"{p}past"], axis=0))
            piece = _Piece(step_model, p, {
                "h": state["h"], "e": "pre/e_out", **{k: state[k] for k in ACT_STATE},
                "loop_index": f"{p}loop_index", "act_threshold": "act_threshold", "past_len": "past_len",
                "past_recurrent": f"{p}past"}, {}, shared_init_prefix="step/")
            _shapes_from(piece.nodes, {state["h"]: ("pre/e_out", 0), f"{p}past": ("step0/past", 0)})
            if t == 0:
                inits += piece.initializers
            nodes += piece.nodes
            vinfo += piece.value_info
            state = {"h": f"{p}h_next", **{k: f"{p}{k}_next" for k in ACT_STATE}}
            inits.append(numpy_helper.from_array(np.array([0], np.int64), f"{p}axis0"))
            nodes.append(helper.make_node("Unsqueeze", [f"{p}new_recurrent", f"{p}axis0"], [f"{p}new4"]))
            news.append(f"{p}new4")
        nodes.append(helper.make_node("Concat", news, ["new_recurrent"], axis=0))
        final = state
    elif mode == "loop":
        b = "body/"
        step = _Piece(step_model, b, {
            "h": f"{b}h_in", "e": "pre/e_out", **{k: f"{b}{k}_in" for k in ACT_STATE},
            "loop_index": f"{b}iter", "act_threshold": "act_threshold", "past_len": "past_len",
            "past_recurrent": f"{b}past"}, {"h_next": f"{b}h_step"}, shared_init_prefix="step/")
        inits += step.initializers  # outer scope: the body reads them without copies
        _shapes_from(step.nodes, {f"{b}h_in": ("pre/e_out", 0), f"{b}past": ("past_recurrent", 1)})
        # continue = not early_exit or not every position halted
        body_nodes = [helper.make_node("Gather", ["past_recurrent", f"{b}iter"], [f"{b}past"], axis=0),
                      *step.nodes,
                      # exit=propagate: a position halted before this loop keeps its state
                      helper.make_node("And", [f"{b}halted_in", "propagate"], [f"{b}frozen"]),
                      helper.make_node("Unsqueeze", [f"{b}frozen", "loop/axis2"], [f"{b}frozen3"]),
                      helper.make_node("Where", [f"{b}frozen3", f"{b}h_in", f"{b}h_step"], [f"{b}h_next"]),
                      helper.make_node("Cast", [f"{b}halted_next"], [f"{b}halted_i"], to=TensorProto.INT32),
                      helper.make_node("ReduceMin", [f"{b}halted_i"], [f"{b}min_halted"], keepdims=0),
                      helper.make_node("Equal", [f"{b}min_halted", "loop/one_scalar"], [f"{b}all_halted"]),
                      helper.make_node("And", [f"{b}all_halted", "early_exit"], [f"{b}stop"]),
                      helper.make_node("Not", [f"{b}stop"], [f"{b}cond_out"])]
        inits += [numpy_helper.from_array(np.array(1, np.int32), "loop/one_scalar"),
                  numpy_helper.from_array(np.array([2], np.int64), "loop/axis2")]
        sc = {s.name: s for s in step_model.graph.input}
        so = {s.name: s for s in step_model.graph.output}
        # The recurrent cache rows are loop-carried state of fixed shape [n_loops, B, T, W],
        # written at row `iter` with ScatterND (not a scan output: TensorRT needs scan outputs of
        # static length), and `ran` counts the iterations actually run (early exit).
        body_nodes += [
            helper.make_node("Unsqueeze", [f"{b}iter", "loop/axis0"], [f"{b}iter1"]),
            helper.make_node("Unsqueeze", [f"{b}iter1", "loop/axis0"], [f"{b}iter11"]),  # [1,1]
            helper.make_node("Unsqueeze", [f"{b}new_recurrent", "loop/axis0"], [f"{b}new4"]),  # [1,B,T,W]
            helper.make_node("ScatterND", [f"{b}rec_in", f"{b}iter11", f"{b}new4"], [f"{b}rec_next"]),
            helper.make_node("Add", [f"{b}iter", "loop/one_i64"], [f"{b}ran_next"]),
        ]
        inits += [numpy_helper.from_array(np.array([0], np.int64), "loop/axis0"),
                  numpy_helper.from_array(np.array(1, np.int64), "loop/one_i64"),
                  numpy_helper.from_array(np.array(0, np.int64), "loop/zero_i64"),
                  numpy_helper.from_array(np.array([so["new_recurrent"].type.tensor_type.shape.dim[-1].dim_value], np.int64),
                                          "loop/W")]
        cache_elem = so["new_recurrent"].type.tensor_type.elem_type
        nodes += [
            helper.make_node("Reshape", ["n_loops", "loop/axis0_shape"], ["loop/n1"]),
            helper.make_node("Shape", ["pre/e_out"], ["loop/bt"], start=0, end=2),
            helper.make_node("Concat", ["loop/n1", "loop/bt", "loop/W"], ["loop/rec_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["loop/rec_shape"], ["loop/rec0"],
                             value=helper.make_tensor("v", cache_elem, [1], [0])),
        ]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "loop/axis0_shape"))

        def like(name, src):
            return helper.make_tensor_value_info(name, src.type.tensor_type.elem_type, None)
        body_inputs = [helper.make_tensor_value_info(f"{b}iter", TensorProto.INT64, []),
                       helper.make_tensor_value_info(f"{b}cond_in", TensorProto.BOOL, []),
                       like(f"{b}h_in", sc["h"]), *[like(f"{b}{k}_in", sc[k]) for k in ACT_STATE],
                       helper.make_tensor_value_info(f"{b}rec_in", cache_elem, None),
                       helper.make_tensor_value_info(f"{b}ran_in", TensorProto.INT64, [])]
        body_outputs = [helper.make_tensor_value_info(f"{b}cond_out", TensorProto.BOOL, []),
                        like(f"{b}h_next", so["h_next"]), *[like(f"{b}{k}_next", so[f"{k}_next"]) for k in ACT_STATE],
                        helper.make_tensor_value_info(f"{b}rec_next", cache_elem, None),
                        helper.make_tensor_value_info(f"{b}ran_next", TensorProto.INT64, [])]
        body = helper.make_graph(body_nodes, "core_step", body_inputs, body_outputs, value_info=step.value_info)
        outer = {s.name for s in contract.inputs} | {t.name for t in inits} | {o for n in nodes for o in n.output}
        nodes += _hoist_invariants(body, outer)
        inits.append(numpy_helper.from_array(np.array(True), "loop/true"))
        nodes.append(helper.make_node(
            "Loop", ["n_loops", "loop/true", "pre/e_out", *[f"act0/{k}" for k in ACT_STATE], "loop/rec0", "loop/zero_i64"],
            ["loop/h", *[f"loop/{k}" for k in ACT_STATE], "loop/rec", "loops_run"], body=body, name="recurrent_core"))
        nodes += _propagate_fill(stepped["fill"], inits)
        final = {"h": "loop/h", **{k: f"loop/{k}" for k in ACT_STATE}}
    else:
        raise InternalError(f"cannot compose mode {mode!r}")

    coda = _Piece(stepped["coda"], "coda/", {"h_out": final["h_out"], "past_len": "past_len", **coda_io,
                                              "logits": "logits"}, {})
    nodes += coda.nodes
    inits += coda.initializers
    vinfo += coda.value_info
    nodes += [helper.make_node("Identity", [final["loops_used"]], ["loops_used"]),
              helper.make_node("Identity", [final["cum"]], ["halt_prob"])]
    return _finish(nodes, inits, vinfo, contract, _opsets(*stepped.values()), f"mythos_{mode}")


def share_tied_embedding(model) -> bool:
    """The tied embedding appears twice after export: [V, D] for the prelude's Gather and
    transposed [D, V] for the head's MatMul. Keep only [D, V]: the embedding becomes
    Gather(axis=1) + Transpose. Returns True when a copy was removed."""
    from onnx import helper
    inits = {t.name: t for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and n.input[1] == "input_ids"]
    if len(gathers) != 1:
        return False
    emb_name = gathers[0].input[0]
    from mythos_deploy.exporters.external_data import tensor_array
    emb = tensor_array(inits[emb_name])
    if emb.ndim != 2:
        return False
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1] != emb_name:
            t = inits[node.input[1]]
            if tuple(t.dims) == emb.shape[::-1] and np.array_equal(tensor_array(t), emb.T):
                head = node.input[1]
                break
    else:
        return False
    g = gathers[0]
    out = g.output[0]
    new_nodes = []
    for node in model.graph.node:
        if node is g:
            new_nodes += [helper.make_node("Gather", [head, "input_ids"], [f"{out}/dbt"], axis=1),  # [D,B,T]
                          helper.make_node("Transpose", [f"{out}/dbt"], [out], perm=[1, 2, 0])]
        else:
            new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    prune(model)
    return True


def select_logits(model) -> None:
    """Compute logits for positions [logits_from, seq) only: a Slice of the head MatMul's input
    along seq, fed by the scalar graph input `logits_from` (added where the traced graph lacks
    it). An engine asks for the last position (seq - 1); parity passes 0 for all of them."""
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    head = producer.get("logits")
    while head is not None and head.op_type in ("Cast", "Identity"):
        head = producer.get(head.input[0])
    if head is None or head.op_type != "MatMul":
        raise InternalError("select_logits: the logits are not produced by the head MatMul")
    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "logits_rows/axis0"),
                          numpy_helper.from_array(np.array([1], np.int64), "logits_rows/axis1"),
                          numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "logits_rows/end")])
    rows = f"{head.input[0]}/logits_rows"
    g.node.extend([helper.make_node("Unsqueeze", ["logits_from", "logits_rows/axis0"], ["logits_rows/start"]),
                   helper.make_node("Slice", [head.input[0], "logits_rows/start", "logits_rows/end",
                                              "logits_rows/axis1"], [rows], name="logits_rows/slice")])
    head.input[0] = rows
    if not any(i.name == "logits_from" for i in g.input):
        g.input.append(helper.make_tensor_value_info("logits_from", TensorProto.INT64, []))


def slice_pasts(model, contract: GraphContract) -> int:
    """Read only the filled rows of every past input: a Slice to [0, max(past_len)) along its
    `past` axis, feeding every reader (Loop/If bodies included). The runtime passes whole
    preallocated buffers, so without this a decode step concatenates, normalises and
    attends over the full budget with the unfilled rows masked: its cost grows with the
    budget, not with the context. Rows at or past `past_len` were ignored either way, so the
    outputs are unchanged. The price is a data-dependent shape (see OnnxExportOptions.past).
    Returns the number of inputs sliced."""
    from onnx import helper, numpy_helper
    pasts = [s for s in contract.inputs if s.name.startswith("past_") and "past" in s.shape]
    if not pasts:
        return 0
    g = model.graph
    # rows are at their own lengths: read up to the longest (ReduceMax over the batch -> [1])
    nodes = [helper.make_node("ReduceMax", ["past_len"], ["past_rows/end"], keepdims=1)]
    axes = {spec.shape.index("past") for spec in pasts}
    inits = [numpy_helper.from_array(np.array([0], np.int64), "past_rows/zero"),
             *[numpy_helper.from_array(np.array([a], np.int64), f"past_rows/axis{a}") for a in sorted(axes)]]
    renamed = {}
    for spec in pasts:
        renamed[spec.name] = f"{spec.name}/rows"
        nodes.append(helper.make_node("Slice", [spec.name, "past_rows/zero", "past_rows/end",
                                                f"past_rows/axis{spec.shape.index('past')}"],
                                      [renamed[spec.name]], name=f"past_rows/{spec.name}"))
    for sub in iter_graphs(g):
        for node in sub.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
    for k, node in enumerate(nodes):
        g.node.insert(k, node)
    g.initializer.extend(inits)
    return len(pasts)
