"""The graph rewrites behind `quantize --mode int8|int4` (onnxruntime CPU), one graph at a time.

Gemms with constant weights become MatMul(+Add); MatMuls that read one input are merged along
N; onnxruntime's MatMulNBitsQuantizer turns 2-D weight MatMuls into MatMulNBits; then the
routed experts (QMoE for the `ort` lowering, int8 tables + MatMulInteger or int4
GatherBlockQuantized for `standard`) and the tied embedding (GatherBlockQuantized rows of the
quantized head) are rewritten. exporters/quantize.py drives this per artifact and gates it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
import numpy as np

from mythos_deploy.exporters.external_data import tensor_array, tensor_rows
from mythos_deploy.exporters.onnx_compose import iter_graphs, node_attr
from mythos_deploy.errors import InputError


def _per_expert(w: np.ndarray, fn) -> tuple[np.ndarray, ...]:
    """`fn` over [1, ...] fp32 slices of an [E, ...] table, outputs concatenated on axis 0:
    a 1 GB table is never converted or quantized whole (its temporaries are 4x its size)."""
    parts = [fn(np.asarray(w[e:e + 1], np.float32)) for e in range(w.shape[0])]
    return tuple(np.ascontiguousarray(np.concatenate(p, axis=0)) for p in zip(*parts))


def _excluded(model, exclude: tuple[str, ...]) -> list[str]:
    """MatMuls that must stay float: B not a 2-D initializer (attention, gathered experts),
    plus user exclusions (substring match on node names)."""
    inits = {t.name: len(t.dims) for t in model.graph.initializer}
    names = []
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type in ("MatMul", "Gemm") and inits.get(n.input[1]) != 2:
                names.append(n.name)
            elif any(e in n.name for e in exclude):
                names.append(n.name)
    return names


def _int8_experts(model) -> int:
    """Standard-lowering experts -> int8 tables (symmetric, per expert and output channel).
    Each MatMul that reads an expert table, gathered (decode) or whole (the dense branch),
    becomes an integer MatMul: DynamicQuantizeLinear on its input (uint8, per tensor),
    MatMulInteger against the int8 table, then one scale (input scale x channel scales).
    The int8 bytes are gathered and multiplied as they are: nothing is dequantized to fp32
    per call. Any other read of a table falls back to Cast x scale."""
    from onnx import TensorProto, helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    targets = {name for name in inits if "::EDF" in name or "::EFD" in name}
    if not targets:
        return 0
    new_inits = []
    def int8_rows(w):  # [1, in, out] -> per (expert, output channel) scales
        scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale

    for name in targets:
        q, scale = _per_expert(tensor_rows(inits[name]), int8_rows)  # [E, in, out]
        new_inits += [numpy_helper.from_array(q, f"{name}::q8"), numpy_helper.from_array(scale.astype(np.float32), f"{name}::s8")]
    for g in iter_graphs(model.graph):
        readers: dict[str, list] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                readers.setdefault(name, []).append((n, i))
        # gathered tables read only as MatMul weights stay int8: y -> (int8 rows, their scales)
        int_b = {}
        for n in g.node:
            if n.op_type == "Gather" and n.input[0] in targets and \
                    all(r.op_type == "MatMul" and i == 1 for r, i in readers.get(n.output[0], [])):
                int_b[n.output[0]] = (f"{n.output[0]}/q", f"{n.output[0]}/s")
        int_b.update({t: (f"{t}::q8", f"{t}::s8") for t in targets})
        out = []
        for n in g.node:
            if n.op_type == "Gather" and n.input[0] in targets:  # int8 rows and their scales
                w, idx, y = n.input[0], n.input[1], n.output[0]
                out += [helper.make_node("Gather", [f"{w}::q8", idx], [f"{y}/q"], name=f"{n.name}/q", axis=0),
                        helper.make_node("Gather", [f"{w}::s8", idx], [f"{y}/s"], name=f"{n.name}/s", axis=0)]
                if y not in int_b:  # read elsewhere too: dequantize
                    out += [helper.make_node("Cast", [f"{y}/q"], [f"{y}/f"], name=f"{n.name}/cast", to=TensorProto.FLOAT),
                            helper.make_node("Mul", [f"{y}/f", f"{y}/s"], [y], name=f"{n.name}/dq")]
                continue
            if n.op_type == "MatMul" and n.input[1] in int_b:
                a, y, p = n.input[0], n.output[0], f"{n.name or n.output[0]}/int8"
                bq, bs = int_b[n.input[1]]
                out += [helper.make_node("DynamicQuantizeLinear", [a], [f"{p}/aq", f"{p}/as", f"{p}/azp"], name=f"{p}/dql"),
                        helper.make_node("MatMulInteger", [f"{p}/aq", bq, f"{p}/azp"], [f"{p}/acc"], name=f"{p}/mmi"),
                        helper.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], name=f"{p}/cast", to=TensorProto.FLOAT),
                        helper.make_node("Mul", [f"{p}/as", bs], [f"{p}/scale"], name=f"{p}/scale"),
                        helper.make_node("Mul", [f"{p}/accf", f"{p}/scale"], [y], name=f"{p}/dq")]
                continue
            uses = [i for i in n.input if i in targets]
            if uses:  # any other reader of a whole table: dequantize it once per call
                for w in set(uses):
                    d = f"{n.name}/{w}::dq"
                    out += [helper.make_node("Cast", [f"{w}::q8"], [f"{d}/f"], name=f"{d}/cast", to=TensorProto.FLOAT),
                            helper.make_node("Mul", [f"{d}/f", f"{w}::s8"], [d], name=f"{d}/mul")]
                    n.input[:] = [d if i == w else i for i in n.input]
            out.append(n)
        del g.node[:]
        g.node.extend(out)
    model.graph.initializer.extend(new_inits)
    return len(targets)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., K] values in 0..15 -> [..., K/2] bytes, element 2i in the low nibble."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _int4_experts(model, block: int) -> int:
    """Standard-lowering experts -> int4 blocks along the last axis (GatherBlockQuantized's
    packed axis; onnxruntime 1.32 refuses scales blocked along another axis of packed data:
    for both the [E, D, F] gate/up and [E, F, D] down tables that is the output axis, not the
    reduction axis), read with
    com.microsoft::GatherBlockQuantized: the top-k Gather becomes a quantized gather, and each
    dense use dequantizes the whole table (a gather of every expert). Tables whose sizes do
    not fit the block or the packing stay fp32. Returns how many tables were quantized."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    targets = {}
    for name in (n for n in inits if "::EDF" in n or "::EFD" in n):
        w = tensor_rows(inits[name])
        if w.shape[2] % block:
            continue
        q, scale = _per_expert(w, lambda x: quantize_last_axis(x, 4, block))  # [E, A, B/2] packed, [E, A, B/bs]
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}::q4"),
                                        numpy_helper.from_array(scale, f"{name}::s4")])
        targets[name] = w.shape[0]
    if not targets:
        return 0
    attrs = dict(domain="com.microsoft", bits=4, block_size=block, gather_axis=0, quantize_axis=2)
    for g in iter_graphs(model.graph):
        out = []
        for n in g.node:
            if n.op_type == "Gather" and n.input and n.input[0] in targets:
                w = n.input[0]
                out.append(helper.make_node("GatherBlockQuantized", [f"{w}::q4", n.input[1], f"{w}::s4"], list(n.output),
                                            name=f"{n.name}/q4", **attrs))
                continue
            for w in {i for i in n.input if i in targets}:  # dense branch: every expert, dequantized
                d, all_e = f"{n.name}/{w}::dq4", f"{w}::all_experts"
                if all_e not in inits:
                    model.graph.initializer.append(numpy_helper.from_array(np.arange(targets[w], dtype=np.int64), all_e))
                    inits[all_e] = None
                out.append(helper.make_node("GatherBlockQuantized", [f"{w}::q4", all_e, f"{w}::s4"], [d],
                                            name=f"{d}/gather", **attrs))
                n.input[:] = [d if i == w else i for i in n.input]
            out.append(n)
        del g.node[:]
        g.node.extend(out)
    return len(targets)


