"""The MoE plugin's kernel, in Triton: routing results in, gate-weighted SwiGLU experts out.

Two launches, both over (token, chosen expert) pairs, so work scales with N*K, not with E:
1. `up_kernel`:   hg[n,k,f] = gate[n,k] * silu(x[n] . Wg[e,f]) * (x[n] . Wu[e,f]),  e = idx[n,k]
2. `down_kernel`: y[n,d]    = sum_k sum_f hg[n,k,f] * Wd[e,d,f]
Accumulation is fp32 whatever the storage type (fp32, fp16, bf16). That is the per-token
path (decode and short prompts): each program reads its expert's weights alone.

The grouped path (long prefills, N*K >= GROUPED_MIN_PAIRS): the (token, expert) pairs are
sorted by expert on the host (torch ops), cut into tiles of BLOCK_M pairs that share one
expert, and each program multiplies a tile with `tl.dot` (tensor cores on GPU), so one read
of an expert's weight tile serves up to BLOCK_M tokens:
3. `up_grouped_kernel`:   hg[tile rows, f-block] as above, via [BLOCK_M, D] x [D, BLOCK_F] dots
4. `down_grouped_kernel`: yp[pair, d-block] = hg[pair] . Wd[e, d-block]; y = sum over k (torch)
fp32 inputs use IEEE fp32 dots (no TF32), so both paths give the same numbers to ~1e-6.

The single-launch path (`fused_kernel`): a TensorRT AOT plugin runs exactly one kernel, so
this one does both projections: program (token, block of output channels) recomputes its
token's SwiGLU hidden block by block and accumulates the down projection (the up projection
is recomputed once per output block: ceil(D / BLOCK_DY) times). It takes int64 routing
indices as the ONNX graph passes them.

Runs on CPU under TRITON_INTERPRET=1 (tests) and compiles ahead of time to PTX for sm_87 and
sm_90 without a GPU (mythos_deploy/moe_aot.py). Triton is imported when this module is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_swiglu(x_ptr, wg_ptr, wu_ptr, n, e, g, offs_f, mask_f, D, F,
                  BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """g * silu(x[n] . Wg[e, f]) * (x[n] . Wu[e, f]) for the hidden units offs_f, fp32."""
    acc_g = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xv = tl.load(x_ptr + n * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w_off = e * F * D + offs_f[:, None] * D + offs_d[None, :]
        m2 = mask_f[:, None] & mask_d[None, :]
        acc_g += tl.sum(tl.load(wg_ptr + w_off, mask=m2, other=0.0).to(tl.float32) * xv[None, :], axis=1)
        acc_u += tl.sum(tl.load(wu_ptr + w_off, mask=m2, other=0.0).to(tl.float32) * xv[None, :], axis=1)
    return acc_g * tl.sigmoid(acc_g) * acc_u * g


@triton.jit
def up_kernel(x_ptr, idx_ptr, gate_ptr, wg_ptr, wu_ptr, hg_ptr, D, F, K,
               BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    pair = tl.program_id(0)  # n * K + k
    fblk = tl.program_id(1)
    n = pair // K
    e = tl.load(idx_ptr + pair).to(tl.int64)
    g = tl.load(gate_ptr + pair).to(tl.float32)
    offs_f = fblk * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    h = _gated_swiglu(x_ptr, wg_ptr, wu_ptr, n, e, g, offs_f, mask_f, D, F, BLOCK_F, BLOCK_D)
    tl.store(hg_ptr + pair * F + offs_f, h, mask=mask_f)


@triton.jit
def down_kernel(hg_ptr, idx_ptr, wd_ptr, y_ptr, D, F, K,
                 BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    n = tl.program_id(0)
    dblk = tl.program_id(1)
    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(0, K):
        e = tl.load(idx_ptr + n * K + k).to(tl.int64)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < F
            h = tl.load(hg_ptr + (n * K + k) * F + offs_f, mask=mask_f, other=0.0)
            w = tl.load(wd_ptr + e * D * F + offs_d[:, None] * F + offs_f[None, :],
                        mask=mask_d[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
    tl.store(y_ptr + n * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _tile(order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its expert, the (token, k) pair ids of its rows, and the row mask."""
    tile = tl.program_id(0)
    e = tl.load(tile_e_ptr + tile).to(tl.int64)
    rows = tl.load(tile_lo_ptr + tile) + tl.arange(0, BLOCK_M)
    mask_m = rows < tl.load(tile_hi_ptr + tile)
    pair = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    return e, pair, mask_m


