"""The MythosMoE TensorRT plugin registration (runtimes/trt_plugin.py), driven through
stand-ins for tensorrt.plugin (TensorRT is not installable here): the registered id matches
the ONNX plugin node, shape inference, formats, and the AOT implementation's PTX and
symbolic launch parameters. The real-TensorRT test skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from mythos_deploy.runtimes import trt_plugin
from mythos_deploy.contract import PLUGIN_DOMAIN
from mythos_deploy import MissingDependencyError
from tests.exporters import trt_standins

ROOT = Path(__file__).resolve().parents[2]


def test_registers_under_the_name_the_onnx_plugin_node_carries(demo_exports):
    trt, trtp, reg = trt_standins.make()
    pid = trt_plugin.register(trtp, trt, device_cc=90)
    assert {k for k, p in reg if p == pid} == {"register", "autotune", "aot_impl", "impl"}
    assert trt_plugin.register(trtp, trt) == pid and len(reg) == 4  # idempotent
    model = onnx.load(str(demo_exports["unroll-plugin"] / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN]
    assert nodes
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert f"{attrs['plugin_namespace'].decode()}::{n.op_type}" == pid and attrs["plugin_version"] == b"1"
        assert len(n.input) == 6 and {"num_experts", "top_k", "expert_dim"} <= set(attrs)


def test_shape_inference_and_formats():
    trt, trtp, reg = trt_standins.make()
    pid = trt_plugin.register(trtp, trt)
    x = trt_standins.Desc(["N", 96], trt.float16)
    y = reg[("register", pid)](x, None, None, None, None, None, num_experts=4, top_k=2, expert_dim=64)
    assert y.shape_expr == ["N", 96] and y.dtype == trt.float16 and y is not x
    (combo,) = reg[("autotune", pid)](*[None] * 6, 4, 2, 64, outputs=(y,))
    positions = [p.strip() for p in combo.io_types.split(",")]
    assert len(positions) == 7 and positions[1] == "INT64" and all(p == "FP32|FP16|BF16" for i, p in enumerate(positions) if i != 1)
    with pytest.raises(Exception, match="unsupported input type"):
        trt_plugin.dtype_name(trt, "int8")


def test_aot_implementation_compiles_ptx_with_symbolic_launch(tmp_path):
    """In a clean process (no TRITON_INTERPRET): the AOT function compiles the fused kernel for
    sm_90 and sm_87 and describes its launch in the input shapes' terms."""
    script = """
import json, sys
from tests.exporters import trt_standins
from mythos_deploy.runtimes import trt_plugin
from mythos_deploy import moe_kernel as mk
out = {}
for cc in (87, 90):
    trt, trtp, reg = trt_standins.make()
    pid = trt_plugin.register(trtp, trt, device_cc=cc)
    D = trt_standins.Desc
    x, idx, g = D([7, 96], trt.float16), D([7, 2], trt.int64), D([7, 2], trt.float16)
    wg, wu, wd = D([4, 64, 96], trt.float16), D([4, 64, 96], trt.float16), D([4, 96, 64], trt.float16)
    name, ptx, params, extra = reg[("aot_impl", pid)](x, idx, g, wg, wu, wd, 4, 2, 64, outputs=(x.like(),), tactic=0)
    out[cc] = {"name": name.decode(), "ptx": ptx.decode(), "grid": [params.grid_x, params.grid_y], "block": params.block_x,
               "extra": list(extra), "block_dy": mk.BLOCK_DY}
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for cc, k in out.items():
        assert f".target sm_{cc}" in k["ptx"] and f".entry {k['name']}" in k["ptx"] and "fused_kernel" in k["name"]
        assert k["grid"] == [7, -(-96 // k["block_dy"])] and k["block"] % 32 == 0 and k["extra"] == [96, 64, 2]
        # the kernel's parameters: 6 input pointers, D, F, K, then the output pointer (TensorRT AOT order)
        entry = k["ptx"][k["ptx"].index(f".entry {k['name']}"):]
        assert entry[:entry.index(")")].count(".param") >= 10


def test_without_tensorrt_registration_says_so():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match="tensorrt not installed"):
        trt_plugin.register()


def test_registers_with_real_tensorrt():
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    assert trt_plugin.register() == trt_plugin.PLUGIN_ID


@pytest.mark.parametrize("mode, kinds", [("aot", {"register", "autotune", "aot_impl"}),
                                         ("jit", {"register", "autotune", "impl"})])
def test_plugin_mode_picks_the_implementation(mode, kinds):
    trt, trtp, reg = trt_standins.make()
    trt_plugin.register(trtp, trt, mode=mode)
    assert {k for k, _ in reg} == kinds
    with pytest.raises(Exception, match="aot, jit or both"):
        trt_plugin.register(trtp, trt, mode="python")
