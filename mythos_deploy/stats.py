"""Parameter counts and cache sizes, computed from the config on the meta device (nothing is
allocated, so the 1t preset can be inspected on a laptop)."""

from __future__ import annotations

import os

import torch

from mythos_deploy.cache import slot_names
from mythos_deploy.config import MythosConfig
from mythos_deploy.errors import ConfigError
from mythos_deploy.model import MythosModel

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def parameter_counts(cfg: MythosConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = MythosModel(cfg)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    total = count(model)
    recurrent = count(model.recurrent)
    unused_experts = (cfg.n_experts - cfg.n_experts_per_tok) * 3 * cfg.expert_dim * cfg.dim
    once = total - recurrent  # embed (tied head) + prelude + coda + final norm
    return {
        "total": total,
        "embedding": count(model.embed),
        "prelude": sum(count(b) for b in model.prelude),
        "coda": sum(count(b) for b in model.coda),
        "recurrent_block": recurrent,
        "routed_experts": 3 * cfg.n_experts * cfg.expert_dim * cfg.dim,
        "active_per_loop": recurrent - unused_experts,
        "active_per_token_default_loops": once + cfg.max_loop_iters * (recurrent - unused_experts),
    }


def cache_bytes_per_token(cfg: MythosConfig, n_loops: int | None = None, dtype: str = "fp32") -> dict[str, int]:
    """Bytes of cache one token occupies over all slots, in several layouts."""
    slots = len(slot_names(cfg, n_loops or cfg.max_loop_iters))
    b = DTYPE_BYTES[dtype]
    if cfg.attn_type == "mla":
        head_k = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        openmythos = cfg.kv_lora_rank + cfg.n_heads * cfg.qk_rope_head_dim
        gqa = cfg.n_kv_heads * (head_k + cfg.v_head_dim)
        mha = cfg.n_heads * (head_k + cfg.v_head_dim)
    else:
        openmythos = gqa = 2 * cfg.n_kv_heads * cfg.head_dim
        mha = 2 * cfg.n_heads * cfg.head_dim
    return {"slots": slots, "mythos_deploy": slots * cfg.cache_width * b,
            "openmythos": slots * openmythos * b, "equivalent_gqa": slots * gqa * b,
            "equivalent_mha": slots * mha * b}


def memory_estimate(cfg: MythosConfig, dtype_bytes: int = 4) -> dict[str, int]:
    """Bytes a model needs resident before it computes anything: weights (the tied head is
    stored once) and the fp32 RoPE tables (cos and sin, max_seq_len x rope_dim each)."""
    weights = parameter_counts(cfg)["total"] * dtype_bytes
    rope = 2 * cfg.max_seq_len * cfg.rope_dim * 4
    return {"weights": weights, "rope_tables": rope, "total": weights + rope}


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: MythosConfig, dtype_bytes: int = 4, what: str = "this model") -> None:
    """Refuse, before anything is allocated, a config whose weights and tables alone exceed
    this machine's physical memory (a wrong or hostile config.json)."""
    need, have = memory_estimate(cfg, dtype_bytes), physical_memory()
    if have is not None and need["total"] > have:
        gib = 2 ** 30
        raise ConfigError(f"{what} needs {need['total'] / gib:.1f} GiB before it runs (weights "
                          f"{need['weights'] / gib:.1f} GiB, RoPE tables for max_seq_len={cfg.max_seq_len} "
                          f"{need['rope_tables'] / gib:.1f} GiB); this machine has {have / gib:.1f} GiB")


@torch.no_grad()
def halting_profile(model: MythosModel, n_prompts: int = 4, length: int = 32, n_loops: int | None = None,
                    seed: int = 0, threshold: float = 1e-3) -> dict:
    """How the model's ACT halting behaves on seeded random prompts: the fraction of positions
    whose cumulative halting probability after the last loop is below `threshold` (they never
    halt; their output is a near-zero vector that the coda's RMSNorm rescales, so their logits
    hang on rounding and on the far tail of the halting sigmoid), the mean loops used and the
    smallest final cumulative probability. A property of the model to know before deploying."""
    cfg = model.cfg
    n = cfg.max_loop_iters if n_loops is None else n_loops
    length = max(1, min(length, cfg.max_seq_len))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n_prompts, length), generator=g)
    out = model(ids, n_loops=n)
    cum = out.halt_prob.float()
    return {"prompts": n_prompts, "length": length, "n_loops": n, "threshold": threshold,
            "ill_conditioned_fraction": float((cum < threshold).float().mean()),
            "never_halted_fraction": float((cum < cfg.act_threshold).float().mean()),
            "min_cumulative_halt_prob": float(cum.min()),
            "mean_loops_used": float(out.loops_used.float().mean())}