@triton.jit
def up_grouped_kernel(x_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, gate_ptr, wg_ptr, wu_ptr, hg_ptr, D, F, K,
                BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    e, pair, mask_m = _tile(order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, BLOCK_M)
    fblk = tl.program_id(1)
    n = pair // K
    g = tl.load(gate_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
    offs_f = fblk * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    acc_g = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xt = tl.load(x_ptr + n[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        w_off = e * F * D + offs_f[None, :] * D + offs_d[:, None]  # [BLOCK_D, BLOCK_F]: W[e]^T tile
        m2 = mask_d[:, None] & mask_f[None, :]
        wg = tl.load(wg_ptr + w_off, mask=m2, other=0.0)
        wu = tl.load(wu_ptr + w_off, mask=m2, other=0.0)
        if IEEE:
            acc_g += tl.dot(xt, wg, input_precision="ieee")
            acc_u += tl.dot(xt, wu, input_precision="ieee")
        else:
            acc_g += tl.dot(xt, wg)
            acc_u += tl.dot(xt, wu)
    h = acc_g * tl.sigmoid(acc_g) * acc_u * g[:, None]
    tl.store(hg_ptr + pair[:, None] * F + offs_f[None, :], h, mask=mask_m[:, None] & mask_f[None, :])


@triton.jit
def down_grouped_kernel(hg_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, wd_ptr, yp_ptr, D, F,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, IEEE: tl.constexpr):
    e, pair, mask_m = _tile(order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, BLOCK_M)
    dblk = tl.program_id(1)
    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        h = tl.load(hg_ptr + pair[:, None] * F + offs_f[None, :], mask=mask_m[:, None] & mask_f[None, :], other=0.0)
        w = tl.load(wd_ptr + e * D * F + offs_d[None, :] * F + offs_f[:, None],  # [BLOCK_F, BLOCK_D]: Wd[e]^T tile
                    mask=mask_f[:, None] & mask_d[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(h, w, input_precision="ieee")
        else:
            acc += tl.dot(h.to(w.dtype), w)
    tl.store(yp_ptr + pair[:, None] * D + offs_d[None, :], acc, mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def fused_kernel(x_ptr, idx_ptr, gate_ptr, wg_ptr, wu_ptr, wd_ptr, D, F, K, y_ptr,
                  BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DY: tl.constexpr):
    n = tl.program_id(0)
    yblk = tl.program_id(1)
    offs_y = yblk * BLOCK_DY + tl.arange(0, BLOCK_DY)
    mask_y = offs_y < D
    acc = tl.zeros([BLOCK_DY], dtype=tl.float32)
    for k in range(0, K):
        e = tl.load(idx_ptr + n * K + k).to(tl.int64)
        g = tl.load(gate_ptr + n * K + k).to(tl.float32)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < F
            h = _gated_swiglu(x_ptr, wg_ptr, wu_ptr, n, e, g, offs_f, mask_f, D, F, BLOCK_F, BLOCK_D)
            w = tl.load(wd_ptr + e * D * F + offs_y[:, None] * F + offs_f[None, :],
                        mask=mask_y[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
    tl.store(y_ptr + n * D + offs_y, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


BLOCK_F, BLOCK_D = 32, 32
BLOCK_DY = 64  # output channels per program of the fused kernel
BLOCK_M = 32  # pairs per grouped tile
GROUPED_MIN_PAIRS = 128  # N*K from which the grouped path is used by default


def expert_tiles(topk_idx: torch.Tensor, n_experts: int, block_m: int = BLOCK_M):
    """Pairs (n*K + k) sorted by expert, and tiles of <= block_m sorted pairs sharing one
    expert: (order [P], tile_expert [T], tile_lo [T], tile_hi [T]) as int32 on idx's device."""
    flat = topk_idx.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    per = (counts + block_m - 1) // block_m
    tile_e = torch.repeat_interleave(torch.arange(n_experts, device=flat.device), per)
    first_tile = torch.cumsum(per, 0) - per
    tile_lo = starts[tile_e] + block_m * (torch.arange(tile_e.numel(), device=flat.device) - first_tile[tile_e])
    tile_hi = torch.minimum(tile_lo + block_m, starts[tile_e] + counts[tile_e])
    return tuple(t.to(torch.int32).contiguous() for t in (order, tile_e, tile_lo, tile_hi))


def _grouped(x, idx, g, w_gate, w_up, w_down):
    N, D = x.shape
    K, E, F = idx.shape[1], w_gate.shape[0], w_gate.shape[1]
    order, tile_e, lo, hi = expert_tiles(idx, E)
    T = tile_e.numel()
    ieee = x.dtype == torch.float32
    hg = torch.empty(N * K, F, dtype=torch.float32, device=x.device)
    yp = torch.empty(N * K, D, dtype=torch.float32, device=x.device)
    up_grouped_kernel[(T, triton.cdiv(F, BLOCK_F))](x, order, tile_e, lo, hi, g, w_gate, w_up, hg, D, F, K,
                                               BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D, IEEE=ieee)
    down_grouped_kernel[(T, triton.cdiv(D, BLOCK_D))](hg, order, tile_e, lo, hi, w_down, yp, D, F,
                                                 BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_F=BLOCK_F, IEEE=ieee)
    return yp.view(N, K, D).sum(1).to(x.dtype)


def moe_experts_fused(x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor,
                      w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The single-launch kernel (what the TensorRT AOT plugin runs), same contract."""
    N, D = x.shape
    y = torch.empty_like(x)
    if N == 0:
        return y
    args = [t.contiguous() for t in (x, topk_idx.to(torch.int64), gates, w_gate, w_up, w_down)]
    fused_kernel[(N, triton.cdiv(D, BLOCK_DY))](*args, D, w_gate.shape[1], topk_idx.shape[1], y,
                                                 BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D, BLOCK_DY=BLOCK_DY)
    return y


def moe_experts_triton(x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor,
                       w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                       grouped: bool | None = None) -> torch.Tensor:
    """Same contract as mythos_deploy::moe_experts: x [N,D]; topk_idx, gates [N,K];
    w_gate, w_up [E,F,D]; w_down [E,D,F] -> [N,D] in x's dtype. `grouped` picks the
    expert-grouped path (default: when N*K >= GROUPED_MIN_PAIRS). The grouped path sizes its
    launch from the routing (a host sync), so CUDA-graph capture uses the per-token path."""
    N, D = x.shape
    K = topk_idx.shape[1]
    F = w_gate.shape[1]
    y = torch.empty_like(x)
    if N == 0:
        return y
    x, w_gate, w_up, w_down = (t.contiguous() for t in (x, w_gate, w_up, w_down))
    idx = topk_idx.to(torch.int32).contiguous()
    g = gates.contiguous()
    if grouped if grouped is not None else N * K >= GROUPED_MIN_PAIRS:
        return _grouped(x, idx, g, w_gate, w_up, w_down)
    hg = torch.empty(N * K, F, dtype=torch.float32, device=x.device)
    up_kernel[(N * K, triton.cdiv(F, BLOCK_F))](x, idx, g, w_gate, w_up, hg, D, F, K,
                                                 BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D)
    down_kernel[(N, triton.cdiv(D, BLOCK_D))](hg, idx, w_down, y, D, F, K, BLOCK_D=BLOCK_D, BLOCK_F=BLOCK_F)
    return y
