"""Quantization for onnxruntime: every mode produces a checked graph that runs and passes its
gate on the tiny preset; bad input gets clear errors and leaves nothing."""

import json

import onnx
import pytest
from typer.testing import CliRunner

from mythos_deploy.exporters.onnx_compose import iter_graphs, node_attr
from mythos_deploy.exporters.quant_graph import gemms_to_matmuls, merge_sibling_matmuls
from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
from mythos_deploy import InputError, ParityError
from mythos_deploy.cli import app
from mythos_deploy.manifest import read_manifest, verify_files
from mythos_deploy.runtimes import generate, load


def _ops(path):
    m = onnx.load(str(path))
    ops = set()

    def walk(g):
        for n in g.node:
            ops.add(n.op_type)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
    walk(m.graph)
    return ops


def test_gemms_become_matmuls_with_the_same_numbers():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # [N, K], read transposed by two Gemms
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
             numpy_helper.from_array(w.T.copy(), "wkn")]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y1"], name="g1", transB=1),
             helper.make_node("Gemm", ["x", "w"], ["y2"], name="g2", transB=1),
             helper.make_node("Gemm", ["x", "wkn"], ["y3"], name="g3"),
             helper.make_node("Gemm", ["x", "w", "b"], ["y4"], name="g4", transB=1, alpha=2.0)]  # left alone
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(1, 5)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    x = rng.standard_normal((3, 4)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    before = run(model)
    assert gemms_to_matmuls(model) == 3
    assert [n.op_type for n in model.graph.node].count("Gemm") == 1
    assert sum(t.name == "w::kn" for t in model.graph.initializer) == 1  # one transposed copy, shared
    for a, b in zip(before, run(model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_sibling_matmuls_merge_into_one_with_the_same_numbers():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(1)
    ws = {n: rng.standard_normal((8, k)).astype(np.float32) for n, k in (("wa", 3), ("wb", 5), ("wc", 2))}
    inits = [numpy_helper.from_array(v, k) for k, v in ws.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "wk4"))  # other K: alone
    nodes = [helper.make_node("MatMul", [x, w], [f"{x}_{w}"], name=f"{x}_{w}")
             for x in ("x", "y") for w in ("wa", "wb")]  # two groups reading the same pair of weights
    nodes += [helper.make_node("MatMul", ["y", "wc"], ["y_wc"], name="y_wc"),
              helper.make_node("MatMul", ["x", "wa"], ["x_wa2"], name="x_wa2"),  # the same weight twice
              helper.make_node("MatMul", ["z", "wk4"], ["z_wk4"], name="z_wk4")]
    outs = [n.output[0] for n in nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(v, TensorProto.FLOAT, [2, k])
                                           for v, k in (("x", 8), ("y", 8), ("z", 4))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32), "y": rng.standard_normal((2, 8)).astype(np.float32),
             "z": rng.standard_normal((2, 4)).astype(np.float32)}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, feeds)
    before = run(model)
    assert merge_sibling_matmuls(model) == 4  # x: 3 -> 1, y: 3 -> 1
    assert [n.op_type for n in model.graph.node].count("MatMul") == 3  # x merged, y merged, z alone
    assert sum(t.name.endswith("::merged") for t in model.graph.initializer) == 2  # (wa, wb, wa), (wa, wb, wc)
    for a, b in zip(before, run(model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loop", ["loop", "stepped"])
def test_int8(artifacts, tmp_path, loop):
    _, src = artifacts[("mla", loop)]
    out = tmp_path / "q8"
    res = quantize_artifact(src, out, QuantizeOptions(mode="int8"))
    assert res.gate["passed"] and res.gate["greedy_agreement"] >= 0.98 and res.gate["positions"] >= 256
    manifest = read_manifest(out)
    verify_files(out, manifest)
    info = manifest["quantization"]["graphs"]
    assert all(i["mode"] == "int8" for i in info.values())
    graph = out / ("model.onnx" if loop == "loop" else "step.onnx")
    onnx.checker.check_model(str(graph), full_check=True)
    ops = _ops(graph)
    assert "MatMulNBits" in ops and "Gemm" not in ops  # Gemms were rewritten as MatMul, then quantized
    q = onnx.load(str(graph))
    nbits = [n for g in iter_graphs(q.graph) for n in g.node if n.op_type == "MatMulNBits"]
    assert nbits and all(node_attr(n, "bits") == 8 and node_attr(n, "accuracy_level") == 4 for n in nbits)
    consts = {t.name for t in q.graph.initializer if len(t.dims) == 2}  # 3-D: per-head batched, left float
    assert not [n.name for g in iter_graphs(q.graph) for n in g.node if n.op_type == "MatMul" and n.input[1] in consts]
    if loop == "loop":
        assert info["model"]["embedding"].startswith("int8")
        assert info["model"]["experts"].startswith("int8 tables, integer MatMuls")
        # the experts' MatMuls (gathered for decode, whole tables for the dense branch) run on
        # the int8 bytes: no expert table is cast back to fp32
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
        nodes = [n for g in iter_graphs(q.graph) for n in g.node]
        int8_rows = {n.output[0] for n in nodes if n.op_type == "Gather" and n.input[0].endswith("::q8")}
        casts = [n for n in nodes if n.op_type == "Cast" and (n.input[0].endswith("::q8") or n.input[0] in int8_rows)]
        assert not casts
        assert res.sizes["quantized_bytes"] < 0.7 * res.sizes["source_bytes"]  # tiny: small tensors stay fp32
    ref = generate(load(src), [5, 6, 7], 16).tokens
    assert len(generate(load(out), [5, 6, 7], 16).tokens[0]) == 16
    assert ref  # both run through the same runtime API


def test_int4(artifacts, tmp_path):
    _, src = artifacts[("gqa", "loop")]
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q4"), "--mode", "int4", "--block-size", "32"])
    assert r.exit_code == 0, r.output
    assert "--moe ort" in r.output  # the standard lowering's int4 experts decode slowly on CPU: say so
    assert read_manifest(tmp_path / "q4")["quantization"]["gate"]["passed"]
    assert "MatMulNBits" in _ops(tmp_path / "q4" / "model.onnx") and "GatherBlockQuantized" in _ops(tmp_path / "q4" / "model.onnx")
    info = read_manifest(tmp_path / "q4")["quantization"]["graphs"]["model"]
    assert info["embedding"].startswith("int4") and info["experts"].startswith("int4 weight-only (3 tables")


def test_int4_blocks_wider_than_the_model(artifacts, tmp_path):
    """Blocks of 128 on tiny (dim 64): MatMulNBits pads K to a whole block, so the int4
    embedding rows gathered from the head carry padding; it is cut (once failed to load)."""
    _, src = artifacts[("mla", "loop")]
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q4"), "--mode", "int4", "--block-size", "128"])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(tmp_path / "q4")
    assert manifest["quantization"]["gate"]["passed"]
    assert manifest["quantization"]["graphs"]["model"]["embedding"].startswith("int4")
    assert len(generate(load(tmp_path / "q4"), [1, 2, 3], 3).tokens[0]) == 3


def test_fp16_reexports_from_the_source_checkpoint(artifacts, tmp_path):
    ck, src = artifacts[("mla", "loop")]
    res = quantize_artifact(src, tmp_path / "h", QuantizeOptions(mode="fp16"))
    assert res.gate["passed"]
    m = read_manifest(tmp_path / "h")
    assert m["options"]["dtype"] == "fp16" and m["quantization"]["method"] == "native fp16 re-export"


def test_fp16_reexport_carries_every_export_option(artifacts, tmp_path, monkeypatch):
    """The fp16 re-export repeats the source export's options (loop, lowering, MLA form, past
    form, loop build, ...) and changes only the dtype (and always runs the parity gate)."""

    import mythos_deploy.exporters.onnx_export
    import mythos_deploy.runtimes.onnx_runner
    _, src = artifacts[("mla", "loop")]
    seen = {}
    # non-default options, so that an option the re-export forgets shows up as a difference
    changed = {"loop_export": "while_loop", "mla": "expanded", "past": "masked", "loops": 3}
    real_open = mythos_deploy.runtimes.onnx_runner.open_onnx_artifact

    def open_changed(path, what):
        manifest, rest = real_open(path, what)
        return manifest.with_options(**changed), rest

    def capture(ckpt, work, options, stage=None):
        seen["options"] = options
        raise InputError("captured")
    monkeypatch.setattr(mythos_deploy.runtimes.onnx_runner, "open_onnx_artifact", open_changed)
    monkeypatch.setattr(mythos_deploy.exporters.onnx_export, "export_onnx", capture)
    with pytest.raises(InputError, match="captured"):
        quantize_artifact(src, tmp_path / "h", QuantizeOptions(mode="fp16"))
    source = {**read_manifest(src)["options"], **changed}
    again = seen["options"].to_dict()
    assert again["dtype"] == "fp16" and again["validate"]  # the export's fp16 parity gate always runs
    same = lambda o: {k: v for k, v in o.items() if k not in ("dtype", "validate")}  # noqa: E731
    assert same(again) == same(source)
    assert not (tmp_path / "h").exists()


def test_gate_failure_writes_nothing_unless_overridden(artifacts, tmp_path, monkeypatch):
    _, src = artifacts[("mla", "loop")]
    monkeypatch.setattr("mythos_deploy.exporters.quantize.MIN_AGREEMENT", {"int8": 1.01, "int4": 1.01, "fp16": 1.01})
    with pytest.raises(ParityError, match="accuracy gate"):
        quantize_artifact(src, tmp_path / "q", QuantizeOptions(mode="int8"))
    assert not (tmp_path / "q").exists()
    res = quantize_artifact(src, tmp_path / "q", QuantizeOptions(mode="int8", accept_accuracy_loss=True))
    assert res.gate["overridden"] and read_manifest(tmp_path / "q")["quantization"]["gate"]["overridden"]


def test_bad_input(artifacts, tmp_path, tiny_ckpt):
    ck, src = artifacts[("mla", "loop")]
    runner = CliRunner()
    cases = [
        (["quantize", str(src), "-o", str(tmp_path / "x"), "--mode", "int3"], "--mode"),
        (["quantize", str(src), "-o", str(tmp_path / "x"), "--mode", "qdq-int8"], "Loop body"),
        (["quantize", str(ck), "-o", str(tmp_path / "x")], "ONNX export"),
        (["quantize", str(tmp_path / "none"), "-o", str(tmp_path / "x")], "not found"),
        (["quantize", str(src), "-o", str(tmp_path / "x"), "--block-size", "7", "--mode", "int4"], "--block-size"),
    ]
    for args, match in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["gate"]["passed"]
    r = runner.invoke(app, ["quantize", str(tmp_path / "q"), "-o", str(tmp_path / "qq")])
    assert r.exit_code == 2 and "already quantized" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "qq").exists()


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_task_accuracy_gate_on_the_demo_checkpoint(demo_exports, tmp_path, mode, monkeypatch):
    res = quantize_artifact(demo_exports["unroll"], tmp_path / mode, QuantizeOptions(mode=mode, block_size=32))
    task = res.gate["task"]
    assert task is not None and task["problems"] == 400 and task["accuracy_fp32"] >= 0.95
    assert task["passed"] == (task["drop_points"] <= task["max_drop_points"]) and res.gate["passed"]
    assert read_manifest(tmp_path / mode)["quantization"]["gate"]["task"]["accuracy"] == task["accuracy"]
    # the quantized artifact carries the checkpoint's tokenizer, hashed in its manifest
    assert read_manifest(tmp_path / mode)["files"]["tokenizer.json"] == read_manifest(demo_exports["unroll"])["files"]["tokenizer.json"]
    # the same gate fails loudly, and writes nothing, when the allowed drop is negative
    monkeypatch.setattr("mythos_deploy.exporters.quantize.MAX_TASK_DROP", {"int8": -1.0, "int4": -1.0, "fp16": -1.0})
    with pytest.raises(ParityError, match="task accuracy"):
        quantize_artifact(demo_exports["unroll"], tmp_path / "fail", QuantizeOptions(mode=mode, block_size=32))
    assert not (tmp_path / "fail").exists()


def test_no_task_gate_for_an_untrained_model(artifacts, tmp_path):
    _, src = artifacts[("gqa", "unroll")]
    res = quantize_artifact(src, tmp_path / "q", QuantizeOptions(mode="int8"))
    assert res.gate["task"] is None


def test_qmoe_weight_layout_roundtrips():
    import numpy as np

    from mythos_deploy.exporters.quant_graph import quantize_last_axis
    w = np.random.default_rng(0).standard_normal((3, 8, 64)).astype(np.float32)
    q8, s8 = quantize_last_axis(w, 8, 0)
    assert q8.dtype == np.uint8 and q8.shape == w.shape and s8.shape == (3, 8)
    deq = (q8.astype(np.float32) - 128) * s8[..., None]
    assert np.abs(deq - w).max() <= s8.max() / 2 + 1e-6
    q4, s4 = quantize_last_axis(w, 4, 32)
    assert q4.shape == (3, 8, 32) and s4.shape == (3, 8, 2)
    nib = np.stack([q4 & 15, q4 >> 4], axis=-1).reshape(3, 8, 64).astype(np.float32)  # low nibble first
    deq = (nib - 8) * np.repeat(s4, 32, axis=-1)
    assert np.abs(deq - w).max() <= np.repeat(s4, 32, axis=-1).max() / 2 + 1e-6


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_ort_lowering_experts_become_qmoe(om_pair, stepped_fp32, tmp_path, mode):
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    from mythos_deploy import save_checkpoint
    _, model = om_pair["mla"]
    ck, src = tmp_path / "ck", tmp_path / "ort"
    save_checkpoint(model, ck)
    export_onnx(ck, src, OnnxExportOptions(loop="unroll", moe="ort", validate=False), stepped=stepped_fp32["mla"])
    res = quantize_artifact(src, tmp_path / mode, QuantizeOptions(mode=mode, block_size=16))
    ops = _ops(tmp_path / mode / "model.onnx")
    assert "QMoE" in ops and "MoE" not in ops
    info = read_manifest(tmp_path / mode)["quantization"]["graphs"]["model"]
    assert info["experts"] == f"{mode} QMoE (blocks of 16)"  # blocked: the fast CPU kernel, for int8 too
    qmoe = [n for n in onnx.load(str(tmp_path / mode / "model.onnx")).graph.node if n.op_type == "QMoE"]
    assert qmoe and all(node_attr(n, "accuracy_level") == 4 for n in qmoe)  # int8 dot products for int4 too
    assert res.gate["passed"] and res.gate["greedy_agreement"] >= (0.98 if mode == "int8" else 0.9)
