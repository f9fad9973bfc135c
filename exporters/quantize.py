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

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from exporters.onnx_compose import iter_graphs, node_attr
from exporters.qdq import QDQ_MODES
from mythos_deploy.errors import CheckpointError, InputError, ParityError
from mythos_deploy.manifest import atomic_output_dir, carried_fields, check_writable, read_manifest, write_manifest

ORT_MODES = ("int8", "int4", "fp16")
MODES = (*ORT_MODES, *QDQ_MODES)
MIN_AGREEMENT = {"int8": 0.98, "int4": 0.90, "fp16": 0.99, "qdq-int8": 0.98, "qdq-int4": 0.90, "fp8": 0.98}
# on a model trained on the multi-hop task (the demo checkpoint): largest allowed drop in task
# accuracy (hops 1-4 at the trained depth, 100 problems each), in percentage points
MAX_TASK_DROP = {"int8": 1.0, "int4": 3.0, "fp16": 0.5, "qdq-int8": 1.0, "qdq-int4": 3.0, "fp8": 1.0}
TASK_HOPS, TASK_COUNT = (1, 2, 3, 4), 100


def _trained_on_hops(manifest: dict) -> bool:
    """Whether the export's source checkpoint is a train-demo checkpoint (task accuracy applies)."""
    ckpt = Path(manifest.get("source", {}).get("checkpoint", ""))
    try:
        src = read_manifest(ckpt)
    except Exception:  # missing or unreadable: no task gate, the logit gate still applies
        return False
    return src.get("source", {}).get("task") == "hops"


def task_gate(base, quant, mode: str) -> dict:
    """Task accuracy of the fp32 and quantized artifacts on the same problems."""
    from runtimes import hops_eval
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
    mode: str = "int8"
    block_size: int = 32  # int4
    accuracy_level: int = 4  # int4: 4 = int8 compute (fast); 0 = fp32 compute
    exclude: tuple[str, ...] = ()  # node names (or substrings) left in float
    gate_tokens: int = 256
    calib_prompts: int = 8  # qdq-int8 / fp8 activation calibration
    accept_accuracy_loss: bool = False  # record and skip the gate

    def check(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise InputError(f"--block-size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"--accuracy-level must be in 0..4, got {self.accuracy_level}")
        if self.gate_tokens < 16:
            raise InputError(f"--gate-tokens must be >= 16, got {self.gate_tokens}")
        if not 1 <= self.calib_prompts <= 1024:
            raise InputError(f"--calib must be in 1..1024 prompts, got {self.calib_prompts}")


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
    for name in targets:
        w = numpy_helper.to_array(inits[name]).astype(np.float32)  # [E, in, out]
        scale = np.abs(w).max(axis=1, keepdims=True) / 127.0  # per (expert, output channel)
        scale[scale == 0] = 1.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
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
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        if w.shape[2] % block:
            continue
        q, scale = _quantize_last_axis(w, 4, block)  # [E, A, B/2] packed, [E, A, B/bs]
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


def _quantize_last_axis(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
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


def _qmoe(model, bits: int, block_size: int) -> str:
    """The `ort` lowering's com.microsoft::MoE nodes -> com.microsoft::QMoE with int8 or int4
    expert weights in blocks of `block_size` along K when both the hidden and expert sizes
    divide by it, as QMoE requires (else per output row), same fused interleaved SwiGLU
    layout. Blocked is also the fast kernel: onnxruntime 1.32's CPU QMoE took 248 us per
    batch-1 call per output row against 35 us (int8) / 65 us (int4) blocked, bench-preset
    shapes (benchmarks/decode_profile.py). Returns what was done ("" when there is no MoE node)."""
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
            w1, w2 = (numpy_helper.to_array(inits[name]).astype(np.float32) for name in (fc1, fc2))
            block = block_size if w1.shape[2] % block_size == 0 and w2.shape[2] % block_size == 0 else 0
            kinds.add(f"blocks of {block}" if block else "per output row")
            ins = []
            for name, w in ((fc1, w1), (fc2, w2)):
                if (name, block) not in done:
                    q, sc = _quantize_last_axis(w, bits, block)
                    done[(name, block)] = (f"{name}::q{bits}b{block}", f"{name}::s{bits}b{block}")
                    model.graph.initializer.extend([numpy_helper.from_array(q, done[(name, block)][0]),
                                                    numpy_helper.from_array(sc, done[(name, block)][1])])
                ins += [*done[(name, block)], ""]
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            out.append(helper.make_node("QMoE", [x, router, *ins[:-1]], list(n.output), name=n.name or None,
                                        domain="com.microsoft", expert_weight_bits=bits, **attrs,
                                        **({"block_size": block} if block else {})))
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


def _gemms_to_matmuls(model) -> int:
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
                inits[kn] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), kn)
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


def _merge_sibling_matmuls(model, exclude: tuple[str, ...] = ()) -> int:
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
                arrays = [numpy_helper.to_array(inits[k]) for k in key]
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
    _replace_node(model.graph, g, new)
    return True


def quantize_graph(src: Path, dst: Path, opts: QuantizeOptions, moe: str) -> dict:
    """Quantize one graph file; returns what was done (recorded in the manifest)."""
    import onnx

    from exporters.onnx_compose import IR_VERSION, prune_initializers, toposort
    model = onnx.load(str(src))
    info: dict = {"mode": opts.mode}
    with _quiet_quantizers():
        if opts.mode in ("int8", "int4"):
            bits = 8 if opts.mode == "int8" else 4
            info["gemms_as_matmul"] = _gemms_to_matmuls(model)
            info["matmuls_merged"] = _merge_sibling_matmuls(model, opts.exclude)
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=opts.block_size, is_symmetric=True,
                                     accuracy_level=opts.accuracy_level, nodes_to_exclude=_excluded(model, opts.exclude))
            q.process()
            model = q.model.model
            if moe == "ort":
                experts = _qmoe(model, bits, opts.block_size)
            elif bits == 8:
                experts = f"int8 tables, integer MatMuls ({_int8_experts(model)} tables)"
            else:
                n = _int4_experts(model, opts.block_size)
                experts = f"int4 weight-only ({n} tables, GatherBlockQuantized)" if n else "fp32"
            embedding = (f"int{bits} rows of the head (GatherBlockQuantized)" if _nbits_embedding(model, bits)
                         else "fp32")
            info.update(weights=f"int{bits} MatMulNBits, blocks of {opts.block_size} along K",
                        experts=experts, embedding=embedding, block_size=opts.block_size,
                        accuracy_level=opts.accuracy_level)
        else:
            raise InputError("fp16 is produced by re-export (see quantize_artifact)")
    prune_initializers(model)
    toposort(model.graph)  # the quantizers reorder nodes without regard to If/Loop bodies
    model.ir_version = IR_VERSION
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return info


