"""Run an exported ONNX artifact (any loop mode) with onnxruntime through one call shape.

`OnnxModelRunner.forward(...)` takes the model-contract inputs (input_ids, past_len, the
cache pasts, n_loops, act_threshold) and returns the model-contract outputs, whether the
artifact is one `unroll`/`loop` graph or the `stepped` trio driven here, loop by loop.
This is the low-level engine call; cache buffers and generation live above it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mythos_deploy.contract import per_row_positions
from mythos_deploy.manifest import Manifest
from mythos_deploy.options import QuantMode, env_int

from mythos_deploy.errors import CheckpointError, InputError, MissingDependencyError


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime "
                                     "(or the [gpu] extra for onnxruntime-gpu)") from None
    return onnxruntime


def make_session(model: Any, providers: list[str] | None = None, threads: int = 0, basic_only: bool = False):
    """An InferenceSession from a ModelProto or a file path. `basic_only` limits graph
    optimizations to ORT_ENABLE_BASIC (fp8 Q/DQ graphs: see exporters/qdq.py ort_copy)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if basic_only:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # MYTHOS_ORT_THREADS: the default thread count where the caller names none (0: every core)
    threads = threads or env_int("MYTHOS_ORT_THREADS", 0, "threads")
    if threads:
        opts.intra_op_num_threads = threads
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        raise CheckpointError(f"onnxruntime cannot load the graph: {first}") from None


def carries_propagate(loop_mode: str, graphs, model_inputs) -> bool:
    """Whether an artifact runs exit=propagate: a `loop` graph with the `propagate` input (the
    freeze and the fill inside the graph), or `stepped` graphs with the fill graph; exports
    made before it have neither. `graphs`: the graph names; `model_inputs`: the `loop` graph's."""
    if loop_mode == "stepped":
        return "fill" in graphs
    return loop_mode == "loop" and "propagate" in model_inputs


class OnnxModelRunner:
    """Sessions for one artifact's graphs. `graphs` maps graph name -> ModelProto or path."""

    def __init__(self, graphs: dict[str, Any], loop_mode: str, n_loops: int, providers: list[str] | None = None,
                 threads: int = 0, basic_only: bool = False):
        self.loop_mode, self.n_loops = loop_mode, n_loops
        self.sessions = {name: make_session(g, providers, threads, basic_only) for name, g in graphs.items()}
        self.output_names = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        lens = [i.shape for s in self.sessions.values() for i in s.get_inputs() if i.name == "past_len"]
        self.per_row = all(per_row_positions(shape) for shape in lens)

    @property
    def supports_propagate(self) -> bool:
        model = self.sessions.get("model")
        return carries_propagate(self.loop_mode, self.sessions, [i.name for i in model.get_inputs()] if model else ())

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[name]
        wanted = {i.name for i in sess.get_inputs()}
        outs = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(self.output_names[name], outs))

    def forward(self, input_ids: np.ndarray, past_len, pasts: dict[str, np.ndarray],
                n_loops: int | None = None, act_threshold: float = 0.99,
                early_exit: bool = False, propagate: bool = False, logits_from: int = 0) -> dict[str, np.ndarray]:
        """`propagate` (exit=propagate, with early_exit): `loop` graphs that take it freeze
        halted positions and fill every recurrent row; check `supports_propagate` first.
        `logits_from`: graphs that take it return logits for positions [logits_from, T) only
        (others return all of them)."""
        n_loops = self.n_loops if n_loops is None else n_loops
        if self.loop_mode == "unroll" and n_loops != self.n_loops:
            raise InputError(f"this export is unrolled for n_loops={self.n_loops}; re-export with "
                             f"--loops {n_loops} or use a --loop loop/stepped export to vary depth")
        rows = getattr(pasts.get("past_recurrent"), "shape", (n_loops,))[0]
        if rows != n_loops:  # every loop reads its own row; onnxruntime would fail deep inside the Loop
            raise InputError(f"past_recurrent has {rows} loop rows but n_loops={n_loops}; pass one row per loop")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if not 0 <= logits_from < input_ids.shape[1]:
            raise InputError(f"logits_from must be in [0, {input_ids.shape[1]}), got {logits_from}")
        base = {"input_ids": input_ids, "past_len": past_len_feed(past_len, input_ids.shape[0], self.per_row),
                "logits_from": np.array(logits_from, np.int64),
                "act_threshold": np.array(act_threshold, dtype=np.float32), **pasts}
        if self.loop_mode in ("unroll", "loop"):
            if self.loop_mode == "loop":
                base["n_loops"] = np.array(n_loops, dtype=np.int64)
                base["early_exit"] = np.array(early_exit)
                base["propagate"] = np.array(propagate)
            out = self._run("model", base)
            out.setdefault("loops_run", np.array(n_loops))
            return out
        return drive_stepped(self._run, base, n_loops, early_exit, NUMPY_OPS, propagate)


def past_len_feed(past_len, batch: int, per_row: bool) -> np.ndarray:
    """`past_len` (an int, or one length per row) as a graph takes it: int64 [batch] where the
    graph has per-row positions, a scalar for exports made before them, which can run only
    rows at one common length."""
    lens = np.asarray(past_len, dtype=np.int64)
    if lens.ndim == 0:
        lens = np.full((batch,), int(lens), np.int64)
    if lens.shape != (batch,):
        raise InputError(f"past_len must be one int or one length per row ({batch}), got shape {lens.shape}")
    if per_row:
        return lens
    if (lens != lens[0]).any():
        raise InputError("this artifact was exported before per-row positions: its rows must all be at one "
                         f"cached length (got {sorted(set(lens.tolist()))}); re-export it with this version "
                         "(mythos-export onnx CKPT -o DIR) to batch requests of different lengths")
    return np.array(lens[0], np.int64)


