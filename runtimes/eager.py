"""The eager PyTorch backend: the reference every other backend is compared against."""

from __future__ import annotations

import numpy as np
import torch

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
    def _step(self, ids: np.ndarray) -> StepOutput:
        m = self.model
        x = torch.from_numpy(ids).to(m.embed.weight.device)
        if self.exit == ExitMode.NONE:
            out = m(x, cache=self.cache, n_loops=self.n_loops, act_threshold=self.act_threshold)
            return StepOutput(out.logits.float().cpu().numpy(), out.loops_used.cpu().numpy(),
                              out.halt_prob.cpu().numpy(), self.n_loops)
        return self._step_early_exit(x, propagate=self.exit == ExitMode.PROPAGATE)

    def _step_early_exit(self, x: torch.Tensor, propagate: bool) -> StepOutput:
        """The loop stops once every position of the call has halted. fill-forward: the
        remaining recurrent slots get the last computed latent. propagate: a halted position
        keeps its state from its halting loop on (so its later slots inside the call come from
        that state too), and the remaining slots get the latents loop t computes from it."""
        m, cache = self.model, self.cache
        start, T = cache.length, x.shape[1]
        m.check_inputs(x, start, self.n_loops, self.act_threshold)
        cache.check(x.shape[0], start, T, self.n_loops)
        views = {name: cache.view(name, start) for name in cache.buffers}
        e = h = m.run_prelude(x, start, views)
        state = ACTState.zeros(h)
        ran = 0
        for t in range(self.n_loops):
            h, state = m.run_step(t, h, e, state, self.act_threshold, start, views[f"recurrent_loop_{t}"],
                                  freeze=propagate)
            ran = t + 1
            if bool(state.halted.all()):
                break
        rest = list(range(ran, self.n_loops))
        if rest and propagate:
            rows = m.propagated_entries(h, e, start, rest)  # one batched projection
            for k, t in enumerate(rest):
                cache.buffers[f"recurrent_loop_{t}"][:, start:start + T] = rows[k]
        elif rest:  # fill-forward: later slots get the last latent
            last = cache.buffers[f"recurrent_loop_{ran - 1}"][:, start:start + T]
            for t in rest:
                cache.buffers[f"recurrent_loop_{t}"][:, start:start + T] = last
        logits = m.run_coda(state.h_out, start, views)
        cache.advance(start, T)
        return StepOutput(logits.float().cpu().numpy(), state.loops_used.cpu().numpy(),
                          state.cum.cpu().numpy(), ran)

    def cache_nbytes(self) -> int:
        return self.cache.nbytes()


class EagerBackend(Backend):
    name = "eager"
    propagate = True

    def __init__(self, model: MythosModel):
        self.model = model.eval()
        self.cfg = model.cfg
        self.default_loops = model.cfg.max_loop_iters

    def _start(self, batch, budget, decode) -> Session:
        return EagerSession(self.model, batch, budget, decode)
