"""The Triton MoE plugin kernel: numerics on CPU under TRITON_INTERPRET=1 against the eager op
(many shapes, hypothesis), and ahead-of-time PTX for sm_87 / sm_90 without a GPU."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels: run them on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton not installed (pip install 'mythos-deploy[triton]')")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from exporters.moe_kernel import moe_experts_triton  # noqa: E402
from mythos_deploy.moe import moe_experts, moe_experts_naive  # noqa: E402

from exporters import moe_kernel as _mk  # noqa: E402

if type(_mk._up_kernel).__name__ != "InterpretedFunction":
    pytest.skip("exporters.moe_kernel was imported before TRITON_INTERPRET=1 was set in this process", allow_module_level=True)


def _inputs(N, E, K, D, F, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    idx = torch.randn(N, E, generator=g).topk(K, dim=-1).indices
    gates = torch.rand(N, K, generator=g) + 0.05
    gates = gates / gates.sum(-1, keepdim=True)
    ws = [torch.randn(E, F, D, generator=g) * 0.2, torch.randn(E, F, D, generator=g) * 0.2, torch.randn(E, D, F, generator=g) * 0.2]
    return [t.to(dtype) if t.is_floating_point() else t for t in (x, idx, gates, *ws)]


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 6), E=st.integers(1, 8), K=st.integers(1, 3), D=st.integers(1, 70), F=st.integers(1, 70),
       seed=st.integers(0, 99))
def test_kernel_equals_eager_op(N, E, K, D, F, seed):
    K = min(K, E)
    args = _inputs(N, E, K, D, F, seed)
    torch.testing.assert_close(moe_experts_triton(*args), moe_experts_naive(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precision(dtype, tol):
    args = _inputs(4, 6, 2, 48, 40, 1)
    ref = moe_experts(*args)
    out = moe_experts_triton(*[a.to(dtype) if a.is_floating_point() else a for a in args])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_prefill_sized_input():
    args = _inputs(64, 8, 2, 32, 24, 2)
    torch.testing.assert_close(moe_experts_triton(*args), moe_experts(*args), rtol=1e-4, atol=1e-5)


def test_ahead_of_time_ptx_for_orin_and_hopper(tmp_path):
    """In a clean process: TRITON_INTERPRET=1 (set above) replaces the compiler."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "mythos_deploy.cli", "plugin-kernels", "-o", str(tmp_path),
                        "--dtype", "fp16"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "kernels.json").read_text())
    assert {(k["kernel"], k["sm"]) for k in index["kernels"]} == {("up", 87), ("up", 90), ("down", 87), ("down", 90)}
    for k in index["kernels"]:
        ptx = (tmp_path / k["ptx"]["file"]).read_text()
        assert f".target sm_{k['sm']}" in ptx and f".entry {k['entry']}" in ptx
        assert (tmp_path / k["cubin"]["file"]).stat().st_size > 0 and k["grid"].startswith("grid")
