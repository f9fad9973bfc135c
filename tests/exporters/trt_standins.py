"""Stand-ins for `tensorrt` and `tensorrt.plugin`, just enough of their documented surface
(TensorRT 10.9+ quickly deployable plugins) to drive runtimes/trt_plugin.py without
TensorRT: decorators that record the registered functions, tensor descriptors with shape
expressions, launch parameters. They check nothing about TensorRT itself."""

from __future__ import annotations

import types


class Desc:
    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype = list(shape), dtype

    def like(self):
        return Desc(self.shape_expr, self.dtype)


class KernelLaunchParams:
    grid_x = grid_y = grid_z = block_x = shared_mem = None


class AutoTuneCombination:
    def __init__(self, io_types: str, layouts: str = "LINEAR"):
        self.io_types, self.layouts = io_types, layouts


def make():
    """(trt, trtp, registry) where registry[(kind, plugin_id)] is the decorated function."""
    registry = {}

    def decorator(kind):
        def factory(plugin_id):
            def deco(fn):
                registry[(kind, plugin_id)] = fn
                return fn
            return deco
        return factory

    trtp = types.SimpleNamespace(
        register=decorator("register"), autotune=decorator("autotune"), aot_impl=decorator("aot_impl"),
        impl=decorator("impl"), KernelLaunchParams=KernelLaunchParams, AutoTuneCombination=AutoTuneCombination,
        cdiv=lambda a, b: -(-a // b), SymInt32=int, SymIntExprs=types.SimpleNamespace(from_tuple=list))
    trt = types.SimpleNamespace(float32="float32", float16="float16", bfloat16="bfloat16", int64="int64")
    return trt, trtp, registry
