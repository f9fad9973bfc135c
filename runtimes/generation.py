"""The reference generation loop (eager torch): prefill, then one token per decode step into
the preallocated latent cache. Later backends are compared against these tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from mythos_deploy.errors import InputError
from mythos_deploy.model import MythosModel
from runtimes.sampling import SamplingParams, sample


@dataclass
class TokenEvent:
    step: int
    tokens: list[int]  # one per batch row
    loops_used: list[int]  # recurrent loops the new token's position ran
    halt_prob: list[float]
    seconds: float
    finished: list[bool]


@dataclass
class GenerationResult:
    prompt: list[list[int]]
    tokens: list[list[int]]  # generated ids per row (stop token included, nothing after it)
    loops_used: list[list[int]]
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)
    stop_reason: str = "max_new_tokens"

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "tokens": self.tokens, "loops_used": self.loops_used,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "stop_reason": self.stop_reason}


def _as_batch(prompt) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
    else:
        rows = [list(prompt)] if prompt and not isinstance(prompt[0], (list, tuple)) else [list(r) for r in prompt]
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("the prompt is empty: give at least one token id")
        if len({len(r) for r in rows}) > 1:
            raise InputError("prompts in a batch must have equal lengths (padding is not supported)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for r in rows for t in r):
            raise InputError("token ids must be integers")
        ids = torch.tensor(rows, dtype=torch.int64)
    if ids.numel() == 0:
        raise InputError("the prompt is empty: give at least one token id")
    return ids


@torch.no_grad()
def stream_generate(model: MythosModel, prompt: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
                    max_new_tokens: int = 32, sampling: SamplingParams = SamplingParams(),
                    stop_tokens: Sequence[int] = (), n_loops: int | None = None,
                    act_threshold: float | None = None, max_length: int | None = None) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated position. Step 0 is the prefill."""
    cfg = model.cfg
    ids = _as_batch(prompt).to(model.embed.weight.device)
    n_loops = cfg.max_loop_iters if n_loops is None else n_loops
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = cfg.max_seq_len if max_length is None else max_length
    if not 1 <= limit <= cfg.max_seq_len:
        raise InputError(f"max_length must be in [1, max_seq_len={cfg.max_seq_len}], got {limit}")
    B, T = ids.shape
    if T >= limit:
        raise InputError(f"prompt of {T} tokens leaves no room under the length limit {limit}")
    budget = min(limit, T + max_new_tokens)
    cache = model.new_cache(B, budget, n_loops)
    gen = torch.Generator().manual_seed(sampling.seed)
    stops = set(int(s) for s in stop_tokens)
    finished = [False] * B
    step_in = ids
    for step in range(budget - T):
        t0 = time.perf_counter()
        out = model(step_in, cache=cache, n_loops=n_loops, act_threshold=act_threshold)
        nxt = sample(out.logits[:, -1], sampling, gen)  # [B]
        tokens = nxt.tolist()
        event_finished = list(finished)
        for b, tok in enumerate(tokens):
            if not finished[b] and tok in stops:
                finished[b] = True
        yield TokenEvent(step, tokens, out.loops_used[:, -1].tolist(), out.halt_prob[:, -1].tolist(),
                         time.perf_counter() - t0, [f or e for f, e in zip(finished, event_finished)])
        if all(finished):
            return
        step_in = nxt.unsqueeze(1)


def generate(model: MythosModel, prompt, max_new_tokens: int = 32,
             sampling: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
             n_loops: int | None = None, act_threshold: float | None = None,
             max_length: int | None = None) -> GenerationResult:
    ids = _as_batch(prompt)
    B = ids.shape[0]
    result = GenerationResult(ids.tolist(), [[] for _ in range(B)], [[] for _ in range(B)])
    done = [False] * B
    stops = set(int(s) for s in stop_tokens)
    n_events = 0
    for ev in stream_generate(model, ids, max_new_tokens, sampling, stop_tokens, n_loops,
                              act_threshold, max_length):
        n_events += 1
        if ev.step == 0:
            result.prefill_seconds = ev.seconds
        else:
            result.decode_seconds.append(ev.seconds)
        for b in range(B):
            if not done[b]:
                result.tokens[b].append(ev.tokens[b])
                result.loops_used[b].append(ev.loops_used[b])
                done[b] = ev.tokens[b] in stops
    if all(done):
        result.stop_reason = "stop_token"
    elif n_events < max_new_tokens:
        result.stop_reason = "max_length"
    return result
