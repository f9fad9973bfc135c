"""The TensorRT backend: engines from `mythos-export build`, driven like the other backends.

- Engines are deserialized with the MythosMoE plugin registered (runtimes/trt_plugin.py).
- Every I/O tensor is a torch CUDA tensor; the cache slots are preallocated per session
  ([batch, budget, W], recurrent [n_loops, batch, budget, W]) and passed whole with
  `past_len`, one length per row (the graphs ignore rows at or past a row's own length), so
  nothing is concatenated per token; the graphs' new rows are copied into place at
  [past_len[b], past_len[b] + T). A call on some rows passes just those rows.
- One CUDA stream per backend. The optimization profile is picked per call: `decode` for
  one-token calls, `prefill` otherwise (the profiles the build wrote into the manifest).
- `cuda_graph=True` captures the single-graph engine's decode call (T = 1) once per session
  and replays it: the token id and past_len are written into the captured input tensors.

Written against TensorRT 10's documented Python API (IRuntime, ICudaEngine,
IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3). TensorRT cannot
be installed where this project's CI runs: the tests drive this backend on CPU through a
stand-in runtime (tests/runtimes/trt_runtime_standin.py) that implements that execution
contract with onnxruntime on the same graphs (`device="cpu"`, `modules=`); `make gpu-check`
runs the real thing where TensorRT exists.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mythos_deploy.errors import CheckpointError, InputError, InternalError
from mythos_deploy.manifest import Manifest
from mythos_deploy.options import ExitMode, ExportDtype, MoeLowering
from mythos_deploy.runtimes.base import Backend, Session, StepOutput, gather_pasts, write_new_rows
from mythos_deploy.contract import contracts_per_row
from mythos_deploy.runtimes.onnx_runner import carries_propagate, drive_stepped, past_len_feed


def _torch_dtype(trt, torch, dt):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    if dt not in table:
        raise InternalError(f"engine I/O type {dt} has no torch equivalent")
    return table[dt]


class TrtEngine:
    """One engine and its execution context; `run` binds torch tensors and launches."""

    def __init__(self, trt, runtime, path: Path, profile_names: list[str], device: str = "cuda"):
        import torch
        self.trt, self.torch, self.device = trt, torch, device
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(f"TensorRT cannot deserialize {path} (built by another TensorRT version or GPU?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.host_inputs = {n for n in self.inputs if engine.is_shape_inference_io(n)}
        self.profile_names = profile_names
        self.profile = -1

    def pick_profile(self, seq: int) -> int:
        name = "decode" if seq == 1 and "decode" in self.profile_names else "prefill"
        return self.profile_names.index(name) if name in self.profile_names else 0

    def run(self, feeds: dict, stream, seq: int, out: dict | None = None) -> dict:
        torch, ctx = self.torch, self.context
        profile = self.pick_profile(seq)
        if profile != self.profile:
            ctx.set_optimization_profile_async(profile, stream.cuda_stream)
            self.profile = profile
        for name in self.inputs:
            t = feeds[name]
            t = t.cpu() if name in self.host_inputs else t
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
            feeds[name] = t  # keep alive until the launch completes
        result = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            dt = _torch_dtype(self.trt, torch, self.engine.get_tensor_dtype(name))
            t = out[name] if out is not None and name in out else torch.empty(shape, dtype=dt, device=self.device)
            ctx.set_tensor_address(name, t.data_ptr())
            result[name] = t
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise InternalError("TensorRT execute_async_v3 failed (its log says why)")
        return result


class TrtSession(Session):
    backend_name = "tensorrt"

    def __init__(self, backend: "TensorRTBackend", batch, budget, decode):
        super().__init__(backend.cfg, batch, budget, decode)
        torch = backend.torch
        self.b = backend
        cfg, W, dt = backend.cfg, backend.cfg.cache_width, backend.cache_dtype
        mk = lambda *shape: torch.zeros(shape, dtype=dt, device=backend.device)  # noqa: E731
        self.buffers = {f"past_prelude_{i}": mk(batch, budget, W) for i in range(cfg.prelude_layers)}
        self.buffers["past_recurrent"] = mk(self.n_loops, batch, budget, W)
        self.buffers.update({f"past_coda_{i}": mk(batch, budget, W) for i in range(cfg.coda_layers)})
        self.graph = None  # captured decode call
        self.per_row_positions = backend.per_row

    def _scalars(self, starts: np.ndarray) -> dict:
        torch, dev = self.b.torch, self.b.device
        lens = past_len_feed(starts, starts.size, self.per_row_positions)
        return {"past_len": torch.from_numpy(np.ascontiguousarray(lens)).to(dev),
                "act_threshold": torch.tensor(self.act_threshold, dtype=torch.float32, device=dev),
                "n_loops": torch.tensor(self.n_loops, dtype=torch.int64, device=dev),
                "early_exit": torch.tensor(self.exit != ExitMode.NONE, device=dev),
                "propagate": torch.tensor(self.exit == ExitMode.PROPAGATE, device=dev)}

    def _forward(self, ids, rows: np.ndarray, starts: np.ndarray) -> dict:
        b, torch, dev = self.b, self.b.torch, self.b.device
        x = torch.from_numpy(np.ascontiguousarray(ids)).to(dev)  # TensorRT reads raw memory: no strided views
        T = ids.shape[1]
        pasts = gather_pasts(self.buffers, rows, int(starts.max()), lambda t: t.contiguous(), self._index)
        if b.loop_mode != "stepped":
            if (T == 1 and b.cuda_graph and b.loop_mode == "unroll" and dev == "cuda"
                    and rows.size == self.batch):
                return self._decode_graph(x, starts)
            return b.engines["model"].run({"input_ids": x, **self._scalars(starts), **pasts}, b.stream, T)
        return drive_stepped(lambda name, feeds: b.engines[name].run(feeds, b.stream, T),
                             {"input_ids": x, **self._scalars(starts), **pasts}, self.n_loops,
                             self.exit != ExitMode.NONE, b.ops, self.exit == ExitMode.PROPAGATE)

    def _index(self, a: np.ndarray):
        return self.b.torch.from_numpy(np.ascontiguousarray(a)).to(self.b.device)

    def _decode_graph(self, x, starts: np.ndarray) -> dict:
        """Capture the engine's one-token call on every row once, then replay it with new
        inputs (the token ids and each row's past_len)."""
        b, torch = self.b, self.b.torch
        scalars = self._scalars(starts)
        if self.graph is None:
            self.static = {"input_ids": x.clone(), **scalars, **self.buffers}
            eng = b.engines["model"]
            self.static_out = eng.run(dict(self.static), b.stream, 1)  # warm-up; allocates outputs
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=b.stream):
                eng.run(dict(self.static), b.stream, 1, out=self.static_out)
            self.graph = graph
        self.static["input_ids"].copy_(x)
        self.static["past_len"].copy_(scalars["past_len"])
        self.graph.replay()
        return self.static_out

    def _step(self, ids: np.ndarray, rows: np.ndarray, starts: np.ndarray, last_only: bool = False) -> StepOutput:
        b = self.b
        with b.stream_context():
            out = self._forward(ids, rows, starts)
            ran = int(out.get("loops_run", self.n_loops))
            write_new_rows(self.buffers, out, rows, starts, self.exit, self._index)
        b.stream.synchronize()
        return StepOutput(out["logits"].float().cpu().numpy(), out["loops_used"].cpu().numpy(),
                          out["halt_prob"].float().cpu().numpy(), ran)

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def commit_memory(self) -> None:
        pass  # device memory from torch.zeros is committed already


