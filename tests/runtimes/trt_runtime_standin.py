"""A stand-in for TensorRT's runtime (IRuntime / ICudaEngine / IExecutionContext) that keeps
its execution contract and computes with onnxruntime, on CPU memory: an "engine" file holds
an ONNX graph; inputs are read from the addresses given to set_tensor_address with the shapes
given to set_input_shape; get_tensor_shape of an output runs the graph (TensorRT infers output
shapes from input shapes); execute_async_v3 writes the outputs to their bound addresses.
It lets runtimes/tensorrt_backend.py run its real code paths here. It checks nothing about
TensorRT itself."""

from __future__ import annotations

import ctypes
import types

import numpy as np

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _read(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    if n == 0:
        return np.zeros(shape, dtype)
    buf = (ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


class Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.results = engine, {}, {}, None
        self.profiles_set: list[int] = []

    def set_optimization_profile_async(self, index: int, stream) -> bool:
        self.profiles_set.append(index)
        return True

    def set_input_shape(self, name, shape) -> bool:
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        self.addresses[name] = ptr
        return True

    def _run(self):
        if self.results is None:
            feeds = {n: _read(self.addresses[n], self.shapes[n], DTYPES[self.engine.dtypes[n]]) for n in self.engine.inputs}
            outs = self.engine.session.run(None, feeds)
            self.results = dict(zip(self.engine.outputs, outs))
        return self.results

    def get_tensor_shape(self, name):
        return self._run()[name].shape

    def execute_async_v3(self, stream) -> bool:
        for name, arr in self._run().items():
            arr = np.ascontiguousarray(arr, DTYPES[self.engine.dtypes[name]])
            if arr.nbytes:
                ctypes.memmove(self.addresses[name], arr.ctypes.data, arr.nbytes)
        self.results = None
        self.engine.launches += 1
        return True


class Engine:
    def __init__(self, blob: bytes):
        import onnxruntime as ort
        self.session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {t.name: ORT_TYPES[t.type] for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.contexts: list[Context] = []
        self.launches = 0

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        self.contexts.append(Context(self))
        return self.contexts[-1]


def make(engines: list):
    """(trt, trtp) stand-ins; every deserialized Engine is appended to `engines`."""
    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob: bytes):
            try:
                engine = Engine(blob)
            except Exception:
                return None  # what TensorRT does with a blob it cannot read
            engines.append(engine)
            return engine

    trt = types.SimpleNamespace(
        float32="float32", float16="float16", bfloat16="bfloat16", int32="int32", int64="int64", bool="bool",
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None}), Runtime=Runtime)
    return trt, types.SimpleNamespace()
