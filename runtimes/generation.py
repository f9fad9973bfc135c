"""The shared generation loop over any backend: prefill, then one token per decode step into
the session's preallocated cache. The eager backend's tokens are the reference."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from mythos_deploy.errors import InputError
from mythos_deploy.model import MythosModel
from mythos_deploy.options import DecodeOptions
from mythos_deploy.runtimes.base import Backend, check_ids
from mythos_deploy.runtimes.sampling import SamplingParams, sample


@dataclass
class TokenEvent:
    step: int
    tokens: list[int]  # one per batch row
    loops_used: list[int]  # recurrent loops the new token's position ran before halting
    halt_prob: list[float]
    loops_run: int  # loops computed by the call (fewer than n_loops after a fill-forward exit)
    seconds: float
    finished: list[bool]
    logits: np.ndarray | None = None  # [B,V] last-position logits, when requested


@dataclass
class GenerationResult:
    prompt: list[list[int]]
    tokens: list[list[int]]  # generated ids per row (stop token included, nothing after it)
    loops_used: list[list[int]]
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)
    stop_reason: str = "max_new_tokens"
    loops_run: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "tokens": self.tokens, "loops_used": self.loops_used,
                "loops_run": self.loops_run, "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds, "stop_reason": self.stop_reason}


def _as_backend(model_or_backend) -> Backend:
    if isinstance(model_or_backend, MythosModel):
        from mythos_deploy.runtimes.eager import EagerBackend
        return EagerBackend(model_or_backend)
    if isinstance(model_or_backend, Backend):
        return model_or_backend
    raise InputError(f"expected a Backend or MythosModel, got {type(model_or_backend).__name__}")


def _as_batch(prompt) -> np.ndarray:
    if isinstance(prompt, torch.Tensor):
        return prompt.cpu().numpy()
    if isinstance(prompt, np.ndarray):
        return prompt
    rows = [list(prompt)] if prompt and not isinstance(prompt[0], (list, tuple)) else [list(r) for r in prompt]
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("the prompt is empty: give at least one token id")
    if len({len(r) for r in rows}) > 1:
        raise InputError("prompts in a batch must have equal lengths (padding is not supported)")
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for r in rows for t in r):
        raise InputError("token ids must be integers")
    return np.array(rows, dtype=np.int64)


def stream_generate(model, prompt, max_new_tokens: int = 32, *, sampling: SamplingParams = SamplingParams(),
                    stop_tokens: Sequence[int] = (), decode: DecodeOptions = DecodeOptions(),
                    max_length: int | None = None, return_logits: bool = False) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated position. Step 0 is the prefill."""
    backend = _as_backend(model)
    cfg = backend.cfg
    ids = check_ids(_as_batch(prompt), cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = cfg.max_seq_len if max_length is None else max_length
    if not 1 <= limit <= cfg.max_seq_len:
        raise InputError(f"max_length must be in [1, max_seq_len={cfg.max_seq_len}], got {limit}")
    B, T = ids.shape
    if T >= limit:
        raise InputError(f"prompt of {T} tokens leaves no room under the length limit {limit} "
                         f"(max_seq_len {cfg.max_seq_len})")
    budget = min(limit, T + max_new_tokens)
    session = backend.start(B, budget, decode)
    gen = torch.Generator().manual_seed(sampling.seed)
    stops = set(int(s) for s in stop_tokens)
    finished = [False] * B
    seen = torch.from_numpy(ids)
    step_in = ids
    for step in range(budget - T):
        t0 = time.perf_counter()
        out = session.step(step_in)
        last = torch.from_numpy(np.ascontiguousarray(out.logits[:, -1]))
        nxt = sample(last, sampling, gen, seen if sampling.repetition_penalty != 1.0 else None)
        dt = time.perf_counter() - t0
        tokens = nxt.tolist()
        done_before = list(finished)
        for b, tok in enumerate(tokens):
            if not finished[b] and tok in stops:
                finished[b] = True
        yield TokenEvent(step, tokens, out.loops_used[:, -1].tolist(), out.halt_prob[:, -1].tolist(),
                         out.loops_run, dt, [f or d for f, d in zip(finished, done_before)],
                         out.logits[:, -1].copy() if return_logits else None)
        if all(finished):
            return
        step_in = nxt.numpy()[:, None]
        seen = torch.cat([seen, nxt[:, None]], dim=1)


def generate(model, prompt, max_new_tokens: int = 32, *, sampling: SamplingParams = SamplingParams(),
             stop_tokens: Sequence[int] = (), decode: DecodeOptions = DecodeOptions(),
             max_length: int | None = None, on_event: Callable[[TokenEvent], None] | None = None) -> GenerationResult:
    """Run stream_generate to the end and collect the result; `on_event` sees each TokenEvent
    as it arrives (the CLI streams text with it)."""
    ids = _as_batch(prompt)
    B = ids.shape[0] if ids.ndim == 2 else 1
    result = GenerationResult(np.atleast_2d(ids).tolist(), [[] for _ in range(B)], [[] for _ in range(B)])
    done = [False] * B
    stops = set(int(s) for s in stop_tokens)
    n_events = 0
    for ev in stream_generate(model, ids, max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
                              decode=decode, max_length=max_length):
        n_events += 1
        if on_event is not None:
            on_event(ev)
        if ev.step == 0:
            result.prefill_seconds = ev.seconds
        else:
            result.decode_seconds.append(ev.seconds)
        result.loops_run.append(ev.loops_run)
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