class _HostStream:
    """What the CPU stand-in runs on: no stream."""
    cuda_stream = 0

    def synchronize(self) -> None:
        pass


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path: str | Path, manifest: Manifest, cuda_graph: bool = False, device: str = "cuda",
                 modules: tuple | None = None):
        """`modules` = (tensorrt, tensorrt.plugin) stand-ins, with device="cpu", for tests."""
        from mythos_deploy.runtimes.trt_plugin import import_tensorrt, register
        trt, trtp = modules or import_tensorrt()
        import torch
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("the TensorRT backend needs a CUDA GPU; none is visible")
        self.trt, self.torch, self.device = trt, torch, device
        opts = self._read_manifest(path, manifest)
        self.cache_dtype = torch.float16 if opts.dtype == ExportDtype.FP16 else torch.float32
        self.cache_itemsize = 2 if opts.dtype == ExportDtype.FP16 else 4
        self.cuda_graph = cuda_graph
        if opts.moe == MoeLowering.PLUGIN:
            register(trtp, trt, mode=manifest.get("build", {}).get("plugin", "aot"))
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream() if device == "cuda" else _HostStream()
        self.ops = SimpleNamespace(  # arrays for the stepped driver: torch tensors on this device
            zeros=lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device),
            index=lambda t: torch.tensor(t, dtype=torch.int64, device=device), stack=torch.stack,
            float32=torch.float32, bool=torch.bool, int32=torch.int32,
            arange=lambda a, b: torch.arange(a, b, dtype=torch.int64, device=device),
            where_rows=lambda rows, a, b: torch.where(rows.unsqueeze(-1), a, b))
        self.engines = {name: TrtEngine(trt, runtime, self.path / f, list(manifest.data["profiles"][name]), device)
                        for name, f in manifest.data["engines"].items()}
        self.name = f"tensorrt[{self.loop_mode},{manifest.get('build', {}).get('precision', '?')}]"
        self.per_row = contracts_per_row(manifest.data["contract"])
        self.propagate = carries_propagate(self.loop_mode, self.engines,
                                           self.engines["model"].inputs if "model" in self.engines else ())

    def stream_context(self):
        return self.torch.cuda.stream(self.stream) if self.device == "cuda" else contextlib.nullcontext()

    def _start(self, batch, budget, decode) -> Session:
        return TrtSession(self, batch, budget, decode)
