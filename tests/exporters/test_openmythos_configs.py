"""Any OpenMythos configuration exports and decodes to OpenMythos's own tokens (property test).

Configurations are drawn by hypothesis: MLA and GQA with odd, unequal head sizes; top-k from 1
to n_experts and 0-3 shared experts; 1-3 prelude and coda layers; thresholds 0.5-1.0; halting
heads that saturate low (never halt) or high (halt at once); LTI decay and router bias away
from their initialisation; weights scaled up so that logits are not nearly tied. For each:
import, export unroll and loop through the parity gate, then 12 greedy tokens through
onnxruntime must equal OpenMythos 0.5.0's cached decoding.

The suite draws MYTHOS_OM_EXAMPLES (default 1) example, derandomized; the wide sweep is
`python -m benchmarks.om_configs` (30 examples, JSON in benchmarks/results/)."""

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mythos_deploy import from_openmythos
from mythos_deploy.exporters.onnx_export import build_graphs, export_form
from mythos_deploy.exporters.onnx_validate import append_new_rows, default_scenarios, empty_pasts, validate
from mythos_deploy.exporters.torch_to_onnx import export_stepped
from mythos_deploy.options import OnnxExportOptions
from mythos_deploy.runtimes.onnx_runner import OnnxModelRunner
from oracle import make_openmythos

EXAMPLES = int(os.environ.get("MYTHOS_OM_EXAMPLES", "1"))
RECORD = os.environ.get("MYTHOS_OM_RECORD")  # a JSON-lines file the sweep benchmark reads
TOKENS = 12


@st.composite
def configs(draw):
    attn = draw(st.sampled_from(["mla", "gqa"]))
    n_heads = draw(st.sampled_from([2, 3, 4]))
    n_experts = draw(st.integers(2, 6))
    cfg = dict(vocab_size=97, dim=n_heads * draw(st.sampled_from([8, 10, 12])), n_heads=n_heads,
               max_seq_len=64, max_loop_iters=draw(st.integers(2, 4)), attn_type=attn,
               prelude_layers=draw(st.integers(1, 3)), coda_layers=draw(st.integers(1, 3)),
               n_experts=n_experts, n_experts_per_tok=draw(st.integers(1, n_experts)),
               n_shared_experts=draw(st.integers(0, 3)), expert_dim=draw(st.sampled_from([6, 8, 12])),
               act_threshold=draw(st.sampled_from([0.5, 0.75, 0.9, 0.99, 1.0])), lora_rank=draw(st.sampled_from([2, 4])),
               rope_theta=10000.0)
    if attn == "mla":
        cfg.update(kv_lora_rank=draw(st.sampled_from([6, 10, 16])), q_lora_rank=draw(st.sampled_from([8, 12])),
                   qk_rope_head_dim=draw(st.sampled_from([2, 4, 6])), qk_nope_head_dim=draw(st.sampled_from([3, 5, 7])),
                   v_head_dim=draw(st.sampled_from([3, 5, 8])))
    else:
        cfg.update(n_kv_heads=draw(st.sampled_from([k for k in (1, 2, 3, 4) if n_heads % k == 0])))
    # halting: spread (-1.5), saturating low (never halts) or high (halts at the first loop)
    halt = draw(st.sampled_from([(-1.5, 0.3), (-19.0, 0.05), (8.0, 0.05)]))
    return cfg, halt, draw(st.sampled_from([1.0, 2.0, 3.0])), draw(st.integers(0, 3))


def _model(cfg, halt, scale, seed):
    om = make_openmythos(cfg, seed=seed, halt=halt)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in om.named_parameters():
            if p.ndim == 2 and "embed" not in name and "act.halt" not in name:
                p.mul_(scale)
            if name.endswith("injection.log_A") or name.endswith("injection.log_dt"):
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        om.recurrent.block.ffn.router_bias.copy_(torch.randn(cfg["n_experts"], generator=g) * 0.5)
    return om


def check_config(cfg, halt, scale, seed) -> dict:
    om = _model(cfg, halt, scale, seed)
    model = from_openmythos(om)
    mcfg = model.cfg
    stepped = export_stepped(export_form(model, OnnxExportOptions()), "fp32", 18)
    prompt = torch.randint(0, mcfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(seed))
    result = {"config": cfg, "halt": list(halt), "scale": scale, "seed": seed}
    for loop in ("unroll", "loop"):
        opts = OnnxExportOptions(loop=loop).resolved(mcfg)
        graphs = build_graphs(model, mcfg, opts, lambda s: None, stepped=stepped)
        runner = OnnxModelRunner(graphs, loop, opts.loops)
        report = validate(model, runner, loop, "fp32",
                          default_scenarios(loop, opts.loops, mcfg.max_loop_iters, mcfg.max_seq_len))
        n = opts.loops
        om_cache, pasts, pos, feed = {}, empty_pasts(mcfg, 1, n, "fp32"), 0, prompt
        ours, theirs = [], []
        with torch.no_grad():
            for _ in range(TOKENS):
                ref = om(feed, n_loops=n, kv_cache=om_cache, start_pos=pos)
                out = runner.forward(feed.numpy(), pos, pasts, n, mcfg.act_threshold)
                append_new_rows(pasts, out)
                theirs.append(int(ref[0, -1].argmax()))
                ours.append(int(out["logits"][0, -1].argmax()))
                pos += feed.shape[1]
                feed = torch.tensor([[theirs[-1]]])
        result[loop] = {"gate_passed": report.passed, "failures": report.failures(), "tokens_equal": ours == theirs,
                        "ill_conditioned": report.ill_conditioned, "positions": report.positions,
                        "worst_error_over_limit": max(s.max_abs / s.limit for s in report.stats)}
    return result


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=configs())
def test_any_openmythos_config_exports_and_decodes_to_its_tokens(drawn):
    pytest.importorskip("onnxruntime")
    cfg, halt, scale, seed = drawn
    result = check_config(cfg, halt, scale, seed)
    if RECORD:
        with open(RECORD, "a") as f:
            f.write(json.dumps(result) + "\n")
    for loop in ("unroll", "loop"):
        r = result[loop]
        assert r["gate_passed"], (loop, r["failures"], cfg, halt, scale)
        assert r["tokens_equal"], (loop, cfg, halt, scale)