def quantize_artifact(src_dir: str | Path, out_dir: str | Path, opts: QuantizeOptions = QuantizeOptions(),
                      overwrite: bool = False, stage: Callable[[str], None] | None = None) -> dict:
    from runtimes.loader import load
    from runtimes.onnx_runner import graph_files, open_onnx_artifact
    from runtimes.parity import compare
    stage = stage or (lambda s: None)
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    opts.check()
    manifest, _ = open_onnx_artifact(src_dir, "quantize")
    if manifest.get("quantization"):
        raise InputError(f"{src_dir} is already quantized ({manifest['quantization']['mode']}); quantize the fp32 export")
    options = manifest["options"]
    if opts.mode in QDQ_MODES:
        if options["loop"] == "loop" and opts.mode != "qdq-int4":
            raise InputError(f"{opts.mode} takes a --loop unroll or --loop stepped export: activations inside an ONNX "
                             "Loop body cannot be calibrated (qdq-int4, weight-only, takes loop exports too)")
        if options["moe"] == "ort":
            raise InputError(f"{opts.mode} is for TensorRT, which cannot parse the ort lowering's com.microsoft::MoE; "
                             "export with --moe plugin (or standard)")
    elif options["moe"] == "plugin":
        raise InputError(f"this artifact uses the TensorRT MoE plugin; {opts.mode} is an onnxruntime mode and needs a "
                         "--moe standard or ort export (the TensorRT modes are qdq-int8, qdq-int4, fp8)")
    if options["dtype"] != "fp32":
        raise InputError(f"quantize an fp32 export (this one is {options['dtype']})")
    check_writable(out_dir, overwrite)
    t0 = time.perf_counter()
    if opts.mode == "fp16":
        return _fp16_reexport(src_dir, out_dir, manifest, opts, overwrite, stage, t0)
    files = graph_files(options["loop"])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        from runtimes.onnxruntime_backend import OrtBackend
        if opts.mode in QDQ_MODES:
            info, base, quant = _qdq_graphs(src_dir, work, files, manifest, opts, stage)
        else:
            info = {}
            for name, f in files.items():
                stage(f"quantize {f} ({opts.mode})")
                info[name] = quantize_graph(src_dir / f, work / f, opts, options["moe"])
            base = load(src_dir, verify=False)
            quant = OrtBackend(work, {**manifest, "quantization": {**asdict(opts), "graphs": info}})
        for f in files.values():
            if (work / f).stat().st_size == 0:
                raise ParityError(f"quantized {f} is empty")
        stage("accuracy gate")
        cfg = base.cfg
        per = min(64, cfg.max_seq_len - 8)
        n_prompts = max(1, -(-opts.gate_tokens // per))
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(n_prompts, 8)).tolist()
        report = compare(base, quant, prompts, per, tolerance=float("inf"), min_agreement=MIN_AGREEMENT[opts.mode])
        finite = all(np.isfinite(r["max_abs_logit_error"]) for r in report["prompts"])
        report["passed"] = bool(report["passed"] and finite)
        task = None
        if _trained_on_hops(manifest):
            stage("accuracy gate: task accuracy")
            task = task_gate(base, quant, opts.mode)
        passed = report["passed"] and (task is None or task["passed"])
        gate = {"positions": n_prompts * per, "greedy_agreement": report["greedy_agreement"],
                "min_agreement": MIN_AGREEMENT[opts.mode], "max_abs_logit_error": report["max_abs_logit_error"],
                "task": task, "passed": passed, "overridden": bool(opts.accept_accuracy_loss and not passed)}
        if not passed and not opts.accept_accuracy_loss:
            why = (f"greedy agreement {report['greedy_agreement']:.4f} < {MIN_AGREEMENT[opts.mode]} over "
                   f"{gate['positions']} positions (max abs logit error {report['max_abs_logit_error']:.3g})"
                   if not report["passed"] else
                   f"task accuracy {task['accuracy']:.3f} vs fp32 {task['accuracy_fp32']:.3f}: a drop of "
                   f"{task['drop_points']} points > {task['max_drop_points']}")
            raise ParityError(f"{opts.mode} quantization fails the accuracy gate: {why}; "
                              "--accept-accuracy-loss overrides (recorded in the manifest)", {**report, "task": task})
        stage("write artifact")
        with atomic_output_dir(out_dir, overwrite) as tmp:
            for f in files.values():
                shutil.copyfile(work / f, tmp / f)
            (tmp / "validation.json").write_text(json.dumps({"quantization_gate": gate, "report": report}, indent=2) + "\n")
            fields = carried_fields(manifest)
            fields["quantization"] = {**asdict(opts), "graphs": info, "gate": gate,
                                      "source": {"artifact": str(src_dir)}}
            out_manifest = write_manifest(tmp, "onnx", **fields)
    sizes = {"source_bytes": sum((src_dir / f).stat().st_size for f in files.values()),
             "quantized_bytes": sum((out_dir / f).stat().st_size for f in files.values())}
    return {"manifest": out_manifest, "gate": gate, "sizes": sizes, "seconds": time.perf_counter() - t0}


def _qdq_graphs(src_dir: Path, work: Path, files: dict, manifest: dict, opts: QuantizeOptions, stage):
    """TensorRT Q/DQ: quantize each graph into `work` (the artifact's files), lint it, and
    return what was done plus two onnxruntime backends for the gate: the fp32 source and the
    quantized graphs, both with plugin nodes in their standard form (int4 weights dequantized)."""
    import copy

    import onnx

    from exporters import qdq
    from exporters.moe_lowering import lower_moe
    from exporters.onnx_compose import IR_VERSION
    from exporters.onnx_ops import register_schemas
    from exporters.trt_lint import _zero_points, lint_model
    from mythos_deploy.errors import InternalError
    from runtimes.onnxruntime_backend import OrtBackend
    register_schemas()
    plugin = manifest["options"]["moe"] == "plugin"
    runnable = (lambda m: lower_moe(copy.deepcopy(m), "standard")) if plugin else (lambda m: m)
    models = {name: onnx.load(str(src_dir / f)) for name, f in files.items()}
    uses = {name: qdq.weight_matmuls(m, opts.exclude, subgraphs=opts.mode == "qdq-int4") for name, m in models.items()}
    kind = {"qdq-int8": "int8", "fp8": "fp8"}.get(opts.mode)
    fp32 = {n: runnable(m) for n, m in models.items()}  # the source as onnxruntime runs it
    amax = {}
    if kind:
        stage(f"calibrate activations ({opts.calib_prompts} generated prompts)")
        amax = qdq.calibrate(fp32, {n: qdq.activations(u) for n, u in uses.items()}, manifest,
                             n_prompts=opts.calib_prompts)
    std_manifest = {**manifest, "options": {**manifest["options"], "moe": "standard"}}
    (work / "ort").mkdir()
    if plugin:
        (work / "base").mkdir()
    info = {}
    for name, f in files.items():
        stage(f"quantize {f} ({opts.mode})")
        m = models[name]
        if plugin:
            onnx.save(fp32[name], str(work / "base" / f))
        done = (qdq.insert_qdq(m, uses[name], amax.get(name, {}), kind) if kind
                else qdq.insert_int4(m, uses[name], opts.block_size))
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m, full_check=True)
        findings = [x for x in lint_model(m, name) + _zero_points(m) if x.severity == "error"]
        if findings:
            raise InternalError(f"{opts.mode} graph {f} fails the TensorRT lint: " + "; ".join(x.message for x in findings[:3]))
        onnx.save(m, str(work / f))
        onnx.save(qdq.ort_copy(runnable(m)), str(work / "ort" / f))
        info[name] = {"mode": opts.mode, **done, "target": "tensorrt (explicit quantization)",
                      "experts": ("float inside the MythosMoE plugin (no int path)" if plugin
                                  else "float (standard lowering's expert tables and If branches)"),
                      **({"block_size": opts.block_size} if opts.mode == "qdq-int4" else
                         {"calibration": f"max |x| over {opts.calib_prompts} generated prompts"})}
    base = OrtBackend(work / "base" if plugin else src_dir, std_manifest if plugin else manifest)
    return info, base, OrtBackend(work / "ort", {**std_manifest, "quantization": {"mode": opts.mode}})


