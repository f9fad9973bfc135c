"""Building blocks in forward order: RMSNorm, real-valued RoPE, SwiGLU expert, MLA and GQA
attention, the pre-norm transformer block. Parameter names match OpenMythos 0.5.0.

Attention never owns its cache. It receives a `CacheView` (see cache.py) whose `update(new)`
stores the new positions and returns every position attended; eager decoding writes into a
preallocated buffer, export concatenates past and new. The layer code is the same for both.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mythos_deploy.config import MythosConfig
from mythos_deploy.options import env_int


class CacheView(Protocol):
    def update(self, new: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, S, W]
        ...


def tail_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x) as 1 / (1 + exp(-x)), exact to rounding far into the negative tail in every
    runtime. A position that never halts gets the output sum_t p_t h_t with sum_t p_t ~ 1e-7,
    which the coda's RMSNorm rescales: its logits hang on these tail values. onnxruntime's CPU
    Sigmoid returns 0 below x ~ -18 and is ~18% off near -16; this form, exported as Neg, Exp,
    Add and Reciprocal, is within 1e-7 relative over [-25, -5] (tests/exporters/test_tails.py)."""
    return torch.reciprocal(1.0 + torch.exp(-x))


_ONEDNN_MIN_WEIGHT = 1 << 18  # elements: below it oneDNN's ~25 us per call costs more than it saves
_ONEDNN_MAX_ROWS = 256
_onednn: bool | None = None
_PLAIN = (torch.Tensor, nn.Parameter)  # not FakeTensor / FunctionalTensor: tracing never takes oneDNN


def _onednn_linear_available() -> bool:
    global _onednn
    if _onednn is None:
        _onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                   and env_int("MYTHOS_ONEDNN_LINEAR", 1, "0/1 (0 turns the oneDNN decode path off)") != 0)
    return _onednn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for fp32 inference of a few rows on the CPU (decode, short prefills),
    which runs through oneDNN's inner product: torch's default CPU path (MKL sgemv) reads
    weights at about half the memory bandwidth on AMD EPYC, oneDNN at 1.5-2x that (measured
    in benchmarks/results/scale_1b.json, eager vs `MYTHOS_ONEDNN_LINEAR=0`). Only plain CPU
    tensors without autograd take it: under torch.export, torch.compile or a fake/functional
    tensor mode, and for training, it is F.linear, so graphs and gradients never see it."""
    if (type(x) is torch.Tensor and type(weight) in _PLAIN and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.is_contiguous()
            and weight.numel() >= _ONEDNN_MIN_WEIGHT and x.numel() <= _ONEDNN_MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and _onednn_linear_available()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # x / sqrt(mean + eps) rather than x * rsqrt(...): equal to rounding, and the form
        # onnxruntime fuses into one SimplifiedLayerNormalization kernel
        return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(width: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width fp32 tables [max_len, width] for interleaved-pair RoPE: cos repeated per
    pair (c, c) and sin signed per pair (-s, +s), so apply_rope is two products and a sum."""
    freqs = 1.0 / (theta ** (torch.arange(0, width, 2, dtype=torch.float32) / width))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    cos, sin = angles.cos(), angles.sin()
    return (torch.stack((cos, cos), dim=-1).reshape(max_len, width),
            torch.stack((-sin, sin), dim=-1).reshape(max_len, width))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2k], x[2k+1]) -> (x0 c - x1 s, x1 c + x0 s). x: [B, T, ..., d];
    cos/sin: [R, T, d] rows of rope_tables, R = 1 (every row at the same positions) or B
    (per-row positions). The same numbers as the pairwise form (a + (-b) is a - b exactly in
    IEEE arithmetic), in a handful of graph nodes: the pair swap is one reshape-flip-reshape
    instead of split/squeeze/stack per half."""
    shape = x.shape
    xf = x.float()
    swapped = xf.reshape(*shape[:-1], shape[-1] // 2, 2).flip(-1).reshape(shape)
    extra = x.dim() - 3  # broadcast tables over head dims between T and d
    c = cos.reshape(cos.shape[0], cos.shape[1], *([1] * extra), cos.shape[2])
    s = sin.reshape(sin.shape[0], sin.shape[1], *([1] * extra), sin.shape[2])
    return (xf * c + swapped * s).to(x.dtype)


class Expert(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = Linear(dim, hidden, bias=False)
        self.up = Linear(dim, hidden, bias=False)
        self.down = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """q [B,H,T,d], k [B,H,S,d], v [B,H,S,dv], mask [R,T,S] bool (True = may attend; R = 1 or B)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale  # [B,H,T,S]
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.matmul(F.softmax(scores, dim=-1).to(v.dtype), v)  # [B,H,T,dv]


