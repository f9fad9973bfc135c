"""The MoE plugin's kernel, in Triton: routing results in, gate-weighted SwiGLU experts out.

Two launches, both over (token, chosen expert) pairs, so work scales with N*K, not with E:
1. `_up_kernel`:   hg[n,k,f] = gate[n,k] * silu(x[n] . Wg[e,f]) * (x[n] . Wu[e,f]),  e = idx[n,k]
2. `_down_kernel`: y[n,d]    = sum_k sum_f hg[n,k,f] * Wd[e,d,f]
Accumulation is fp32 whatever the storage type (fp32, fp16, bf16). This is the per-token
path (decode and short prompts). The expert-grouped path for long prefills (tokens sorted by
expert, tensor-core tiles) is not written yet.

Runs on CPU under TRITON_INTERPRET=1 (tests) and compiles ahead of time to PTX for sm_87 and
sm_90 without a GPU (exporters/moe_aot.py). Triton is imported when this module is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _up_kernel(x_ptr, idx_ptr, gate_ptr, wg_ptr, wu_ptr, hg_ptr, D, F, K,
               BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    pair = tl.program_id(0)  # n * K + k
    fblk = tl.program_id(1)
    n = pair // K
    e = tl.load(idx_ptr + pair).to(tl.int64)
    g = tl.load(gate_ptr + pair).to(tl.float32)
    offs_f = fblk * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    acc_g = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xv = tl.load(x_ptr + n * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w_off = e * F * D + offs_f[:, None] * D + offs_d[None, :]
        m2 = mask_f[:, None] & mask_d[None, :]
        wg = tl.load(wg_ptr + w_off, mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(wu_ptr + w_off, mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xv[None, :], axis=1)
        acc_u += tl.sum(wu * xv[None, :], axis=1)
    h = acc_g * tl.sigmoid(acc_g) * acc_u * g
    tl.store(hg_ptr + pair * F + offs_f, h, mask=mask_f)


@triton.jit
def _down_kernel(hg_ptr, idx_ptr, wd_ptr, y_ptr, D, F, K,
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


BLOCK_F, BLOCK_D = 32, 32


def moe_experts_triton(x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor,
                       w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Same contract as mythos_deploy::moe_experts: x [N,D]; topk_idx, gates [N,K];
    w_gate, w_up [E,F,D]; w_down [E,D,F] -> [N,D] in x's dtype."""
    N, D = x.shape
    K = topk_idx.shape[1]
    F = w_gate.shape[1]
    y = torch.empty_like(x)
    if N == 0:
        return y
    x, w_gate, w_up, w_down = (t.contiguous() for t in (x, w_gate, w_up, w_down))
    idx = topk_idx.to(torch.int32).contiguous()
    g = gates.contiguous()
    hg = torch.empty(N * K, F, dtype=torch.float32, device=x.device)
    _up_kernel[(N * K, triton.cdiv(F, BLOCK_F))](x, idx, g, w_gate, w_up, hg, D, F, K,
                                                 BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D)
    _down_kernel[(N, triton.cdiv(D, BLOCK_D))](hg, idx, w_down, y, D, F, K, BLOCK_D=BLOCK_D, BLOCK_F=BLOCK_F)
    return y
