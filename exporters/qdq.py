"""TensorRT explicit quantization (Q/DQ) of exported graphs: `qdq-int8`, `qdq-int4`, `fp8`.

TensorRT builds an engine's precision from the Q/DQ nodes in the graph (explicit quantization).
This module writes them itself rather than through onnxruntime's static quantizer, so that the
result is what TensorRT's parser wants and nothing else: every scale positive, every zero point
exactly 0, weights stored quantized behind a DequantizeLinear, activations as a
QuantizeLinear -> DequantizeLinear pair in front of each weight MatMul/Gemm.

- `qdq-int8`: weights int8, symmetric, per output channel; activations int8, symmetric, per
  tensor, scale = calibrated max |x| / 127.
- `fp8`: FLOAT8E4M3FN weights (per tensor) and activations (per tensor), scale = max / 448;
  needs default-domain opset 19 (the graph's opset is raised from 18: no op these graphs use
  changed meaning between 18 and 19). Hopper/Ada GPUs (sm_89+), not Jetson Orin.
- `qdq-int4`: weight-only, blocked along the reduction axis (`block_size`), symmetric. The
  ONNX DequantizeLinear only takes int4 blocks from opset 21, past TensorRT 10.1's parser
  (opsets 9-20), so the node is `trt::TRT_INT4DequantizeLinear`, the custom op TensorRT's
  parser imports as an INT4 IDequantizeLayer (same inputs and attributes as the opset-21 op).

Scope: MatMul/Gemm nodes whose weight is a 2-D fp32 initializer of the top-level graph: in
the top-level graph for qdq-int8/fp8 (their activations are calibrated through graph
outputs), and also inside Loop/If bodies for weight-only qdq-int4 (so `loop` exports work
there). The routed experts (3-D tables, or the MythosMoE plugin's inputs) stay float: the
plugin has no int8/int4 path yet.
Activations are calibrated by running the graphs with onnxruntime on generated data: seeded
random prompts followed by the model's own greedy continuation.

onnxruntime cannot run `trt::` nodes, so the accuracy gate runs `ort_copy(...)`: the same graph
with each int4 DequantizeLinear replaced by the fp32 values it computes (q * scale, exactly).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from mythos_deploy.exporters import graph_passes
from mythos_deploy.exporters.external_data import new_tensor, tensor_array
from mythos_deploy.exporters.onnx_compose import iter_graphs, node_attr

TRT_DOMAIN, TRT_INT4_DQ = "trt", "TRT_INT4DequantizeLinear"
if TYPE_CHECKING:
    from mythos_deploy.manifest import Manifest

INT8_MAX, INT4_MAX, FP8_MAX = 127.0, 7.0, 448.0
FP8_OPSET = 19


@dataclass
class WeightUse:
    node: object  # MatMul or Gemm NodeProto of the top-level graph
    weight: str  # its 2-D fp32 initializer
    k_axis: int  # the weight's reduction axis: 0 for MatMul B [K, N], 1 for Gemm with transB


def weight_matmuls(model, exclude: tuple[str, ...] = (), subgraphs: bool = False) -> list[WeightUse]:
    """MatMul/Gemm nodes whose weight is a 2-D fp32 initializer of the top-level graph; with
    `subgraphs`, also those inside Loop/If bodies that read such an outer-scope weight (the
    weight-only int4 mode: no activation to calibrate there)."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    uses = []
    for g in iter_graphs(model.graph) if subgraphs else [model.graph]:
        local = {t.name for t in g.initializer} if g is not model.graph else set()
        for n in g.node:
            if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or any(e in n.name for e in exclude):
                continue
            w = inits.get(n.input[1])
            if w is None or n.input[1] in local or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
                continue
            if n.op_type == "Gemm" and node_attr(n, "transA", 0):
                continue
            uses.append(WeightUse(n, n.input[1], 1 if n.op_type == "Gemm" and node_attr(n, "transB", 0) else 0))
    return uses


def activations(uses: list[WeightUse]) -> list[str]:
    """The activation tensors to calibrate (first input of each quantized node), in order."""
    return list(dict.fromkeys(u.node.input[0] for u in uses))


def with_outputs(model, names: list[str]):
    """A copy of `model` that also outputs `names` (for calibration)."""
    from onnx import TensorProto, helper
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    return m


def _per_channel_int8(w: np.ndarray, k_axis: int) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(w).max(axis=k_axis)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    s = np.expand_dims(scale, k_axis)
    return np.clip(np.round(w / s), -INT8_MAX, INT8_MAX).astype(np.int8), scale


