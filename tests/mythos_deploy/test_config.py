import dataclasses
import json

import pytest

from mythos_deploy import PRESETS, ConfigError, MythosConfig
from mythos_deploy.config import parse_overrides
from mythos_deploy.stats import cache_bytes_per_token, parameter_counts
from oracle import load_openmythos_main


def test_defaults_match_openmythos():
    om = load_openmythos_main()
    assert dataclasses.asdict(om.MythosConfig()) == MythosConfig().to_dict()


@pytest.mark.parametrize("name", ["1b", "3b", "10b", "50b", "100b", "500b", "1t"])
def test_size_presets_match_openmythos_variants(name):
    import importlib.util
    spec = importlib.util.find_spec("open_mythos")
    path = f"{list(spec.submodule_search_locations)[0]}/variants.py"
    om = load_openmythos_main()
    text = open(path).read().replace("from open_mythos.main import MythosConfig", "")
    ns = {"MythosConfig": om.MythosConfig}
    exec(compile(text, path, "exec"), ns)
    assert dataclasses.asdict(ns[f"mythos_{name}"]()) == MythosConfig.from_name(name).to_dict()


def test_tiny_and_bench_sizes():
    assert parameter_counts(MythosConfig.from_name("tiny"))["total"] < 1_000_000
    bench = MythosConfig.from_name("bench")
    assert (bench.vocab_size, bench.dim, bench.n_heads, bench.max_seq_len, bench.max_loop_iters) == (32000, 512, 8, 2048, 8)
    assert (bench.kv_lora_rank, bench.q_lora_rank, bench.qk_rope_head_dim, bench.qk_nope_head_dim, bench.v_head_dim) == (128, 256, 32, 64, 64)
    assert (bench.n_experts, bench.n_shared_experts, bench.n_experts_per_tok, bench.expert_dim, bench.lora_rank) == (16, 1, 2, 256, 8)
    assert 27e6 < parameter_counts(bench)["total"] < 29e6


def test_parameter_count_matches_a_built_model(tiny_model, tiny_cfg):
    counts = parameter_counts(tiny_cfg)
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())
    # active per loop excludes exactly the unchosen routed experts
    E, k, F, D = tiny_cfg.n_experts, tiny_cfg.n_experts_per_tok, tiny_cfg.expert_dim, tiny_cfg.dim
    assert counts["recurrent_block"] - counts["active_per_loop"] == (E - k) * 3 * F * D


def test_cache_bytes_layouts():
    cfg = MythosConfig.from_name("bench")
    c = cache_bytes_per_token(cfg)
    assert c["slots"] == 1 + 8 + 1
    assert c["mythos_deploy"] == 10 * (128 + 32) * 4
    assert c["openmythos"] == 10 * (128 + 8 * 32) * 4
    assert c["openmythos"] > c["mythos_deploy"]


def test_json_roundtrip(tmp_path):
    cfg = MythosConfig.from_name("bench").replace(attn_type="gqa", n_kv_heads=4)
    cfg.save(tmp_path / "c.json")
    assert MythosConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("change, field", [
    (dict(dim=65), "dim"),
    (dict(n_heads=0), "n_heads"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(n_experts_per_tok=5), "n_experts_per_tok"),
    (dict(act_threshold=0.0), "act_threshold"),
    (dict(act_threshold=1.5), "act_threshold"),
    (dict(act_threshold=float("nan")), "act_threshold"),
    (dict(attn_type="mha"), "attn_type"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(expert_dim=0), "expert_dim"),
    (dict(max_loop_iters=0), "max_loop_iters"),
    (dict(prelude_layers=-1), "prelude_layers"),
    (dict(dim="64"), "dim"),
    (dict(dim=True), "dim"),
    (dict(rope_theta=1.0), "rope_theta"),
    (dict(dropout=1.0), "dropout"),
    (dict(attn_type="gqa", n_kv_heads=3), "n_heads"),
    (dict(attn_type="gqa", n_heads=32, dim=96), "dim"),  # odd GQA head width 3
])
def test_invalid_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        MythosConfig.from_name("tiny").replace(**change)


def test_unknown_keys_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field.*colour"):
        MythosConfig.from_dict({"colour": "blue"})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MythosConfig.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        MythosConfig.load(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="not found"):
        MythosConfig.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        MythosConfig.from_name("2t")


def test_parse_overrides():
    assert parse_overrides(["dim=128", "act_threshold=0.5", "attn_type=gqa"]) == {
        "dim": 128, "act_threshold": 0.5, "attn_type": "gqa"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["dim"])
    with pytest.raises(ConfigError, match="dim"):
        parse_overrides(["dim=big"])
    with pytest.raises(ConfigError, match="unknown"):
        parse_overrides(["width=3"])


def test_every_preset_is_valid():
    for name in PRESETS:
        MythosConfig.from_name(name).validate()