def _fp16_reexport(src_dir: Path, out_dir: Path, manifest: dict, opts: QuantizeOptions, overwrite: bool,
                   stage, t0: float) -> dict:
    """Re-export the source checkpoint in fp16 into scratch space (the export's fp16 parity gate
    runs there), add the task gate for train-demo checkpoints, then write OUT_DIR atomically."""
    from exporters.onnx_export import OnnxExportOptions, export_onnx
    from mythos_deploy.checkpoint import checkpoint_sha256
    from runtimes.loader import load
    from runtimes.onnx_runner import graph_files
    from runtimes.onnxruntime_backend import OrtBackend
    source = manifest.get("source", {})
    ckpt = Path(source.get("checkpoint", ""))
    if not (ckpt / "model.safetensors").is_file():
        raise InputError(f"--mode fp16 re-exports from the source checkpoint, which is not at {ckpt}; "
                         "run: mythos-export onnx CKPT --dtype fp16")
    if checkpoint_sha256(ckpt) != source.get("sha256"):
        raise CheckpointError(f"{ckpt} changed since {src_dir} was exported (sha256 differs)")
    o = manifest["options"]
    if o["moe"] == "ort":
        raise InputError("fp16 with the ort MoE lowering cannot be validated on onnxruntime CPU (fp32-only MoE kernel)")
    files = graph_files(o["loop"])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "fp16"
        result = export_onnx(ckpt, work, OnnxExportOptions(loop=o["loop"], loops=o["loops"], moe=o["moe"], opset=o["opset"],
                                                           dtype="fp16", mla=o.get("mla", "absorbed"),
                                                           past=o.get("past", "masked")), stage=stage)
        exported = read_manifest(work)
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
            for f in exported["files"]:  # graphs, external weights, validation.json
                shutil.copyfile(work / f, tmp / f)
            fields = carried_fields(exported)
            fields["quantization"] = {**asdict(opts), "method": "native fp16 re-export", "gate": gate,
                                      "source": {"artifact": str(src_dir)}}
            out_manifest = write_manifest(tmp, "onnx", **fields)
    return {"manifest": out_manifest, "gate": gate, "seconds": time.perf_counter() - t0,
            "sizes": {"source_bytes": sum((src_dir / f).stat().st_size for f in files.values()),
                      "quantized_bytes": sum((out_dir / f).stat().st_size for f in files.values())}}
