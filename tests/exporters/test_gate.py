"""The parity gate still catches real export bugs under its allclose-style fp32 tolerance:
each test injects one into an honest export's graph and checks the gate fails, by how much."""

import numpy as np
import pytest
from onnx import numpy_helper

from mythos_deploy import MythosConfig, MythosModel
from mythos_deploy.exporters.onnx_export import build_graphs
from mythos_deploy.exporters.onnx_validate import default_scenarios, validate
from mythos_deploy.options import OnnxExportOptions
from mythos_deploy.runtimes.onnx_runner import OnnxModelRunner


@pytest.fixture(scope="module")
def honest():
    """A tiny model with weights scaled up (logits not nearly tied), exported unrolled."""
    import torch
    cfg = MythosConfig.from_name("tiny")
    model = MythosModel(cfg).init_weights(3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(2.0)
        # a depth LoRA that does something, as a trained one does (the init's is near zero, and a
        # bug in a term that contributes nothing is invisible to any comparison of outputs)
        torch.manual_seed(0)
        model.recurrent.lora.B.normal_(0.0, 0.1)
    opts = OnnxExportOptions(loop="unroll").resolved(cfg)
    graph = build_graphs(model, cfg, opts, lambda s: None)["model"]
    return model, cfg, opts, graph


def _gate(model, cfg, opts, graph):
    runner = OnnxModelRunner({"model": graph}, opts.loop, opts.loops)
    scenarios = default_scenarios(opts.loop, opts.loops, cfg.max_loop_iters, cfg.max_seq_len)[:2]
    return validate(model, runner, opts.loop, "fp32", scenarios)


def _tampered(graph, pick, change):
    """A copy of `graph` with `change(array)` applied to every initializer `pick` selects."""
    bad = graph.__class__()
    bad.CopyFrom(graph)
    found = [t for t in bad.graph.initializer if pick(t)]
    assert found, "the initializer to tamper with is not in the graph"
    for t in found:
        t.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(t)), t.name))
    return bad


def _worst(report):
    """max abs error / limit over every output and scenario (printed: `pytest -s`)."""
    by = {}
    for s in report.stats:
        key = "cache" if s.output.startswith("new_") else s.output
        by[key] = max(by.get(key, 0.0), s.max_abs / s.limit)
    print("error / limit: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(by.items())))
    return max(by.values())


def test_the_honest_export_passes(honest):
    report = _gate(*honest)
    assert report.passed, report.failures()
    assert _worst(report) < 0.1  # fp32 rounding sits far below the limit


def test_a_dropped_depth_lora_fails(honest):
    model, cfg, opts, graph = honest
    bad = _tampered(graph, lambda t: "lora.B" in t.name, np.zeros_like)
    report = _gate(model, cfg, opts, bad)
    assert not report.passed and _worst(report) > 10


def test_a_rope_offset_of_one_position_fails(honest):
    model, cfg, opts, graph = honest
    # every RoPE cos/sin table one row late: position m rotated as m - 1
    bad = _tampered(graph, lambda t: len(t.dims) == 2 and t.dims[0] == cfg.max_seq_len,
                    lambda a: np.roll(a, 1, axis=0))
    report = _gate(model, cfg, opts, bad)
    assert not report.passed and _worst(report) > 10


def test_a_shifted_halting_bias_fails(honest):
    model, cfg, opts, graph = honest
    bad = _tampered(graph, lambda t: t.name.endswith("act.halt.bias"), lambda a: a + 0.5)
    report = _gate(model, cfg, opts, bad)
    assert not report.passed


class _OneLengthForAll:
    """A runner that feeds every row the first row's past_len: what a graph that ignored the
    per-row lengths (one scalar broadcast) would compute."""

    def __init__(self, runner):
        self.runner = runner

    def forward(self, ids, past_len, pasts, *args, **kw):
        lens = np.broadcast_to(np.asarray(past_len, np.int64), (ids.shape[0],))
        return self.runner.forward(ids, np.full_like(lens, lens[0]), pasts, *args, **kw)


def test_ragged_scenario_catches_one_length_for_every_row(honest):
    model, cfg, opts, graph = honest
    runner = OnnxModelRunner({"model": graph}, opts.loop, opts.loops)
    ragged = [s for s in default_scenarios(opts.loop, opts.loops, cfg.max_loop_iters, cfg.max_seq_len) if s.ragged]
    assert ragged, "the gate has a ragged scenario"
    assert validate(model, runner, opts.loop, "fp32", ragged).passed
    report = validate(model, _OneLengthForAll(runner), opts.loop, "fp32", ragged)
    assert not report.passed and _worst(report) > 10
