"""The reference model: OpenMythos 0.5.0's numbers, traceable.

prelude blocks -> recurrent core (one MoE block looped n_loops times with loop-index
embedding, depth LoRA, LTI injection and ACT) -> coda blocks -> tied head. Loop count and
halting threshold are call arguments; nothing branches on tensor values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mythos_deploy.cache import KVCache
from mythos_deploy.config import MythosConfig
from mythos_deploy.errors import InputError
from mythos_deploy.layers import Expert, Linear, RMSNorm, TransformerBlock, rope_tables, tail_sigmoid
from mythos_deploy.moe import MoEFFN


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B,T,V]
    loops_used: torch.Tensor  # [B,T] int32: loops run before the position halted
    halt_prob: torch.Tensor  # [B,T] fp32: final cumulative halting probability


def loop_index_embedding(h: torch.Tensor, t, loop_dim: int) -> torch.Tensor:
    """Add [sin(t*g), cos(t*g)] (g_j = 10000^(-2j/loop_dim)) to the first loop_dim channels."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, loop_dim, 2, dtype=torch.float32,
                                            device=h.device) / loop_dim))
    angles = freqs * t
    emb = torch.cat([angles.sin(), angles.cos()])[:loop_dim].to(h.dtype)
    pad = torch.zeros(h.shape[-1] - loop_dim, dtype=h.dtype, device=h.device)
    return h + torch.cat([emb, pad])


def loop_index_embeddings(h: torch.Tensor, loops: torch.Tensor, loop_dim: int) -> torch.Tensor:
    """[R, *h.shape]: loop_index_embedding(h, t) for each t of the int64 tensor `loops`, with
    the same arithmetic (so the same bits)."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, loop_dim, 2, dtype=torch.float32,
                                            device=h.device) / loop_dim))
    angles = freqs.unsqueeze(0) * loops.unsqueeze(1)  # [R, loop_dim/2]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)[:, :loop_dim].to(h.dtype)
    pad = torch.zeros(loops.shape[0], h.shape[-1] - loop_dim, dtype=h.dtype, device=h.device)
    table = torch.cat([emb, pad], dim=1)  # [R, D]
    return h.unsqueeze(0) + table.reshape(table.shape[0], *([1] * (h.dim() - 1)), table.shape[1])


class LoRAAdapter(nn.Module):
    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = Linear(dim, rank, bias=False)
        self.B = nn.Parameter(torch.empty(rank, dim))
        self.scale = nn.Embedding(max_loops, rank)

    def forward(self, y: torch.Tensor, t) -> torch.Tensor:
        last = self.scale.num_embeddings - 1  # depth extrapolation reuses the last trained scale
        # Min, not Clip: TensorRT's Clip takes float inputs only, the loop index is int64
        if not isinstance(t, torch.Tensor):
            return (self.down(y) * self.scale.weight[min(t, last)]) @ self.B
        # index_select, not weight[idx]: inside a torch.export while_loop body the loop index is
        # an unbacked integer, and indexing with it would need its value at trace time
        idx = torch.minimum(t, torch.full_like(t, last)).reshape(1)
        return (self.down(y) * self.scale.weight.index_select(0, idx)) @ self.B  # [1, rank] broadcasts


class LTIInjection(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim))
        self.log_dt = nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.full((dim,), 0.1))

    def get_A(self) -> torch.Tensor:
        return torch.exp(-torch.exp((self.log_dt.float() + self.log_A.float()).clamp(-20, 20)))

    def forward(self, h, e, y):
        return self.get_A().to(h.dtype) * h + self.B * e + y


class ACTHalting(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.halt = Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # -> [B,T] fp32
        return tail_sigmoid(self.halt(h).float()).squeeze(-1)


class ACTState(NamedTuple):
    h_out: torch.Tensor  # [B,T,D] fp32 accumulator
    cum: torch.Tensor  # [B,T] fp32
    halted: torch.Tensor  # [B,T] bool
    loops_used: torch.Tensor  # [B,T] int32

    @staticmethod
    def zeros(h: torch.Tensor) -> "ACTState":
        B, T, D = h.shape
        return ACTState(torch.zeros(B, T, D, device=h.device), torch.zeros(B, T, device=h.device),
                        torch.zeros(B, T, dtype=torch.bool, device=h.device),
                        torch.zeros(B, T, dtype=torch.int32, device=h.device))


def act_update(state: ACTState, h: torch.Tensor, p: torch.Tensor, threshold) -> ACTState:
    """One ACT step (SEMANTICS.md, recurrent core step 5)."""
    running = ~state.halted
    weight = torch.where(state.cum + p >= threshold, (1.0 - state.cum).clamp(min=0), p)
    weight = weight * running.float()
    h_out = state.h_out + weight.unsqueeze(-1) * h.float()
    cum = state.cum + p * running.float()
    halted = state.halted | (cum >= threshold)
    return ACTState(h_out, cum, halted, state.loops_used + running.to(torch.int32))


class RecurrentCore(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.block = TransformerBlock(cfg, MoEFFN(cfg))
        self.injection = LTIInjection(cfg.dim)
        self.act = ACTHalting(cfg.dim)
        self.lora = LoRAAdapter(cfg.dim, cfg.lora_rank, cfg.max_loop_iters)
        self.norm = RMSNorm(cfg.dim)

    def step(self, t, h, e, cos, sin, mask, cache_view, state: ACTState, threshold, freeze: bool = False):
        """Loop t: returns the new h and ACT state. `t` may be an int or a 0-d tensor. With
        `freeze` (exit=propagate), a position that has halted keeps its state h_ran; its cache
        row for loop t is then what loop t's attention computes from that state."""
        x = self.norm(loop_index_embedding(h, t, self.cfg.loop_dim) + e)
        y = self.block(x, cos, sin, mask, cache_view)
        y = y + self.lora(y, t)
        h_new = self.injection(h, e, y)
        if freeze:
            h_new = torch.where(state.halted.unsqueeze(-1), h, h_new)
        return h_new, act_update(state, h_new, self.act(h_new), threshold)

    def propagated_entries(self, h, e, loops: torch.Tensor, cos, sin) -> torch.Tensor:
        """The cache rows loops `loops` (int64 [R]) would write for positions frozen at state h
        (exit propagate: CALM's state propagation), all in one batched projection: with
        x_t = RMSNorm_rec(h + L(t) + e), the recurrent block's attention entry of x_t.
        Returns [R, B, T, W]."""
        B, T, D = h.shape
        R = loops.shape[0]
        x = self.norm(loop_index_embeddings(h, loops, self.cfg.loop_dim) + e.unsqueeze(0))
        # tables [1 or B, T, d] -> [R*B, T, d], matching x's rows (loop-major)
        cos, sin = (tab.expand(B, T, tab.shape[-1]).repeat(R, 1, 1) for tab in (cos, sin))
        return self.block.cache_entry(x.reshape(R * B, T, D), cos, sin).reshape(R, B, T, -1)


