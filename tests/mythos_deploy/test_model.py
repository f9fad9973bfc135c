"""The reference model against OpenMythos 0.5.0 (the numerics contract) and its own rules."""

import pytest
import torch

from mythos_deploy import CacheError, InputError, MythosConfig, from_openmythos
from oracle import make_openmythos

SHAPES = {
    "tiny": {},
    "deeper": dict(prelude_layers=2, coda_layers=2, max_loop_iters=3, n_shared_experts=2,
                   n_experts=6, n_experts_per_tok=3, act_threshold=0.9),
    "no_shared": dict(n_shared_experts=0, dim=48, n_heads=6, n_kv_heads=3, qk_rope_head_dim=4,
                      kv_lora_rank=24, q_lora_rank=20, v_head_dim=8, qk_nope_head_dim=12),
}


def _pair(attn, shape, seed=0):
    cfg = MythosConfig.from_name("tiny").replace(attn_type=attn, **SHAPES[shape])
    om = make_openmythos(cfg.to_dict(), seed=seed)
    return om, from_openmythos(om)


@pytest.mark.parametrize("attn", ["mla", "gqa"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_matches_openmythos(attn, shape):
    om, model = _pair(attn, shape)
    max_loops = model.cfg.max_loop_iters
    g = torch.Generator().manual_seed(1)
    for batch, T in [(1, 1), (3, 9), (2, 17)]:
        ids = torch.randint(0, model.cfg.vocab_size, (batch, T), generator=g)
        for n_loops in (1, max_loops, max_loops + 3):  # + depth extrapolation
            with torch.no_grad():
                ref = om(ids, n_loops=n_loops)
                out = model(ids, n_loops=n_loops)
            torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)


def test_halting_depth_varies_across_positions():
    om, model = _pair("mla", "tiny", seed=3)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, n_loops=10)
        ref = om(ids, n_loops=10)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
    assert len(set(out.loops_used.flatten().tolist())) > 1
    assert (out.loops_used <= 10).all() and (out.loops_used >= 1).all()


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_cached_decoding_matches_openmythos(attn):
    om, model = _pair(attn, "deeper")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    n_loops = 5  # beyond max_loop_iters=3
    om_cache, cache = {}, model.new_cache(2, 40, n_loops)
    with torch.no_grad():
        ref = om(ids, n_loops=n_loops, kv_cache=om_cache)
        out = model(ids, cache=cache, n_loops=n_loops)
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
        pos = ids.shape[1]
        for _ in range(18):
            nxt = ref[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(out.logits[:, -1].argmax(-1, keepdim=True), nxt)
            ref = om(nxt, n_loops=n_loops, kv_cache=om_cache, start_pos=pos)
            out = model(nxt, cache=cache, n_loops=n_loops)
            pos += 1
            torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
    assert cache.length == pos


def test_compact_mla_cache_holds_one_shared_rope_key():
    om, model = _pair("mla", "tiny")
    cfg = model.cfg
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    om_cache, cache = {}, model.new_cache(1, 16, 2)
    with torch.no_grad():
        om(ids, n_loops=2, kv_cache=om_cache)
        model(ids, cache=cache, n_loops=2)
    assert set(cache.buffers) == set(om_cache)
    for name, buf in cache.buffers.items():
        assert buf.shape == (1, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        c_kv, k_rope = buf[:, :6, : cfg.kv_lora_rank], buf[:, :6, cfg.kv_lora_rank:]
        torch.testing.assert_close(c_kv, om_cache[name]["c_kv"], rtol=0, atol=1e-6)
        for head in range(cfg.n_heads):  # OpenMythos stores n_heads identical copies
            torch.testing.assert_close(k_rope, om_cache[name]["k_rope"][:, :, head], rtol=0, atol=1e-6)
        assert (buf[:, 6:] == 0).all()


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_chunked_prefill_equals_one_prefill(attn, tiny_cfg):
    om, model = _pair(attn, "tiny")
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, 32)
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 7), (7, 8), (8, 15), (15, 20)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_cache_is_written_in_place(tiny_model):
    cache = tiny_model.new_cache(1, 12, 2)
    ptrs = {k: v.data_ptr() for k, v in cache.buffers.items()}
    with torch.no_grad():
        tiny_model(torch.tensor([[1, 2, 3]]), cache=cache, n_loops=2)
        for tok in range(4):
            tiny_model(torch.tensor([[tok]]), cache=cache, n_loops=2)
    assert {k: v.data_ptr() for k, v in cache.buffers.items()} == ptrs
    assert cache.length == 7
    assert all((v[:, :7] != 0).any() and (v[:, 7:] == 0).all() for v in cache.buffers.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_stays_close(dtype, tiny_model):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    half = type(tiny_model)(tiny_model.cfg)
    half.load_state_dict(tiny_model.state_dict())
    half = half.to(dtype).eval()
    assert half.rope_cos.dtype == torch.float32  # RoPE tables never lose precision
    with torch.no_grad():
        ref = tiny_model(ids, n_loops=6)
        out = half(ids, n_loops=6)
        cache = half.new_cache(2, 20, 6)
        half(ids, cache=cache, n_loops=6)
        step = half(ids[:, :1], cache=cache, n_loops=6)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert torch.isfinite(step.logits).all()
    err = (out.logits.float() - ref.logits).abs().max().item()
    assert err < 0.05, err
    agree = (out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


def test_bad_inputs_are_clear_errors(tiny_model):
    m = tiny_model
    with pytest.raises(InputError, match="out of range"):
        m(torch.tensor([[1, 256]]))
    with pytest.raises(InputError, match="out of range"):
        m(torch.tensor([[-1]]))
    with pytest.raises(InputError, match="max_seq_len"):
        m(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(InputError, match="max_seq_len"):
        m(torch.zeros(1, 10, dtype=torch.long), start_pos=120)
    with pytest.raises(InputError, match="n_loops"):
        m(torch.tensor([[1]]), n_loops=0)
    with pytest.raises(InputError, match="act_threshold"):
        m(torch.tensor([[1]]), act_threshold=1.5)
    with pytest.raises(InputError, match="batch, seq"):
        m(torch.tensor([1, 2]))
    with pytest.raises(InputError, match="int64"):
        m(torch.tensor([[1.0]]))
    cache = m.new_cache(1, 8, n_loops=3)
    m(torch.tensor([[1, 2]]), cache=cache, n_loops=3)
    with pytest.raises(CacheError, match="n_loops=3.*n_loops=4"):
        m(torch.tensor([[1]]), cache=cache, n_loops=4)
    with pytest.raises(CacheError, match="budget"):
        m(torch.zeros(1, 7, dtype=torch.long), cache=cache, n_loops=3)
    with pytest.raises(CacheError, match="batch"):
        m(torch.zeros(2, 1, dtype=torch.long), cache=cache, n_loops=3)
    with pytest.raises(CacheError, match="past the cached length"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache, start_pos=5, n_loops=3)
    with pytest.raises(CacheError, match="budget"):
        m.new_cache(1, 1000)


def test_act_threshold_is_an_argument(tiny_model):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        low = tiny_model(ids, n_loops=6, act_threshold=0.05)
        high = tiny_model(ids, n_loops=6, act_threshold=1.0)
    assert (low.loops_used <= high.loops_used).all()
    assert (low.loops_used == 1).all()  # p > 0.05 at the first loop for every position
    assert not torch.allclose(low.logits, high.logits)


def test_whole_model_exports_with_torch_export(tiny_model):
    """No Python branch on tensor values, no .item(), no complex numbers: torch.export
    captures the full model, and the graph computes the eager numbers."""

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m.run(ids, 0, 3, 0.99, {})[0]

    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(8))
    ep = torch.export.export(Wrap(tiny_model), (ids,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("moe_experts" in op for op in ops), "MoE must stay one custom op in the graph"
    assert not any("complex" in op for op in ops)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), tiny_model(ids, n_loops=3).logits, rtol=0, atol=1e-6)


def test_absorbed_mla_matches_openmythos():
    om, model = _pair("mla", "deeper")
    model.set_mla_absorb(True)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(9))
    om_cache, cache = {}, model.new_cache(2, 20, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, n_loops=5).logits, om(ids, n_loops=5), rtol=0, atol=2e-5)
        ref = om(ids, n_loops=5, kv_cache=om_cache)
        out = model(ids, cache=cache, n_loops=5)
        pos = 9
        for _ in range(6):
            torch.testing.assert_close(out.logits, ref, rtol=0, atol=2e-5)
            nxt = ref[:, -1].argmax(-1, keepdim=True)
            ref = om(nxt, n_loops=5, kv_cache=om_cache, start_pos=pos)
            out = model(nxt, cache=cache, n_loops=5)
            pos += 1
    model.set_mla_absorb(False)
