"""The eager PyTorch backend: the reference every other backend is compared against."""

from __future__ import annotations

import numpy as np
import torch

from mythos_deploy.cache import ConcatView
from mythos_deploy.model import ACTState, MythosModel
from mythos_deploy.options import ExitMode
from mythos_deploy.runtimes.base import Backend, Session, StepOutput


class EagerSession(Session):
    backend_name = "eager"

    def __init__(self, model: MythosModel, batch, budget, decode):
        super().__init__(model.cfg, batch, budget, decode)
        self.model = model
        self.cache = model.new_cache(batch, budget, self.n_loops)

    @torch.no_grad()
    def _step(self, ids: np.ndarray, rows: np.ndarray, starts: np.ndarray, last_only: bool = False) -> StepOutput:
        """exit none runs every loop. Otherwise the loop stops once every position of the call
        has halted. fill-forward: the remaining recurrent slots get the last computed latent.
        propagate: a halted position keeps its state from its halting loop on (so its later
        slots inside the call come from that state too), and the remaining slots get the
        latents loop t computes from it.

        Lockstep calls (every row, one length) write into the cache buffers in place. A call on
        some rows, or on rows at different lengths, runs the export's form: each slot's past
        (those rows, up to the longest) with per-row positions, then its new rows are written
        at each row's own positions."""
        m, cache = self.model, self.cache
        dev = m.embed.weight.device
        x = torch.from_numpy(ids).to(dev)
        T = x.shape[1]
        lockstep = rows.size == self.batch and (starts == starts[0]).all()
        if lockstep:
            start_pos, past = int(starts[0]), None
            cache.length = start_pos
            views = {name: cache.view(name, start_pos) for name in cache.buffers}
        else:
            upto = int(starts.max())
            idx = torch.from_numpy(rows).to(dev)
            start_pos, past = torch.from_numpy(starts).to(dev), upto
            views = {name: ConcatView(buf[:, :upto].index_select(0, idx)) for name, buf in cache.buffers.items()}
        propagate = self.exit == ExitMode.PROPAGATE
        e = h = m.run_prelude(x, start_pos, views, past)
        state = ACTState.zeros(h)
        ran = 0
        for t in range(self.n_loops):
            h, state = m.run_step(t, h, e, state, self.act_threshold, start_pos, views[f"recurrent_loop_{t}"], past,
                                  freeze=propagate)
            ran = t + 1
            if self.exit != ExitMode.NONE and bool(state.halted.all()):
                break
        logits = m.run_coda(state.h_out, start_pos, views, past)
        rest = list(range(ran, self.n_loops))
        if lockstep:
            new = {name: cache.buffers[name][:, start_pos:start_pos + T] for name in cache.buffers}
        else:
            new = {name: v.new for name, v in views.items() if v.new is not None}
        if rest and propagate:  # one batched projection of the frozen state
            filled = m.propagated_entries(h, e, start_pos, rest)
            new.update({f"recurrent_loop_{t}": filled[k] for k, t in enumerate(rest)})
        elif rest:  # fill-forward: later slots get the last latent
            new.update({f"recurrent_loop_{t}": new[f"recurrent_loop_{ran - 1}"] for t in rest})
        if lockstep:
            for t in rest:
                cache.buffers[f"recurrent_loop_{t}"][:, start_pos:start_pos + T] = new[f"recurrent_loop_{t}"]
            cache.advance(start_pos, T)
        else:
            b = idx[:, None]
            p = torch.from_numpy(starts[:, None] + np.arange(T)).to(dev)
            for name, buf in cache.buffers.items():
                buf[b, p] = new[name]
        return StepOutput(logits.float().cpu().numpy(), state.loops_used.cpu().numpy(),
                          state.cum.cpu().numpy(), ran)

    def cache_nbytes(self) -> int:
        return self.cache.nbytes()

    def commit_memory(self) -> None:
        for b in self.cache.buffers.values():
            b.fill_(0)


class EagerBackend(Backend):
    name = "eager"
    propagate = True

    def __init__(self, model: MythosModel):
        self.model = model.eval()
        self.cfg = model.cfg
        self.default_loops = model.cfg.max_loop_iters
        self.cache_itemsize = model.embed.weight.element_size()

    def _start(self, batch, budget, decode) -> Session:
        return EagerSession(self.model, batch, budget, decode)
