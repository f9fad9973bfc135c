"""Train the demo checkpoint: the reference model on the multi-hop task (mythos_deploy.hops).

Reproducible (seeded data and init; bitwise on the same machine and thread count) and small:
a 0.29M-parameter model, 5000 steps, about 15 minutes on 2 CPU cores
(`mythos-export train-demo -o checkpoints/hops`). The loss is the cross-entropy of the answer
digits computed through the ACT-weighted output (what inference computes), plus an auxiliary
cross-entropy through the last loop's state (so deep loops are useful from the first step,
before halting has learned anything), plus a ponder cost: the expected number of loops,
sum_t running_t * (1 - cum_{t-1}), which is differentiable in the halting probabilities.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mythos_deploy import hops
from mythos_deploy.config import MythosConfig
from mythos_deploy.model import ACTState, MythosModel

DEMO_CONFIG = dict(
    vocab_size=128, dim=96, n_heads=4, n_kv_heads=2, max_seq_len=96, max_loop_iters=6,
    prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=32, q_lora_rank=64,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_experts=4, n_shared_experts=1,
    n_experts_per_tok=2, expert_dim=64, act_threshold=0.99, rope_theta=100.0, lora_rank=4,
    max_output_tokens=96,
)


@dataclass
class TrainOptions:
    steps: int = 5000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ponder: float = 0.01  # nats per expected loop
    aux: float = 0.5  # weight of the last-loop cross-entropy
    halt_bias: float = -2.0  # initial halting logit: p ~ 0.12, no halting before loop 6
    max_hops: int = 4
    promote_at: float = 0.9  # curriculum: next stage once training accuracy over 50 steps reaches this
    n_statements: int = 8
    n_queries: int = 4
    seed: int = 0
    threads: int = 2
    fan_in_init: bool = True  # std 1/sqrt(fan_in) for matrices instead of OpenMythos's 0.02
    embed_std: float = 1.0  # the tied embedding (0.02 in OpenMythos's init)


def stages(opts: TrainOptions, max_loops: int) -> list[tuple[int, int, int]]:
    """Curriculum (statements, hop limit, loops): associative recall over few statements and
    through 2 loops first (a small looped model sits on a plateau for thousands of steps if it
    starts on the full task at full depth), then more statements, then deeper chains with
    more loops, ending at max_loops. The ponder cost is on from the first full-size stage."""
    out = [(n, 1, 2) for n in (2, 3, 4, 6) if n < opts.n_statements]
    return out + [(opts.n_statements, h, min(max_loops, h + 2) if h < opts.max_hops else max_loops)
                  for h in range(1, opts.max_hops + 1)]


def make_batch(rng: random.Random, opts: TrainOptions, stage: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B,T], answer positions [B,Q] (index of the position whose next token is the
    answer), answers [B,Q]."""
    n_statements, max_hops = stage[:2]
    problems = [hops.training_problem(rng, n_statements, max_hops, opts.n_queries)
                for _ in range(opts.batch)]
    ids = torch.tensor([hops.encode(p.text) for p in problems])
    pos = torch.tensor([[i - 1 for i in p.answer_pos] for p in problems])
    ans = ids.gather(1, pos + 1)
    return ids, pos, ans


def forward_train(model: MythosModel, ids: torch.Tensor, n_loops: int):
    """Returns (logits through h_out, logits through the last loop's h, expected loops [B,T],
    loops_used [B,T])."""
    threshold = model.cfg.act_threshold
    e = h = model.run_prelude(ids, 0, {})
    state = ACTState.zeros(h)
    expected = torch.zeros_like(state.cum)
    for t in range(n_loops):
        running = (~state.halted).float()
        expected = expected + running * (1.0 - state.cum).clamp(min=0)
        h, state = model.run_step(t, h, e, state, threshold, 0, None)
    B = ids.shape[0]
    both = model.run_coda(torch.cat([state.h_out, h.float()]), 0, {})
    return both[:B], both[B:], expected, state.loops_used


def train_demo(opts: TrainOptions, log: Callable[[dict], None] | None = None) -> tuple[MythosModel, list[dict]]:
    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    rng = random.Random(opts.seed)
    cfg = MythosConfig(**DEMO_CONFIG)
    model = MythosModel(cfg).init_weights(opts.seed)
    with torch.no_grad():
        if opts.fan_in_init:
            # With OpenMythos's 0.02 everywhere this model stayed on the chance plateau for
            # 1000+ steps (measured); unit-variance matrices and an embedding of std 1 (so
            # Adam's steps do not swamp it) let associative recall form in ~600 steps.
            gen = torch.Generator().manual_seed(opts.seed + 1)
            for name, p in model.named_parameters():
                if p.dim() >= 2 and not name.startswith("embed") and "lora.scale" not in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            model.embed.weight.normal_(0.0, opts.embed_std, generator=gen)
        model.recurrent.act.halt.bias.fill_(opts.halt_bias)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=opts.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < opts.warmup:
            return opts.lr * (step + 1) / opts.warmup
        frac = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
        return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    history: list[dict] = []
    window: dict[str, float] = {}
    start = time.perf_counter()
    plan, level = stages(opts, cfg.max_loop_iters), 0
    for step in range(opts.steps):
        stage = plan[level]
        ids, pos, ans = make_batch(rng, opts, stage)
        logits, logits_last, expected, loops_used = forward_train(model, ids, stage[2])
        pick = pos.unsqueeze(-1).expand(-1, -1, cfg.vocab_size)
        lg = logits.gather(1, pick)
        ce = F.cross_entropy(lg.reshape(-1, cfg.vocab_size), ans.reshape(-1))
        ce_last = F.cross_entropy(logits_last.gather(1, pick).reshape(-1, cfg.vocab_size), ans.reshape(-1))
        ponder = expected.mean()
        loss = ce + opts.aux * ce_last + (opts.ponder if stage[0] == opts.n_statements else 0.0) * ponder
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        acc = (lg.argmax(-1) == ans).float().mean().item()
        for key, val in (("loss", loss.item()), ("ce", ce.item()), ("ce_last", ce_last.item()),
                         ("ponder", ponder.item()), ("acc", acc),
                         ("answer_loops", loops_used.gather(1, pos).float().mean().item())):
            window[key] = window.get(key, 0.0) + val
        if (step + 1) % 50 == 0 or step + 1 == opts.steps:
            n = 50 if (step + 1) % 50 == 0 else (step + 1) % 50
            row = {"step": step + 1, "seconds": round(time.perf_counter() - start, 1),
                   "statements": stage[0], "max_hops": stage[1], "loops": stage[2],
                   **{k: round(v / n, 4) for k, v in window.items()}}
            history.append(row)
            window.clear()
            if row["acc"] >= opts.promote_at and level + 1 < len(plan):
                level += 1
            if log:
                log(row)
    model.eval()
    return model, history