class MythosModel(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.prelude = nn.ModuleList(
            [TransformerBlock(cfg, Expert(cfg.dim, cfg.dense_ffn_dim)) for _ in range(cfg.prelude_layers)])
        self.recurrent = RecurrentCore(cfg)
        self.coda = nn.ModuleList(
            [TransformerBlock(cfg, Expert(cfg.dim, cfg.dense_ffn_dim)) for _ in range(cfg.coda_layers)])
        self.norm = RMSNorm(cfg.dim)
        self.head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.build_rope()

    # ---- set-up ---------------------------------------------------------------------------
    def build_rope(self) -> None:
        """(Re)build the fp32 RoPE tables on the weights' device (after load or .to())."""
        device = self.embed.weight.device
        cos, sin = rope_tables(self.cfg.rope_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.embed.weight.device.type != "meta":
            self.build_rope()  # tables stay fp32 whatever dtype the weights take
        return self

    def init_weights(self, seed: int = 0) -> "MythosModel":
        """OpenMythos's initialisation: normal(0, 0.02) for linears, embeddings, LoRA B."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("injection.log_A") or name.endswith("injection.log_dt"):
                    p.zero_()
                elif name.endswith("injection.B"):
                    p.fill_(0.1)
                elif name.endswith("act.halt.bias"):
                    bound = self.cfg.dim ** -0.5
                    p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return self

    def set_mla_absorb(self, absorb: bool) -> "MythosModel":
        """Switch every MLA layer between the expanded (OpenMythos's) and absorbed form."""
        from mythos_deploy.layers import MLAttention
        for m in self.modules():
            if isinstance(m, MLAttention):
                m.absorb = absorb
        return self

    def new_cache(self, batch: int, max_len: int | None = None, n_loops: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len,
                       n_loops or self.cfg.max_loop_iters, dtype=p.dtype, device=p.device)

    # ---- forward --------------------------------------------------------------------------
    def check_inputs(self, input_ids: torch.Tensor, start_pos: int, n_loops: int, threshold: float) -> None:
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise InputError(f"input_ids must hold at least one token, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise InputError(f"token id {lo if lo < 0 else hi} out of range [0, {self.cfg.vocab_size})")
        if start_pos < 0:
            raise InputError(f"start_pos must be >= 0, got {start_pos}")
        end = start_pos + input_ids.shape[1]
        if end > self.cfg.max_seq_len:
            raise InputError(f"sequence of {end} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
            raise InputError(f"n_loops must be an integer >= 1, got {n_loops!r}")
        if not 0.0 < float(threshold) <= 1.0:
            raise InputError(f"act_threshold must be in (0, 1], got {threshold}")

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                start_pos: int | None = None, n_loops: int | None = None,
                act_threshold: float | None = None) -> ModelOutput:
        n_loops = self.cfg.max_loop_iters if n_loops is None else n_loops
        threshold = self.cfg.act_threshold if act_threshold is None else act_threshold
        if start_pos is None:
            start_pos = cache.length if cache is not None else 0
        B, T = input_ids.shape[0], input_ids.shape[-1]
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            self.check_inputs(input_ids, start_pos, n_loops, threshold)
            if cache is not None:
                cache.check(B, start_pos, T, n_loops)
        views = ({name: cache.view(name, start_pos) for name in cache.buffers}
                 if cache is not None else {})
        logits, loops_used, halt_prob = self.run(input_ids, start_pos, n_loops, threshold, views)
        if cache is not None:
            cache.advance(start_pos, T)
        return ModelOutput(logits, loops_used, halt_prob)

    def positions(self, T: int, start_pos, past, device) -> tuple[torch.Tensor, ...]:
        """RoPE tables [R, T, d] for the new positions and the attention mask [R, T, past+T].

        `start_pos` is an int, a 0-d tensor (every row at the same position: R = 1, broadcast
        over the batch) or an int64 tensor [B] (row b at its own position: R = B). Keys are
        `past` cached positions followed by the T new ones. Cached key j of row b is valid
        when j < start_pos[b] (a caller may pass a longer buffer than is filled, and rows of
        one call may be at different lengths); new token i sees new tokens up to itself.
        """
        start = torch.as_tensor(start_pos, dtype=torch.int64, device=device).reshape(-1, 1)  # [R,1]
        pos = torch.arange(T, device=device).unsqueeze(0) + start  # [R,T]
        past_ok = torch.arange(past, device=device).reshape(1, 1, past) < start.unsqueeze(-1)  # [R,1,past]
        new = torch.arange(T, device=device)
        new_ok = (new.unsqueeze(0) <= new.unsqueeze(1)).unsqueeze(0)  # [1,T,T] causal
        mask = torch.cat([past_ok.expand(pos.shape[0], T, past), new_ok.expand(pos.shape[0], T, T)], dim=2)
        return self.rope_cos[pos], self.rope_sin[pos], mask

    def run_prelude(self, input_ids, start_pos, views: dict, past=None) -> torch.Tensor:
        T = input_ids.shape[1]
        cos, sin, mask = self.positions(T, start_pos, self._past(start_pos, views, past), input_ids.device)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.prelude):
            x = layer(x, cos, sin, mask, views.get(f"prelude_{i}"))
        return x

    def run_step(self, t, h, e, state: ACTState, threshold, start_pos, view, past=None, freeze: bool = False):
        T = h.shape[1]
        cos, sin, mask = self.positions(T, start_pos, self._past(start_pos, {0: view} if view else {}, past), h.device)
        return self.recurrent.step(t, h, e, cos, sin, mask, view, state, threshold, freeze)

    def propagated_entries(self, h, e, start_pos, loops) -> torch.Tensor:
        """[len(loops), B, T, W]: the recurrent cache rows of `loops` (ints or an int64 tensor)
        for positions frozen at h."""
        cos, sin, _ = self.positions(h.shape[1], start_pos, 0, h.device)  # [1 or B, T, d]
        loops = torch.as_tensor(loops, dtype=torch.int64, device=h.device).reshape(-1)
        return self.recurrent.propagated_entries(h, e, loops, cos, sin)

    def run_coda(self, h_out, start_pos, views: dict, past=None) -> torch.Tensor:
        T = h_out.shape[1]
        cos, sin, mask = self.positions(T, start_pos, self._past(start_pos, views, past), h_out.device)
        x = h_out.to(self.embed.weight.dtype)
        for i, layer in enumerate(self.coda):
            x = layer(x, cos, sin, mask, views.get(f"coda_{i}"))
        return self.head(self.norm(x))

    @staticmethod
    def _past(start_pos, views, past):
        """Cached key positions the views return before the new ones: `past` when given
        (export passes the past tensor's length), else start_pos with a cache, 0 without."""
        if past is not None:
            return past
        return start_pos if views else 0

    def run(self, input_ids, start_pos, n_loops: int, threshold, views: dict, past=None):
        """The whole model with explicit cache views (a dict slot -> view; empty = no cache)."""
        e = h = self.run_prelude(input_ids, start_pos, views, past)
        state = ACTState.zeros(h)
        for t in range(n_loops):
            h, state = self.run_step(t, h, e, state, threshold, start_pos,
                                     views.get(f"recurrent_loop_{t}"), past)
        logits = self.run_coda(state.h_out, start_pos, views, past)
        return logits, state.loops_used, state.cum