def _fp8(x: np.ndarray, scale: float) -> np.ndarray:
    import ml_dtypes  # a dependency of onnx
    return np.clip(x / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def insert_qdq(model, uses: list[WeightUse], amax: dict[str, float], kind: str) -> dict:
    """Quantize `uses` in place: weights behind DequantizeLinear, activations behind a Q/DQ
    pair with the calibrated scale. `kind` is int8 or fp8."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    qmax = INT8_MAX if kind == "int8" else FP8_MAX
    zero = np.int8(0) if kind == "int8" else np.array(0, ml_dtypes.float8_e4m3fn)
    new_inits, new_nodes, done_w, done_x = [], [], {}, {}
    for u in uses:
        key = (u.weight, u.k_axis)
        if key not in done_w:
            w = tensor_array(inits[u.weight]).astype(np.float32)  # read in place (external data: mmap)
            base = f"{u.weight}::{kind}/k{u.k_axis}"
            if kind == "int8":
                q, scale = _per_channel_int8(w, u.k_axis)
                zp = np.zeros(scale.shape, np.int8)
                attrs = {"axis": 1 - u.k_axis}
            else:
                scale = np.float32(max(float(np.abs(w).max()), 1e-12) / FP8_MAX)
                q, zp, attrs = _fp8(w, scale), zero, {}
            new_inits += [numpy_helper.from_array(q, f"{base}/q"), numpy_helper.from_array(np.asarray(scale, np.float32), f"{base}/s"),
                          numpy_helper.from_array(np.asarray(zp), f"{base}/zp")]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}/q", f"{base}/s", f"{base}/zp"], [f"{base}/dq"],
                                              name=f"{base}/DequantizeLinear", **attrs))
            done_w[key] = f"{base}/dq"
        x = u.node.input[0]
        if x not in done_x:
            a = float(amax.get(x, 0.0))
            scale = np.float32(a / qmax if a > 0 and np.isfinite(a) else 1.0)
            base = f"{x}::{kind}act"
            new_inits += [numpy_helper.from_array(np.asarray(scale, np.float32), f"{base}/s"),
                          numpy_helper.from_array(np.asarray(zero), f"{base}/zp")]
            new_nodes += [helper.make_node("QuantizeLinear", [x, f"{base}/s", f"{base}/zp"], [f"{base}/q"], name=f"{base}/QuantizeLinear"),
                          helper.make_node("DequantizeLinear", [f"{base}/q", f"{base}/s", f"{base}/zp"], [f"{base}/dq"],
                                           name=f"{base}/DequantizeLinear")]
            done_x[x] = f"{base}/dq"
        u.node.input[0], u.node.input[1] = done_x[x], done_w[key]
    model.graph.initializer.extend(new_inits)
    model.graph.node.extend(new_nodes)
    if kind == "fp8":
        _raise_opset(model, FP8_OPSET)
    graph_passes.prune(model)
    return {"weights": len(done_w), "activations": len(done_x), "matmuls": len(uses)}


def _raise_opset(model, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < version:
            imp.version = version


def insert_int4(model, uses: list[WeightUse], block_size: int) -> dict:
    """Weight-only int4 in place: each weight becomes int4 blocks of `block_size` along its
    reduction axis with one fp32 scale per block, behind trt::TRT_INT4DequantizeLinear."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    new_inits, new_nodes, done, skipped = [], [], {}, []
    for u in uses:
        key = (u.weight, u.k_axis)
        if key not in done:
            w = tensor_array(inits[u.weight]).astype(np.float32)  # read in place (external data: mmap)
            wk = w if u.k_axis == 0 else w.T  # [K, N]
            K, N = wk.shape
            if K % block_size:
                skipped.append(u.node.name)
                continue
            amax = np.abs(wk.reshape(K // block_size, block_size, N)).max(axis=1)
            scale = np.where(amax > 0, amax / INT4_MAX, 1.0).astype(np.float32)  # [K/bs, N]
            q = np.clip(np.round(wk / np.repeat(scale, block_size, axis=0)), -8, 7)
            if u.k_axis == 1:
                q, scale = q.T, scale.T
            base = f"{u.weight}::int4/k{u.k_axis}"
            new_inits += [numpy_helper.from_array(np.ascontiguousarray(q).astype(ml_dtypes.int4), f"{base}/q"),
                          numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}/s")]
            new_nodes.append(helper.make_node(TRT_INT4_DQ, [f"{base}/q", f"{base}/s"], [f"{base}/dq"], name=f"{base}/{TRT_INT4_DQ}",
                                              domain=TRT_DOMAIN, axis=u.k_axis, block_size=block_size))
            done[key] = f"{base}/dq"
        u.node.input[1] = done[key]
    model.graph.initializer.extend(new_inits)
    model.graph.node.extend(new_nodes)
    if new_nodes and not any(i.domain == TRT_DOMAIN for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    graph_passes.prune(model)
    return {"weights": len(done), "matmuls": len(uses) - len(skipped), "skipped_not_divisible": skipped}


def _dequantize(node, inits) -> np.ndarray:
    """What a DequantizeLinear (or the trt int4 one) of constant inputs computes, in fp32."""
    q = tensor_array(inits[node.input[0]]).astype(np.float32)
    s = tensor_array(inits[node.input[1]]).astype(np.float32)
    zp = (tensor_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2]
          else np.zeros_like(s))
    axis, block = node_attr(node, "axis", 1), node_attr(node, "block_size", 0)
    if block:  # blocked: scale has the data's rank, `block` elements per scale along axis
        return (q - np.repeat(zp, block, axis=axis)) * np.repeat(s, block, axis=axis)
    if s.ndim == 1:  # per channel along axis
        shape = [1] * q.ndim
        shape[axis % q.ndim] = s.size
        s, zp = s.reshape(shape), zp.reshape(shape)
    return (q - zp) * s


def ort_copy(model):
    """A copy onnxruntime runs as TensorRT would compute it: every DequantizeLinear of a
    constant weight (trt::TRT_INT4DequantizeLinear included, which onnxruntime cannot run)
    becomes the fp32 initializer it computes; activation Q/DQ pairs stay. Run fp8 graphs at
    ORT_ENABLE_BASIC (runtimes/onnx_runner.py does): at EXTENDED, onnxruntime 1.32 removes a
    Relu in front of an fp8 QuantizeLinear (its Relu+Q fusion reads the fp8 zero point as an
    integer type's minimum), which changes the numbers. In a store-backed model the fp32
    weights go to the store one at a time (never all in memory)."""
    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    keep, new = [], []
    for n in m.graph.node:
        if n.op_type in ("DequantizeLinear", TRT_INT4_DQ) and all(i in inits for i in n.input if i):
            new.append(new_tensor(m, _dequantize(n, inits), n.output[0]))
        else:
            keep.append(n)
    if new:
        del m.graph.node[:]
        m.graph.node.extend(keep)
        m.graph.initializer.extend(new)
        graph_passes.prune(m)  # the trt opset goes with its last node
    return m


def calibrate(graphs: dict, names: dict[str, list[str]], manifest: Manifest, workdir, n_prompts: int = 8,
              prompt_len: int = 16, new_tokens: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """max |x| of each tensor in `names[graph]` over generated data: seeded random prompts, each
    prefilled on an empty cache and continued greedily (the model's own tokens) through the
    cache, at the export's loop count. `graphs` must run in onnxruntime (plugin nodes lowered).
    A stepped export's exit=propagate fill graph is calibrated on the states the step graph
    sees: after each step call it runs on that call's h, e and loop index. The graphs, with the
    calibrated tensors as extra outputs, are written to `workdir` (onnxruntime takes external
    data only from files next to the graph) and one session per graph reads them there."""
    from pathlib import Path

    from mythos_deploy.exporters.external_data import write_model
    from mythos_deploy.exporters.onnx_validate import append_new_rows, empty_pasts
    from mythos_deploy.config import MythosConfig
    from mythos_deploy.runtimes.onnx_runner import OnnxModelRunner
    cfg = MythosConfig.from_dict(manifest.config)
    opts = manifest.options
    amax: dict[str, dict[str, float]] = {g: {} for g in graphs}
    inputs = {g: {i.name for i in m.graph.input} for g, m in graphs.items()}

    class Tracking(OnnxModelRunner):
        def _run(self, name, feeds):
            out = super()._run(name, feeds)
            for t in names[name]:
                v = feeds[t] if t in inputs[name] else out[t]
                amax[name][t] = max(amax[name].get(t, 0.0), float(np.abs(v).max()) if v.size else 0.0)
            if name == "step" and "fill" in self.sessions:
                self._run("fill", {"h": feeds["h"], "e": feeds["e"], "past_len": feeds["past_len"],
                                   "loop_indices": np.asarray(feeds["loop_index"], np.int64).reshape(1)})
            return out

    files = {g: write_model(with_outputs(m, [t for t in names[g] if t not in inputs[g]]), Path(workdir), f"calib_{g}.onnx")
             for g, m in graphs.items()}
    runner = Tracking(files, opts.loop, opts.loops)
    prompt_len = max(1, min(prompt_len, cfg.max_seq_len // 2))
    new_tokens = max(0, min(new_tokens, cfg.max_seq_len - prompt_len))
    rng = np.random.default_rng(seed)
    for _ in range(n_prompts):
        pasts = empty_pasts(cfg, 1, opts.loops, "fp32")
        ids, pos = rng.integers(0, cfg.vocab_size, (1, prompt_len)), 0
        for _ in range(new_tokens + 1):
            out = runner.forward(ids, pos, pasts, opts.loops, cfg.act_threshold)
            append_new_rows(pasts, out)
            pos += ids.shape[1]
            ids = out["logits"][:, -1:].argmax(-1)
    return amax
