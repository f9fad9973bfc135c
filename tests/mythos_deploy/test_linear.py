"""layers.linear: fp32 CPU inference of a few rows runs through oneDNN; everything traced,
trained, low-precision, large or small falls back to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mythos_deploy import layers
from mythos_deploy.layers import Linear, linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.fixture
def big():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1024, 512, generator=g), torch.randn(1024, generator=g), torch.randn(3, 512, generator=g)


def test_decode_rows_take_onednn_and_match_f_linear(big):
    w, b, x = big
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(x, w, b))
        for rows in (x[:1], x, x.reshape(1, 3, 512)):
            torch.testing.assert_close(linear(rows, w, b), F.linear(rows, w, b), rtol=1e-5, atol=1e-4)
        m = Linear(512, 1024)
        m.weight.data.copy_(w)  # a Parameter, as loaded from a checkpoint
        assert "mkldnn::_linear_pointwise" in _ops(lambda: m(x))


def test_fallbacks(big, monkeypatch):
    w, b, x = big
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x.double(), w.double()))
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w[:8]))  # small weight
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(torch.randn(300, 512), w))  # a long prefill
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w.t().contiguous().t()))  # not contiguous
    # training: gradients flow through F.linear
    wg = w.clone().requires_grad_()
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, wg).sum().backward())
    torch.testing.assert_close(wg.grad, torch.ones(1024, 3) @ x)
    monkeypatch.setattr(layers, "_onednn", None)
    monkeypatch.setenv("MYTHOS_ONEDNN_LINEAR", "0")
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(x, w))
    monkeypatch.setattr(layers, "_onednn", None)


def test_export_never_sees_onednn(big):
    w, _, x = big
    m = Linear(512, 1024).eval()
    with torch.no_grad():
        m.weight.copy_(w)
        ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets), targets
    assert any("linear" in t for t in targets), targets
