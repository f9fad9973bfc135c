"""Parameter counts and cache sizes, computed from the config on the meta device (nothing is
allocated, so the 1t preset can be inspected on a laptop)."""

from __future__ import annotations

import torch

from mythos_deploy.cache import slot_names
from mythos_deploy.config import MythosConfig
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
