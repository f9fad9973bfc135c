"""The onnxruntime backend: an exported artifact, cache buffers preallocated per session.

A call on every row passes the whole preallocated buffer of each slot with `past_len`, one
length per row (the graph ignores rows at or past a row's own length), so nothing is copied
or concatenated per token; the graph returns only the new rows, which are written in place
at [past_len[b], past_len[b] + T). A call on some of the rows (continuous batching) passes
those rows' buffers: views where they are contiguous, else a copy up to the longest row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mythos_deploy.manifest import Manifest
from mythos_deploy.options import ExitMode, ExportDtype
from mythos_deploy.runtimes.base import Backend, Session, StepOutput, gather_pasts, write_new_rows
from mythos_deploy.runtimes.onnx_runner import OnnxModelRunner, runner_from_dir


class OrtSession(Session):
    backend_name = "onnxruntime"

    def __init__(self, backend: "OrtBackend", batch, budget, decode):
        super().__init__(backend.cfg, batch, budget, decode)
        self.runner: OnnxModelRunner = backend.runner
        cfg, W, dt = backend.cfg, backend.cfg.cache_width, backend.np_dtype
        self.buffers = {f"past_prelude_{i}": np.zeros((batch, budget, W), dt) for i in range(cfg.prelude_layers)}
        self.buffers["past_recurrent"] = np.zeros((self.n_loops, batch, budget, W), dt)
        self.buffers.update({f"past_coda_{i}": np.zeros((batch, budget, W), dt) for i in range(cfg.coda_layers)})
        self.per_row_positions = self.runner.per_row

    def _step(self, ids: np.ndarray, rows: np.ndarray, starts: np.ndarray, last_only: bool = False) -> StepOutput:
        pasts = gather_pasts(self.buffers, rows, int(starts.max()), np.ascontiguousarray)
        out = self.runner.forward(ids, starts, pasts, self.n_loops, self.act_threshold,
                                  early_exit=self.exit != ExitMode.NONE, propagate=self.exit == ExitMode.PROPAGATE,
                                  logits_from=ids.shape[1] - 1 if last_only else 0)
        write_new_rows(self.buffers, out, rows, starts, self.exit)
        return StepOutput(out["logits"].astype(np.float32, copy=False), out["loops_used"],
                          out["halt_prob"], int(out["loops_run"]))

    def cache_nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def commit_memory(self) -> None:
        for b in self.buffers.values():
            b.fill(0)


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str | Path, manifest: Manifest, providers: list[str] | None = None, threads: int = 0):
        opts = self._read_manifest(path, manifest)
        self.np_dtype = np.float16 if opts.dtype == ExportDtype.FP16 else np.float32
        self.cache_itemsize = np.dtype(self.np_dtype).itemsize
        self.runner = runner_from_dir(path, manifest, providers, threads)
        self.propagate = self.runner.supports_propagate
        self.name = f"onnxruntime[{self.loop_mode},{opts.moe},{opts.dtype}]"

    def _start(self, batch, budget, decode) -> Session:
        return OrtSession(self, batch, budget, decode)
