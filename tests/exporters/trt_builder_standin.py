"""A stand-in for TensorRT's builder API (Builder, INetworkDefinition, OnnxParser,
IBuilderConfig, IOptimizationProfile, ITimingCache) that records what it is asked to do, so
the calls exporters/trt_build.py makes can be checked without TensorRT. It builds nothing:
an "engine" is the bytes b"engine:" + the graph file's name."""

from __future__ import annotations

import types
from pathlib import Path


class Recorder:
    def __init__(self):
        self.configs, self.parsed = [], []
        self.fail_parse = self.fail_build = False


def make(rec: Recorder, trtp):
    class Network:
        def __init__(self):
            self.inputs, self.name = [], ""

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            import onnx
            rec.parsed.append(Path(path).name)
            if rec.fail_parse:
                self.num_errors = 1
                return False
            model = onnx.load(path, load_external_data=False)
            self.network.inputs = [i.name for i in model.graph.input]
            self.network.name = Path(path).name
            return True

        def get_error(self, i):
            return types.SimpleNamespace(desc=lambda: "In node 3 (importPlugin): plugin not found")

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool, self.cache = set(), [], None, None
            rec.configs.append(self)

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, blob):
            return Cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return None if rec.fail_build else b"engine:" + network.name.encode()

    flags = types.SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8", FP8="FP8", INT4="INT4")
    trt = types.SimpleNamespace(
        __version__="stand-in", Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None}),
        Builder=Builder, OnnxParser=OnnxParser, BuilderFlag=flags,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        float32="float32", float16="float16", bfloat16="bfloat16")
    return trt, trtp