NUMPY_OPS = SimpleNamespace(zeros=lambda shape, dtype: np.zeros(shape, dtype), index=lambda t: np.array(t, np.int64),
                            stack=np.stack, float32=np.float32, bool=np.bool_, int32=np.int32,
                            arange=lambda a, b: np.arange(a, b, dtype=np.int64),
                            where_rows=lambda rows, a, b: np.where(rows[..., None], a, b))


def drive_stepped(run, base: dict, n_loops: int, early_exit: bool, ops, propagate: bool = False) -> dict:
    """The `stepped` graphs driven loop by loop: prelude, one step call per loop carrying the
    ACT state (stopping early once every position halted, with `early_exit`), coda. `run(name,
    feeds)` runs one graph (extra feeds ignored); `ops` makes arrays of the caller's kind
    (NUMPY_OPS here; torch tensors for the TensorRT backend). Returns the model-contract
    outputs; recurrent rows past `loops_run` are zeros, like the loop graph's, unless
    `propagate` (exit=propagate, with early_exit): then a position halted before a loop keeps
    its state, and the fill graph computes the rows past `loops_run` from the final state."""
    pre = run("prelude", base)
    e = pre["e"]
    B, T = e.shape[:2]
    state = {"h": e, "e": e, "h_out": ops.zeros(tuple(e.shape), ops.float32), "cum": ops.zeros((B, T), ops.float32),
             "halted": ops.zeros((B, T), ops.bool), "loops_used": ops.zeros((B, T), ops.int32)}
    past_rec = base["past_recurrent"]
    news = []
    for t in range(n_loops):
        out = run("step", {**state, "loop_index": ops.index(t), "act_threshold": base["act_threshold"],
                           "past_len": base["past_len"], "past_recurrent": past_rec[t]})
        h_next = ops.where_rows(state["halted"], state["h"], out["h_next"]) if propagate else out["h_next"]
        state.update(h=h_next, h_out=out["h_out_next"], cum=out["cum_next"],
                     halted=out["halted_next"], loops_used=out["loops_used_next"])
        news.append(out["new_recurrent"])
        if early_exit and bool(state["halted"].all()):
            break
    coda = run("coda", {**base, "h_out": state["h_out"]})
    ran = len(news)
    if propagate and ran < n_loops:  # one batched projection of the frozen state
        rows = run("fill", {"h": state["h"], "e": e, "loop_indices": ops.arange(ran, n_loops),
                            "past_len": base["past_len"]})["rows"]
        news += [rows[i] for i in range(n_loops - ran)]
    news += [ops.zeros(tuple(news[0].shape), news[0].dtype)] * (n_loops - len(news))
    result = {"logits": coda["logits"], "new_recurrent": ops.stack(news), "loops_run": np.array(ran),
              "loops_used": state["loops_used"], "halt_prob": state["cum"]}
    result.update({k: v for k, v in pre.items() if k.startswith("new_")})
    result.update({k: v for k, v in coda.items() if k.startswith("new_")})
    return result


def graph_files(loop_mode: str) -> dict[str, str]:
    """The graphs an export of this loop mode writes."""
    if loop_mode == "stepped":  # fill: exit=propagate's cache rows from a frozen state
        return {"prelude": "prelude.onnx", "step": "step.onnx", "coda": "coda.onnx", "fill": "fill.onnx"}
    return {"model": "model.onnx"}


def artifact_files(manifest: Manifest) -> dict[str, str]:
    """Graph name -> file name of an ONNX artifact, as its manifest lists them (stepped
    exports made before the fill graph have three)."""
    listed = manifest.get("graphs")
    return dict(listed) if isinstance(listed, dict) and listed else graph_files(manifest.options.loop)


def artifact_graphs(path: str | Path, manifest: Manifest) -> dict[str, Path]:
    """Graph name -> file of an ONNX artifact, each checked for external-data locations that
    escape the directory. Always checked, even without manifest verification: hashes do not
    stop a hostile author."""
    from mythos_deploy.safety import check_external_data
    paths = {name: Path(path) / f for name, f in artifact_files(manifest).items()}
    for p in paths.values():
        check_external_data(p, path)
    return paths


def open_onnx_artifact(path: str | Path, command: str) -> tuple[Manifest, dict[str, Path]]:
    """The manifest and graph files of the ONNX artifact a command (`quantize`, `build`) reads:
    the directory exists, is an ONNX export of this version, and every file matches its sha256."""
    from mythos_deploy.manifest import check_manifest_version, verify_files
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"ONNX artifact directory not found: {path}")
    manifest = Manifest.read(path)
    if manifest.kind != "onnx":
        raise InputError(f"{path} is a {manifest.kind!r} artifact; {command} takes an ONNX export "
                         "(mythos-export onnx CKPT -o DIR)")
    check_manifest_version(manifest, path)
    verify_files(path, manifest)
    return manifest, artifact_graphs(path, manifest)


def runner_from_dir(path: str | Path, manifest: Manifest, providers: list[str] | None = None,
                    threads: int = 0) -> OnnxModelRunner:
    graphs = artifact_graphs(path, manifest)
    return OnnxModelRunner(graphs, manifest.options.loop, manifest.options.loops, providers, threads,
                           basic_only=manifest.quant_mode == QuantMode.FP8)