class MLAttention(nn.Module):
    """Multi-Latent Attention. Cache entry per token: [c_kv (kv_lora_rank) | rotated k_rope]."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.nope_dim = cfg.qk_nope_head_dim
        self.v_dim = cfg.v_head_dim
        self.scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
        self.q_down = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank)
        self.q_up_nope = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_nope_head_dim, bias=False)
        self.q_up_rope = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_rope_head_dim, bias=False)
        self.kv_down = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.kv_up = Linear(cfg.kv_lora_rank,
                               cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        # absorbed: fold kv_up into the query and output sides (DeepSeek-V2) so attention runs
        # in the latent space and the cached latents are never re-expanded per head. Same
        # numbers up to rounding; the exporter enables it, the eager reference keeps it off.
        self.absorb = False

    def cache_entry(self, x, cos, sin) -> torch.Tensor:
        """What this layer caches for the positions of x: [c_kv | rotated shared k_rope]."""
        kv_raw = self.kv_down(x)  # [B,T,kv_lora_rank+rope]
        k_rope = apply_rope(kv_raw[..., self.kv_lora_rank:], cos, sin)  # one shared key
        return torch.cat([kv_raw[..., : self.kv_lora_rank], k_rope], dim=-1)

    def forward(self, x, cos, sin, mask, cache: CacheView | None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).view(B, T, H, self.nope_dim)
        q_rope = apply_rope(self.q_up_rope(c_q).view(B, T, H, self.rope_dim), cos, sin)
        latent = self.cache_entry(x, cos, sin)
        if cache is not None:
            latent = cache.update(latent)  # [B,S,W]
        if self.absorb:
            return self._absorbed(q_nope, q_rope, latent, mask)
        S = latent.shape[1]
        kv = self.kv_up(self.kv_norm(latent[..., : self.kv_lora_rank]))
        kv = kv.view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim:]
        k_rope_all = latent[..., self.kv_lora_rank:].unsqueeze(2).expand(B, S, H, self.rope_dim)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B,H,T,nope+rope]
        k = torch.cat([k_nope, k_rope_all], dim=-1).transpose(1, 2)  # [B,H,S,nope+rope]
        out = _attend(q, k, v.transpose(1, 2), mask, self.scale)  # [B,H,T,v]
        return self.wo(out.transpose(1, 2).reshape(B, T, H * self.v_dim))


    def _absorbed(self, q_nope, q_rope, latent, mask) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        R = self.kv_lora_rank
        w = self.kv_up.weight.view(H, self.nope_dim + self.v_dim, R)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # [H,nope,R], [H,v,R]
        cn = self.kv_norm(latent[..., :R]).unsqueeze(1)  # [B,1,S,R]
        k_rope = latent[..., R:].unsqueeze(1)  # [B,1,S,rope]
        q_lat = torch.matmul(q_nope.transpose(1, 2), w_uk)  # [B,H,T,R]
        scores = (torch.matmul(q_lat, cn.transpose(-2, -1))
                  + torch.matmul(q_rope.transpose(1, 2), k_rope.transpose(-2, -1))).float() * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        o_lat = torch.matmul(F.softmax(scores, dim=-1).to(cn.dtype), cn)  # [B,H,T,R]
        out = torch.matmul(o_lat, w_uv.transpose(-2, -1))  # [B,H,T,v]
        return self.wo(out.transpose(1, 2).reshape(B, T, H * self.v_dim))


class GQAttention(nn.Module):
    """Grouped-query attention. Cache entry per token: [rotated k (n_kv*hd) | v (n_kv*hd)]."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.groups = cfg.n_heads // cfg.n_kv_heads
        self.wq = Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def cache_entry(self, x, cos, sin) -> torch.Tensor:
        """What this layer caches for the positions of x: [rotated k | v]."""
        B, T, _ = x.shape
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        return torch.cat([k.reshape(B, T, -1), self.wv(x)], dim=-1)

    def forward(self, x, cos, sin, mask, cache: CacheView | None) -> torch.Tensor:
        B, T, _ = x.shape
        hd, kvh = self.head_dim, self.n_kv_heads
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, hd), cos, sin)
        entry = self.cache_entry(x, cos, sin)
        if cache is not None:
            entry = cache.update(entry)
        S = entry.shape[1]
        k = entry[..., : kvh * hd].view(B, S, kvh, hd).repeat_interleave(self.groups, dim=2)
        v = entry[..., kvh * hd:].view(B, S, kvh, hd).repeat_interleave(self.groups, dim=2)
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                      hd ** -0.5)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * hd))


class TransformerBlock(nn.Module):
    """Pre-norm block; `ffn` is the dense SwiGLU or (recurrent block) the MoE FFN."""

    def __init__(self, cfg: MythosConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.attn = MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
        self.ffn = ffn

    def forward(self, x, cos, sin, mask, cache: CacheView | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))

    def cache_entry(self, x, cos, sin) -> torch.Tensor:
        """The cache row this block's attention writes for the positions of x (its input)."""
        return self.attn.cache_entry(self.attn_norm(x), cos, sin)
