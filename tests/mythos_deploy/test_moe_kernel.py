"""The Triton MoE plugin kernel: numerics on CPU under TRITON_INTERPRET=1 against the eager op
(many shapes, hypothesis), and ahead-of-time PTX for sm_87 / sm_90 without a GPU."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels: run them on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton not installed (pip install 'mythos-deploy[triton]')")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mythos_deploy.moe_kernel import expert_tiles, moe_experts_fused, moe_experts_triton  # noqa: E402
from mythos_deploy.moe import moe_experts, moe_experts_naive  # noqa: E402

from mythos_deploy import moe_kernel as _mk  # noqa: E402

if type(_mk.up_kernel).__name__ != "InterpretedFunction":
    pytest.skip("mythos_deploy.moe_kernel was imported before TRITON_INTERPRET=1 was set in this process", allow_module_level=True)


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


@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 90), E=st.integers(1, 9), K=st.integers(1, 3), D=st.integers(1, 70), F=st.integers(1, 70),
       seed=st.integers(0, 99))
def test_grouped_path_equals_eager_op(N, E, K, D, F, seed):
    K = min(K, E)
    args = _inputs(N, E, K, D, F, seed)
    torch.testing.assert_close(moe_experts_triton(*args, grouped=True), moe_experts_naive(*args), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 200), E=st.integers(1, 12), K=st.integers(1, 4), block=st.sampled_from([1, 4, 16, 32]),
       seed=st.integers(0, 999))
def test_expert_tiles_cover_every_pair_once_with_one_expert_per_tile(N, E, K, block, seed):
    K = min(K, E)
    idx = torch.randn(N, E, generator=torch.Generator().manual_seed(seed)).topk(K, dim=-1).indices
    order, tile_e, lo, hi = (t.long() for t in expert_tiles(idx, E, block))
    flat = idx.reshape(-1)
    assert sorted(order.tolist()) == list(range(N * K))  # a permutation of the pairs
    covered = []
    for e, a, b in zip(tile_e.tolist(), lo.tolist(), hi.tolist()):
        assert 0 < b - a <= block and all(flat[order[a:b]] == e)
        covered += range(a, b)
    assert covered == list(range(N * K))  # tiles are consecutive and disjoint
    counts = torch.bincount(flat, minlength=E)
    assert len(tile_e) == int(((counts + block - 1) // block).sum())


@pytest.mark.parametrize("dtype, tol", [
    (torch.float16, 2e-2),
    pytest.param(torch.bfloat16, 5e-2, marks=pytest.mark.skip(
        reason="Triton 3.9's interpreter computes bf16 tl.dot wrongly (16x16 standard-normal inputs: error ~1e10); "
               "the bf16 grouped path is checked on a GPU by make gpu-check")),
])
def test_grouped_half_precision(dtype, tol):
    args = _inputs(80, 6, 2, 48, 40, 3)
    out = moe_experts_triton(*[a.to(dtype) if a.is_floating_point() else a for a in args], grouped=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), moe_experts(*args), rtol=tol, atol=tol)


def test_long_inputs_take_the_grouped_path_by_default(monkeypatch):
    from mythos_deploy import moe_kernel
    calls = []
    monkeypatch.setattr(moe_kernel, "_grouped", lambda *a: calls.append(a[0].shape[0]) or torch.zeros_like(a[0]))
    moe_experts_triton(*_inputs(4, 4, 2, 8, 8, 0))
    moe_experts_triton(*_inputs(moe_kernel.GROUPED_MIN_PAIRS // 2, 4, 2, 8, 8, 0))
    assert calls == [moe_kernel.GROUPED_MIN_PAIRS // 2]


@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 6), E=st.integers(1, 8), K=st.integers(1, 3), D=st.integers(1, 150), F=st.integers(1, 70),
       seed=st.integers(0, 99))
def test_single_launch_kernel_equals_eager_op(N, E, K, D, F, seed):
    """The TensorRT AOT plugin's kernel (one launch, int64 routing indices)."""
    K = min(K, E)
    args = _inputs(N, E, K, D, F, seed)
    torch.testing.assert_close(moe_experts_fused(*args), moe_experts_naive(*args), rtol=1e-4, atol=1e-5)


def test_plugin_jit_implementation_writes_the_output_buffer():
    from mythos_deploy.runtimes.trt_plugin import run_jit
    args = _inputs(40, 6, 2, 24, 16, 4)  # 80 pairs: per-token path; 160 below: grouped
    for a in (args, _inputs(80, 6, 2, 24, 16, 5)):
        y = torch.full_like(a[0], float("nan"))
        run_jit(*a, y)
        torch.testing.assert_close(y, moe_experts_naive(*a), rtol=1e-4, atol=1e-5)


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
    assert {(k["kernel"], k["sm"]) for k in index["kernels"]} == {
        (name, sm) for name in ("up", "down", "up_grouped", "down_grouped", "fused") for sm in (87, 90)}
    for k in index["kernels"]:
        ptx = (tmp_path / k["ptx"]["file"]).read_text()
        assert f".target sm_{k['sm']}" in ptx and f".entry {k['entry']}" in ptx
        assert (tmp_path / k["cubin"]["file"]).stat().st_size > 0 and k["grid"].startswith("grid")
        if k["kernel"].endswith("grouped"):  # fp16 tiles go through tensor-core MMA instructions
            assert "mma" in ptx, k["kernel"]