def quantize_last_axis(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[E, N, K] fp32 -> (uint8 weights [E, N, K*bits/8] with zero point 2^(bits-1), int4
    packed low nibble first; scales [E, N] or [E, N, K/block]): symmetric, per row or per
    block along the last axis. The layout of QMoE weights and of GatherBlockQuantized data."""
    E, N, K = w.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(E, N, K // block, block) if block else w[..., None, :]
    scale = np.abs(blocks).max(-1) / qmax
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / scale[..., None]), -qmax - 1, qmax).reshape(E, N, K) + 2 ** (bits - 1)
    q = q.astype(np.uint8) if bits == 8 else _pack_nibbles(q)
    return np.ascontiguousarray(q), np.ascontiguousarray((scale if block else scale[..., 0]).astype(np.float32))


def _qmoe(model, bits: int, block_size: int, accuracy_level: int) -> str:
    """The `ort` lowering's com.microsoft::MoE nodes -> com.microsoft::QMoE with int8 or int4
    expert weights in blocks of `block_size` along K when both the hidden and expert sizes
    divide by it, as QMoE requires (else per output row), same fused interleaved SwiGLU
    layout. Blocked is also the fast kernel: onnxruntime 1.32's CPU QMoE took 248 us per
    batch-1 call per output row against 35 us (int8) / 65 us (int4) blocked, bench-preset
    shapes (benchmarks/decode_profile.py). `accuracy_level` 4 lets blocked int4 experts use
    int8 activations and int8 dot products, as MatMulNBits does: at 1b, QMoE went from 60 to
    20 ms per token here (0 keeps fp32 activations; blocked int8 always uses int8 ones).
    Returns what was done ("" when there is no MoE node)."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    done: dict[tuple[str, int], tuple[str, str]] = {}
    kinds = set()
    for g in iter_graphs(model.graph):
        out = []
        for n in g.node:
            if not (n.domain == "com.microsoft" and n.op_type == "MoE"):
                out.append(n)
                continue
            x, router, fc1, _, fc2 = list(n.input)[:5]
            w1, w2 = (tensor_rows(inits[name]) for name in (fc1, fc2))
            block = block_size if w1.shape[2] % block_size == 0 and w2.shape[2] % block_size == 0 else 0
            kinds.add(f"blocks of {block}" if block else "per output row")
            ins = []
            for name, w in ((fc1, w1), (fc2, w2)):
                if (name, block) not in done:
                    q, sc = _per_expert(w, lambda x: quantize_last_axis(x, bits, block))
                    done[(name, block)] = (f"{name}::q{bits}b{block}", f"{name}::s{bits}b{block}")
                    model.graph.initializer.extend([numpy_helper.from_array(q, done[(name, block)][0]),
                                                    numpy_helper.from_array(sc, done[(name, block)][1])])
                ins += [*done[(name, block)], ""]
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            out.append(helper.make_node("QMoE", [x, router, *ins[:-1]], list(n.output), name=n.name or None,
                                        domain="com.microsoft", expert_weight_bits=bits, **attrs,
                                        **({"block_size": block, "accuracy_level": accuracy_level} if block else {})))
        del g.node[:]
        g.node.extend(out)
    return f"int{bits} QMoE ({', '.join(sorted(kinds))})" if kinds else ""


def _replace_node(graph, old, new: list) -> None:
    """Put `new` where `old` was in `graph`'s node list (order kept for readability)."""
    nodes = []
    for n in graph.node:
        nodes.extend(new if n is old else [n])
    del graph.node[:]
    graph.node.extend(nodes)


def gemms_to_matmuls(model) -> int:
    """Gemm(A, W^T, bias) with a constant 2-D weight -> MatMul(A, W [K, N]) (+ Add bias), in
    every graph and Loop/If body: onnxruntime's MatMulNBits quantizer only takes MatMul, and
    the torch exporter writes the 2-D linears (shared experts, router) as Gemm. The weight
    is transposed once here; a Gemm read by several nodes shares one transposed copy.
    Returns the number of Gemms rewritten."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for g in iter_graphs(model.graph):
        nodes = []
        for n in g.node:
            w = inits.get(n.input[1]) if n.op_type == "Gemm" and len(n.input) > 1 else None
            if (w is None or len(w.dims) != 2 or node_attr(n, "transA", 0) or node_attr(n, "alpha", 1.0) != 1.0
                    or node_attr(n, "beta", 1.0) != 1.0):
                nodes.append(n)
                continue
            kn = f"{w.name}::kn" if node_attr(n, "transB", 0) else w.name
            if kn not in inits:
                inits[kn] = numpy_helper.from_array(np.ascontiguousarray(tensor_array(w).T), kn)
                model.graph.initializer.append(inits[kn])
            if len(n.input) > 2 and n.input[2]:
                mid = f"{n.output[0]}/matmul"
                nodes += [helper.make_node("MatMul", [n.input[0], kn], [mid], name=f"{n.name}/matmul"),
                          helper.make_node("Add", [mid, n.input[2]], [n.output[0]], name=f"{n.name}/bias")]
            else:
                nodes.append(helper.make_node("MatMul", [n.input[0], kn], [n.output[0]], name=n.name))
            done += 1
        del g.node[:]
        g.node.extend(nodes)
    return done


def merge_sibling_matmuls(model, exclude: tuple[str, ...] = ()) -> int:
    """MatMuls that read the same input with constant 2-D weights (the query and KV down
    projections; the shared expert's gate and up and the router) -> one MatMul over the
    weights concatenated along N, then a Split: fewer, larger kernels (each MatMulNBits call
    quantizes its input and dispatches threads; at decode that fixed cost is most of a small
    MatMul). Per output column nothing changes, so the quantized numbers are the same.
    Merged weights are built once and shared by every unrolled copy. Returns the number of
    MatMuls removed."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    merged: dict[tuple[str, ...], str] = {}
    removed = 0
    for g in iter_graphs(model.graph):
        groups: dict[str, list] = {}
        for n in g.node:
            w = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
            if w is not None and len(w.dims) == 2 and not any(e in n.name for e in exclude):
                groups.setdefault(n.input[0], []).append(n)
        replace: dict[int, list] = {}
        drop: set[int] = set()
        for a, members in groups.items():
            ks = {inits[m.input[1]].dims[0] for m in members}
            if len(members) < 2 or len(ks) != 1:
                continue
            key = tuple(m.input[1] for m in members)
            if key not in merged:
                name = "::".join(key) + "::merged"
                arrays = [tensor_array(inits[k]) for k in key]
                inits[name] = numpy_helper.from_array(np.concatenate(arrays, axis=1), name)
                sizes = f"{name}::split"
                inits[sizes] = numpy_helper.from_array(np.array([x.shape[1] for x in arrays], np.int64), sizes)
                model.graph.initializer.extend([inits[name], inits[sizes]])
                merged[key] = name
            name, first = merged[key], members[0]
            out = f"{first.output[0]}/merged"
            replace[id(first)] = [
                helper.make_node("MatMul", [a, name], [out], name=f"{first.name}/merged"),
                helper.make_node("Split", [out, f"{name}::split"], [m.output[0] for m in members],
                                 name=f"{first.name}/split", axis=-1)]
            drop.update(id(m) for m in members[1:])
            removed += len(members) - 1
        if replace:
            nodes = []
            for n in g.node:
                if id(n) in drop:
                    continue
                nodes.extend(replace.get(id(n), [n]))
            del g.node[:]
            g.node.extend(nodes)
    return removed


@contextlib.contextmanager
def _quiet_quantizers():
    """onnxruntime's quantizers log every node at INFO (and a pre-processing hint on the root
    logger); keep the CLI's output to what this tool says."""
    names = ["", "onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _nbits_embedding(model, bits: int) -> bool:
    """After MatMulNBits, the tied head is int4/int8 for the head MatMul but the embedding
    Gather still reads the fp32 table. Gather quantized rows of the head instead (com.microsoft::
    GatherBlockQuantized over the same bytes and scales: MatMulNBits' [N, blocks, blob] is
    [N, K*bits/8] row-major, both use zero point 2^(bits-1)) and drop the fp32 copy."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"
               and f"{n.input[0]}_Q{bits}" in inits and f"{n.input[0]}_scales" in inits]
    if len(gathers) != 1:
        return False
    g = gathers[0]
    head = g.input[0]
    q = f"{head}_Q{bits}"
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == q]
    if node_attr(g, "axis", 0) != 1 or len(nbits) != 1 or len(nbits[0].input) > 3 or node_attr(nbits[0], "bits") != bits:
        return False  # the layout this rewrite knows: table [D, V] gathered on axis 1, symmetric
    N, K, bs = (node_attr(nbits[0], a) for a in ("N", "K", "block_size"))
    y = g.output[0]
    shape = f"{q}::rows_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([N, -(-K // bs) * bs * bits // 8], np.int64), shape))
    new = [helper.make_node("Reshape", [q, shape], [f"{y}/rows"], name=f"{g.name}/rows"),
           helper.make_node("GatherBlockQuantized", [f"{y}/rows", "input_ids", f"{head}_scales"], [f"{y}/btd"],
                            name=f"{g.name}/q{bits}", domain="com.microsoft", bits=bits, block_size=bs, gather_axis=0,
                            quantize_axis=1),
           helper.make_node("Transpose", [f"{y}/btd"], [y], name=f"{g.name}/dbt", perm=[2, 0, 1])]
    if K % bs:  # MatMulNBits pads K to whole blocks: the gathered rows carry the padding, cut it
        bounds = [f"{q}::rows_{k}" for k in ("start", "end", "axis")]
        model.graph.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), name)
                                       for name, v in zip(bounds, (0, K, 2)))
        new[-1:] = [helper.make_node("Slice", [f"{y}/btd", *bounds], [f"{y}/cut"], name=f"{g.name}/cut"),
                    helper.make_node("Transpose", [f"{y}/cut"], [y], name=f"{g.name}/dbt", perm=[2, 0, 1])]
    _replace_node(model.graph, g, new)
    return True


def quantize_graph(src: Path, dst: Path, mode: str, moe: str, *, block_size: int, accuracy_level: int,
                   exclude: tuple[str, ...]) -> dict:
    """Quantize one graph file (mode int8 | int4; `moe` is the export's MoE lowering); returns
    what was done (recorded in the manifest)."""
    import onnx

    from mythos_deploy.exporters import graph_passes
    from mythos_deploy.exporters.external_data import adopt, materialize, write_model
    # weights stay in the source's external data (memory-mapped) until a pass reads them:
    # the expert tables are quantized expert by expert and never read whole
    model = onnx.load(str(src), load_external_data=False)
    adopt(model, src.parent)
    info: dict = {"mode": mode}
    with _quiet_quantizers():
        if mode in ("int8", "int4"):
            bits = 8 if mode == "int8" else 4
            info["gemms_as_matmul"] = gemms_to_matmuls(model)
            info["matmuls_merged"] = merge_sibling_matmuls(model, exclude)
            # onnxruntime's quantizer reads raw_data: the 2-D weights inline, expert tables not
            tables = _expert_tables(model)
            materialize(model, keep_external=lambda t: t.name in tables)
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=_excluded(model, exclude))
            q.process()
            model = q.model.model
            if moe == "ort":
                experts = _qmoe(model, bits, block_size, accuracy_level)
            elif bits == 8:
                experts = f"int8 tables, integer MatMuls ({_int8_experts(model)} tables)"
            else:
                n = _int4_experts(model, block_size)
                experts = f"int4 weight-only ({n} tables, GatherBlockQuantized)" if n else "fp32"
            embedding = (f"int{bits} rows of the head (GatherBlockQuantized)" if _nbits_embedding(model, bits)
                         else "fp32")
            info.update(weights=f"int{bits} MatMulNBits, blocks of {block_size} along K",
                        experts=experts, embedding=embedding, block_size=block_size,
                        accuracy_level=accuracy_level)
        else:
            raise InputError("fp16 is produced by re-export (see quantize_artifact)")
    model = graph_passes.pruned(model)  # the quantizers reorder nodes without regard to If/Loop bodies
    write_model(model, dst.parent, dst.name)  # external data above the threshold, as exports
    onnx.checker.check_model(str(dst), full_check=True)
    return info


def _expert_tables(model) -> set[str]:
    """Names of the MoE expert tables (the MoE nodes' weights, the standard lowering's
    [E, D, F] / [E, F, D] tables): quantized by this module, expert by expert."""
    names = {t.name for t in model.graph.initializer if "::EDF" in t.name or "::EFD" in t.name}
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.domain == "com.microsoft" and n.op_type in ("MoE", "QMoE"):
                names.update(i for i in list(n.input)[2:] if i)
    return names
