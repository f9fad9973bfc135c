"""The model config: every OpenMythos 0.5.0 field with its default, validation, presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mythos_deploy.errors import ConfigError

ATTN_TYPES = ("mla", "gqa")


@dataclass(frozen=True)
class MythosConfig:
    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4
    max_seq_len: int = 4096
    max_loop_iters: int = 16
    prelude_layers: int = 2
    coda_layers: int = 2
    attn_type: str = "mla"
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    act_threshold: float = 0.99
    rope_theta: float = 500000.0
    lora_rank: int = 16
    max_output_tokens: int = 4096
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """GQA head width (also the RoPE width for GQA)."""
        return self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim

    @property
    def dense_ffn_dim(self) -> int:
        return self.dim * 4 // 3

    @property
    def shared_expert_dim(self) -> int:
        return self.expert_dim * self.n_experts_per_tok

    @property
    def loop_dim(self) -> int:
        return self.dim // 8

    @property
    def cache_width(self) -> int:
        """Values per token per cache slot in this project's layout."""
        if self.attn_type == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        ints = [f.name for f in fields(self) if f.type in ("int", int)]
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
        positive = ["vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters",
                    "n_experts", "n_experts_per_tok", "expert_dim", "lora_rank", "max_output_tokens"]
        if self.attn_type == "mla":
            positive += ["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                         "v_head_dim"]
        else:
            positive += ["n_kv_heads"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        for name in ("prelude_layers", "coda_layers", "n_shared_experts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if self.attn_type not in ATTN_TYPES:
            raise ConfigError(f"config field 'attn_type' must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"config field 'dim' ({self.dim}) must be divisible by 'n_heads' ({self.n_heads})")
        if self.dim < 8:
            raise ConfigError(f"config field 'dim' must be at least 8 (the loop-index embedding uses dim//8 channels), got {self.dim}")
        if self.attn_type == "mla" and self.qk_rope_head_dim % 2:
            raise ConfigError(f"config field 'qk_rope_head_dim' must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.attn_type == "gqa":
            if self.head_dim % 2:
                raise ConfigError(f"config field 'dim' // 'n_heads' (the GQA head width, {self.head_dim}) must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"config field 'n_heads' ({self.n_heads}) must be divisible by 'n_kv_heads' ({self.n_kv_heads})")
        if self.n_experts_per_tok > self.n_experts:
            raise ConfigError(f"config field 'n_experts_per_tok' ({self.n_experts_per_tok}) must not exceed 'n_experts' ({self.n_experts})")
        for name in ("act_threshold", "rope_theta", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"config field '{name}' must be a finite number, got {value!r}")
        if not 0.0 < self.act_threshold <= 1.0:
            raise ConfigError(f"config field 'act_threshold' must be in (0, 1], got {self.act_threshold}")
        if self.rope_theta <= 1.0:
            raise ConfigError(f"config field 'rope_theta' must be > 1, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config field 'dropout' must be in [0, 1), got {self.dropout}")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MythosConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        clean = dict(data)
        for name in ("act_threshold", "rope_theta", "dropout"):
            if isinstance(clean.get(name), int) and not isinstance(clean.get(name), bool):
                clean[name] = float(clean[name])
        return cls(**clean)

    def replace(self, **changes: Any) -> "MythosConfig":
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_name(cls, name: str) -> "MythosConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])

    @classmethod
    def load(cls, path: str | Path) -> "MythosConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings (the CLI's --set) into typed config changes."""
    types = {f.name: f.type for f in fields(MythosConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in types:
            raise ConfigError(f"unknown config field {key!r} in --set")
        kind = types[key]
        try:
            out[key] = int(raw) if kind in ("int", int) else float(raw) if kind in ("float", float) else raw
        except ValueError:
            raise ConfigError(f"config field {key!r} expects a {kind}, got {raw!r}") from None
    return out


def _om(dim, n_heads, n_kv_heads, max_seq_len, loops, pre, coda, kv, q, rope, nope, v, n_exp,
        shared, topk, exp_dim, lora, vocab=32000, theta=500000.0, out_tokens=4096):
    return dict(vocab_size=vocab, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                max_seq_len=max_seq_len, max_loop_iters=loops, prelude_layers=pre,
                coda_layers=coda, attn_type="mla", kv_lora_rank=kv, q_lora_rank=q,
                qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v, n_experts=n_exp,
                n_shared_experts=shared, n_experts_per_tok=topk, expert_dim=exp_dim,
                act_threshold=0.99, rope_theta=theta, lora_rank=lora,
                max_output_tokens=out_tokens)


PRESETS: dict[str, dict[str, Any]] = {
    # tests: ~0.1M parameters, byte vocabulary so text prompts work
    "tiny": dict(vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=128,
                 max_loop_iters=4, prelude_layers=1, coda_layers=1, attn_type="mla",
                 kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
                 v_head_dim=16, n_experts=4, n_shared_experts=1, n_experts_per_tok=2,
                 expert_dim=32, act_threshold=0.99, rope_theta=10000.0, lora_rank=4,
                 max_output_tokens=128),
    # benchmarks: ~28M parameters
    "bench": dict(vocab_size=32000, dim=512, n_heads=8, n_kv_heads=2, max_seq_len=2048,
                  max_loop_iters=8, prelude_layers=1, coda_layers=1, attn_type="mla",
                  kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                  v_head_dim=64, n_experts=16, n_shared_experts=1, n_experts_per_tok=2,
                  expert_dim=256, act_threshold=0.99, rope_theta=500000.0, lora_rank=8,
                  max_output_tokens=2048),
    # OpenMythos 0.5.0 size presets (open_mythos.variants), as configs
    "1b": _om(2048, 16, 4, 4096, 16, 2, 2, 256, 512, 32, 64, 64, 64, 2, 4, 2048, 8),
    "3b": _om(3072, 24, 6, 4096, 16, 2, 2, 384, 768, 32, 96, 96, 64, 2, 4, 4096, 8),
    "10b": _om(4096, 32, 8, 8192, 24, 2, 2, 512, 1024, 64, 128, 128, 128, 2, 4, 5632, 16),
    "50b": _om(6144, 48, 8, 8192, 32, 3, 3, 512, 1536, 64, 128, 128, 256, 4, 4, 9728, 32),
    "100b": _om(8192, 64, 8, 1000000, 32, 4, 4, 512, 2048, 64, 128, 128, 256, 4, 8, 13568, 64,
                theta=1000000.0, out_tokens=131072),
    "500b": _om(12288, 96, 16, 1000000, 48, 4, 4, 1024, 3072, 64, 128, 128, 512, 8, 8, 23040,
                128, vocab=100000, theta=1000000.0, out_tokens=131072),
    "1t": _om(16384, 128, 16, 1000000, 64, 6, 6, 1024, 4096, 64, 128, 128, 512, 8, 8, 34560,
              256, vocab=100000, theta=2000000.0, out_tokens=131072),
}
