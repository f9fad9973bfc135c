"""The TensorRT-compatibility lint, on every export mode and on crafted graphs (no TensorRT)."""

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from mythos_deploy.exporters.onnx_export import OnnxExportOptions, build_graphs
from mythos_deploy.exporters.trt_lint import lint_artifact, lint_model
from mythos_deploy.cli import app


def _lint(om_pair, stepped_fp32, loop, moe, attn="mla"):
    _, model = om_pair[attn]
    opts = OnnxExportOptions(loop=loop, moe=moe).resolved(model.cfg)
    graphs = build_graphs(model, model.cfg, opts, lambda s: None, stepped=stepped_fp32[attn])
    return graphs, [f for name, g in graphs.items() for f in lint_model(g, name)]


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


@pytest.mark.parametrize("attn", ["mla", "gqa"])
@pytest.mark.parametrize("loop", ["unroll", "loop", "stepped"])
@pytest.mark.parametrize("moe", ["standard", "plugin"])
def test_trt_targets_pass(om_pair, stepped_fp32, attn, loop, moe):
    _, findings = _lint(om_pair, stepped_fp32, loop, moe, attn)
    assert not _errors(findings), _errors(findings)
    if moe == "plugin":
        assert any("MythosMoE plugin registered" in f.message for f in findings)


def test_dynamic_scan_output_is_flagged(om_pair, stepped_fp32):
    """A Loop whose scan output length comes from a graph input (the old `loop` layout)."""
    graphs, _ = _lint(om_pair, stepped_fp32, "stepped", "standard")
    step = graphs["step"]
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c2"]), helper.make_node("Identity", ["i"], ["s"])],
                             "b", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                                   helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("c2", onnx.TensorProto.BOOL, []),
                              helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [])])
    bad = copy.deepcopy(step)
    bad.graph.node.append(helper.make_node("Loop", ["loop_index", ""], ["scan"], body=body, name="dyn"))
    errs = _errors(lint_model(bad, "step"))
    assert len(errs) == 1 and errs[0].op == "Loop" and "scan output" in errs[0].message


@pytest.mark.parametrize("loop", ["unroll", "loop", "stepped"])
def test_ort_lowering_is_flagged(om_pair, stepped_fp32, loop):
    _, findings = _lint(om_pair, stepped_fp32, loop, "ort")
    assert any("com.microsoft::MoE" in f.message for f in _errors(findings))


def test_crafted_problems(om_pair, stepped_fp32):
    graphs, _ = _lint(om_pair, stepped_fp32, "stepped", "plugin")
    step = graphs["step"]

    bad = copy.deepcopy(step)
    for imp in bad.opset_import:
        if imp.domain == "":
            imp.version = 21
    assert any("opset 21" in f.message for f in _errors(lint_model(bad, "step")))

    bad = copy.deepcopy(step)
    topk = next(n for n in bad.graph.node if n.op_type == "TopK")
    kept = [a for a in topk.attribute if a.name != "sorted"]
    del topk.attribute[:]
    topk.attribute.extend(kept + [helper.make_attribute("sorted", 0)])
    assert any("sorted=1" in f.message for f in _errors(lint_model(bad, "step")))

    bad = copy.deepcopy(step)
    plugin = next(n for n in bad.graph.node if n.op_type == "MythosMoE")
    for a in plugin.attribute:
        if a.name == "plugin_namespace":
            a.s = b"somebody_else"
    assert any("plugin_namespace" in f.message for f in _errors(lint_model(bad, "step")))

    bad = copy.deepcopy(step)
    bad.graph.node.append(helper.make_node("Unique", ["h"], ["u"], name="uniq"))
    assert any("Unique is not supported" in f.message for f in _errors(lint_model(bad, "step")))


def test_nonzero_qdq_zero_point_is_flagged(tmp_path):
    from mythos_deploy.exporters.trt_lint import quant_param_findings
    x = helper.make_tensor_value_info("x", onnx.TensorProto.INT8, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "z")]
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], name="dq")], "g", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    assert any("zero point" in f.message for f in quant_param_findings(m))


def test_lint_command(artifacts, tmp_path):
    _, od = artifacts[("mla", "stepped")]
    r = CliRunner().invoke(app, ["lint", str(od), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"]
    _, loop_dir = artifacts[("mla", "loop")]
    r = CliRunner().invoke(app, ["lint", str(loop_dir)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["lint", str(od), "--target", "tvm"])
    assert r.exit_code == 2
    assert lint_artifact(od).target == "tensorrt 10.1"
