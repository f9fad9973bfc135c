"""The MoE FFN of the recurrent block, with the routed-expert compute as one custom torch op.

`mythos_deploy::moe_experts(x, topk_idx, gates, w_gate, w_up, w_down)` takes routing results
(chosen expert ids and renormalised gates per token) and returns the gate-weighted sum of the
chosen SwiGLU experts. Exporters lower this single op to a TensorRT plugin node, onnxruntime's
com.microsoft::MoE, or standard ONNX ops. The eager kernel is vectorised: it never branches in
Python on tensor values and never synchronises with the host per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mythos_deploy.config import MythosConfig
from mythos_deploy.layers import Expert, Linear, linear


def moe_experts_grouped(x, topk_idx, gates, w_gate, w_up, w_down) -> torch.Tensor:
    """Tokens grouped by expert; each used expert's weights are read in place (views, never
    copied), so decode reads only the K experts it uses, once each. Reads `topk_idx` on the
    host: the CPU kernel."""
    out = torch.zeros_like(x)
    for e in torch.unique(topk_idx).tolist():
        rows, slots = (topk_idx == e).nonzero(as_tuple=True)
        xe = x[rows]
        h = F.silu(linear(xe, w_gate[e])) * linear(xe, w_up[e])
        out = out.index_add(0, rows, linear(h, w_down[e]) * gates[rows, slots].unsqueeze(-1))
    return out


def moe_experts_vectorised(x, topk_idx, gates, w_gate, w_up, w_down) -> torch.Tensor:
    """No host synchronisation and no branch on tensor values (it traces). Two strategies
    chosen by shape only: few tokens gather the K chosen experts' weights per token (a copy of
    them on every call); many tokens run every expert densely, weighted by a scattered [N,E]
    gate matrix."""
    N, K = topk_idx.shape
    E = w_gate.shape[0]
    if N * K < E:
        wg, wu, wd = w_gate[topk_idx], w_up[topk_idx], w_down[topk_idx]  # [N,K,F,D] / [N,K,D,F]
        h = F.silu(torch.einsum("nd,nkfd->nkf", x, wg)) * torch.einsum("nd,nkfd->nkf", x, wu)
        y = torch.einsum("nkf,nkdf->nkd", h, wd)  # [N,K,D]
        return (y * gates.unsqueeze(-1)).sum(dim=1)
    dense_gates = torch.zeros(N, E, dtype=gates.dtype, device=gates.device)
    dense_gates = dense_gates.scatter_add(1, topk_idx, gates)  # [N,E]
    h = F.silu(torch.einsum("nd,efd->nef", x, w_gate)) * torch.einsum("nd,efd->nef", x, w_up)
    return torch.einsum("nef,edf->nd", h * dense_gates.unsqueeze(-1), w_down)


def moe_experts_reference(x, topk_idx, gates, w_gate, w_up, w_down) -> torch.Tensor:
    """Routed-expert compute. x [N,D]; topk_idx, gates [N,K]; w_gate, w_up [E,F,D];
    w_down [E,D,F] -> [N,D]. The CPU groups tokens by expert (gathering `w[topk_idx]` copied
    200 MB of expert weights per loop at the 1b preset, 3.5x slower than OpenMythos's
    decoding); other devices (without the Triton kernel) use the vectorised form."""
    if x.device.type == "cpu":
        return moe_experts_grouped(x, topk_idx, gates, w_gate, w_up, w_down)
    return moe_experts_vectorised(x, topk_idx, gates, w_gate, w_up, w_down)


@torch.library.custom_op("mythos_deploy::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, gates: torch.Tensor,
                w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return moe_experts_reference(x, topk_idx, gates, w_gate, w_up, w_down)


@moe_experts.register_fake
def _moe_experts_fake(x, topk_idx, gates, w_gate, w_up, w_down):
    return torch.empty_like(x)


def _moe_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _moe_backward(ctx, grad_out):
    x, topk_idx, gates, w_gate, w_up, w_down = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad or t.is_floating_point())
                  for t in (x, gates, w_gate, w_up, w_down)]
        out = moe_experts_reference(leaves[0], topk_idx, *leaves[1:])
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    gx, ggates, gwg, gwu, gwd = grads
    return gx, None, ggates, gwg, gwu, gwd


moe_experts.register_autograd(_moe_backward, setup_context=_moe_setup_context)


_triton_registered = False


def use_triton_kernel() -> bool:
    """Route CUDA calls of the custom op to the Triton plugin kernel (mythos_deploy/moe_kernel.py).
    Returns False (and changes nothing) when triton is not installed. CPU calls keep the
    vectorised torch kernel. Idempotent."""
    global _triton_registered
    if _triton_registered:
        return True
    try:
        from mythos_deploy.moe_kernel import moe_experts_triton
    except ImportError:
        return False
    moe_experts.register_kernel("cuda")(moe_experts_triton)
    _triton_registered = True
    return True


def moe_experts_naive(x, topk_idx, gates, w_gate, w_up, w_down) -> torch.Tensor:
    """Per-expert Python loop, as OpenMythos computes it. For tests only."""
    out = torch.zeros_like(x)
    for k in range(topk_idx.shape[1]):
        for e in range(w_gate.shape[0]):
            sel = topk_idx[:, k] == e
            if not sel.any():
                continue
            xe = x[sel]
            ye = F.linear(F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e]), w_down[e])
            out[sel] += gates[sel, k].unsqueeze(-1) * ye
    return out


class MoEFFN(nn.Module):
    """Router (+ load-balancing bias for selection only), routed experts, shared experts."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.topk = cfg.n_experts_per_tok
        self.router = Linear(cfg.dim, cfg.n_experts, bias=False)
        self.register_buffer("router_bias", torch.zeros(cfg.n_experts))
        E, F_, D = cfg.n_experts, cfg.expert_dim, cfg.dim
        self.experts_gate = nn.Parameter(torch.empty(E, F_, D))  # [E,F,D]
        self.experts_up = nn.Parameter(torch.empty(E, F_, D))  # [E,F,D]
        self.experts_down = nn.Parameter(torch.empty(E, D, F_))  # [E,D,F]
        self.shared_experts = nn.ModuleList(
            [Expert(cfg.dim, cfg.shared_expert_dim) for _ in range(cfg.n_shared_experts)])

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flat [N,D] -> (topk_idx [N,K] int64, gates [N,K] in flat's dtype)."""
        logits = self.router(flat)
        scores = F.softmax(logits.float(), dim=-1)
        _, topk_idx = (logits.float() + self.router_bias.float()).topk(self.topk, dim=-1)
        chosen = scores.gather(-1, topk_idx)
        gates = chosen / chosen.sum(dim=-1, keepdim=True)
        return topk_idx, gates.to(flat.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        topk_idx, gates = self.route(flat)
        out = moe_experts(flat, topk_idx, gates, self.experts_gate, self.experts_up,
                          self.experts_down)
        for shared in self.shared_experts:
            out = out + shared(flat)
        return out.view(B, T, D)
