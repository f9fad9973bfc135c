"""The latent cache: one slot per attention site, preallocated, written in place.

Slot order and names are fixed here and shared by exporters and runtimes:
`prelude_0..`, `recurrent_loop_0..recurrent_loop_{n_loops-1}`, `coda_0..`. Each slot holds
`cfg.cache_width` values per token: for MLA `[c_kv | rotated k_rope]` (one shared RoPE key,
not one per head), for GQA `[rotated k | v]` of the n_kv_heads heads.
"""

from __future__ import annotations

import torch

from mythos_deploy.config import MythosConfig
from mythos_deploy.errors import CacheError


def slot_names(cfg: MythosConfig, n_loops: int) -> list[str]:
    return ([f"prelude_{i}" for i in range(cfg.prelude_layers)]
            + [f"recurrent_loop_{t}" for t in range(n_loops)]
            + [f"coda_{i}" for i in range(cfg.coda_layers)])


class SlotView:
    """Writes new positions into a preallocated buffer; returns every position attended."""

    def __init__(self, buf: torch.Tensor, start: int):
        self.buf, self.start = buf, start

    def update(self, new: torch.Tensor) -> torch.Tensor:  # [B,T,W] -> [B,start+T,W]
        end = self.start + new.shape[1]
        self.buf[:, self.start:end] = new
        return self.buf[:, :end]


class ConcatView:
    """Export form: past tensor in, past+new out (kept as `present`)."""

    def __init__(self, past: torch.Tensor):
        self.past = past
        self.new: torch.Tensor | None = None
        self.present: torch.Tensor | None = None

    def update(self, new: torch.Tensor) -> torch.Tensor:
        self.new = new
        self.present = torch.cat([self.past, new], dim=1)
        return self.present


class KVCache:
    """Preallocated buffers [batch, max_len, width] for every slot of one model run.

    `n_loops` is fixed at creation: the recurrent slots exist per loop, so decoding with a
    different loop count than the prefill would silently mix depths; the model refuses it.
    """

    def __init__(self, cfg: MythosConfig, batch: int, max_len: int, n_loops: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if batch < 1:
            raise CacheError(f"cache batch must be >= 1, got {batch}")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise CacheError(f"cache length budget must be in [1, max_seq_len={cfg.max_seq_len}], got {max_len}")
        if n_loops < 1:
            raise CacheError(f"n_loops must be >= 1, got {n_loops}")
        self.cfg, self.batch, self.max_len, self.n_loops = cfg, batch, max_len, n_loops
        self.length = 0
        self.buffers = {name: torch.zeros(batch, max_len, cfg.cache_width, dtype=dtype, device=device)
                        for name in slot_names(cfg, n_loops)}

    def view(self, name: str, start: int) -> SlotView:
        return SlotView(self.buffers[name], start)

    def check(self, batch: int, start: int, n_new: int, n_loops: int) -> None:
        if n_loops != self.n_loops:
            raise CacheError(f"this cache was built with n_loops={self.n_loops}; decoding with n_loops={n_loops} would mix depths. Start a new cache to change depth.")
        if batch != self.batch:
            raise CacheError(f"cache batch is {self.batch}, input batch is {batch}")
        if start > self.length:
            raise CacheError(f"start_pos {start} is past the cached length {self.length}; positions must be contiguous")
        if start + n_new > self.max_len:
            raise CacheError(f"cache budget exceeded: {start} cached + {n_new} new > budget {self.max_len} positions")

    def advance(self, start: int, n_new: int) -> None:
        self.length = start + n_new

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
