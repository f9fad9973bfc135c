"""`build`: ONNX artifact -> TensorRT engines, one per graph (the unrolled model or the
stepped trio), written atomically with a manifest.

Everything before TensorRT is plain Python and runs anywhere (`--dry-run` stops there): the
artifact's checks, the TensorRT lint (errors refuse the build), the precision against the
artifact's quantization, and the optimization profiles, computed from the I/O contract's
dynamic axes (batch, seq, past, loops). By default two profiles per graph: `decode` (seq 1)
and `prefill` (seq from 1 to max_seq_len); the TensorRT backend picks by the call's length.
`past` runs to max_seq_len: the backend passes its whole preallocated cache buffer.

The TensorRT part follows TensorRT 10's documented Python API (Builder, OnnxParser,
IBuilderConfig, optimization profiles, timing cache) and has never run in this project's CI:
TensorRT cannot be installed here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mythos_deploy.contract import GraphContract
from mythos_deploy.errors import CheckpointError, InputError, InternalError
from mythos_deploy.manifest import Manifest
from mythos_deploy.options import ExportDtype, MoeLowering, PastForm, PluginMode, Precision, QuantMode, choose, plain_dict

SYMBOLS = ("batch", "seq", "past", "loops")


@dataclass(frozen=True)
class BuildOptions:
    precision: Precision = Precision.FP16
    profile: dict = field(default_factory=dict)  # symbol -> (min, opt, max) overrides
    decode_profile: bool = True  # a second profile with seq = 1
    workspace_mib: int = 4096
    timing_cache: str | None = None
    plugin: PluginMode = PluginMode.AOT  # aot: kernel embedded in the engine; jit: Python at run time

    def __post_init__(self):
        object.__setattr__(self, "precision", choose(Precision, self.precision, "--precision"))
        object.__setattr__(self, "plugin", choose(PluginMode, self.plugin, "--plugin"))

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    def check(self) -> None:
        if not 16 <= self.workspace_mib <= 1 << 20:
            raise InputError(f"--workspace must be in 16..1048576 MiB, got {self.workspace_mib}")
        for sym, r in self.profile.items():
            if sym not in SYMBOLS:
                raise InputError(f"--profile: unknown axis {sym!r} (one of {', '.join(SYMBOLS)})")
            if len(r) != 3 or any(not isinstance(v, int) or v < 0 for v in r) or not r[0] <= r[1] <= r[2]:
                raise InputError(f"--profile {sym}: need integers 0 <= min <= opt <= max, got {r}")


def parse_profile(specs: list[str]) -> dict[str, tuple[int, int, int]]:
    """`["batch=1:1:4", "seq=1:32:2048"]` -> {"batch": (1, 1, 4), ...}; one-line errors."""
    out = {}
    for spec in specs:
        name, _, rng = spec.partition("=")
        parts = rng.split(":")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            values = ()
        if not name or len(values) != 3:
            raise InputError(f"--profile takes AXIS=MIN:OPT:MAX (e.g. seq=1:32:2048), got {spec!r}")
        out[name.strip()] = values
    return out


def default_ranges(cfg: dict, loops: int) -> dict[str, tuple[int, int, int]]:
    L = cfg["max_seq_len"]
    return {"batch": (1, 1, 4), "seq": (1, min(32, L), L), "past": (0, min(64, L), L),
            "loops": (1, loops, max(loops, 2 * cfg["max_loop_iters"]))}


def profiles_for(contract: GraphContract, ranges: dict, decode: bool) -> dict[str, dict[str, list[list[int]]]]:
    """{profile name: {input: [min_shape, opt_shape, max_shape]}} for every input with a
    dynamic axis (scalars and fixed shapes need none)."""
    names = {"prefill": ranges}
    if decode:
        names = {"decode": {**ranges, "seq": (1, 1, 1)}, **names}
    out = {}
    for pname, rng in names.items():
        shapes = {}
        for spec in contract.inputs:
            if not any(isinstance(d, str) for d in spec.shape):
                continue
            unknown = [d for d in spec.shape if isinstance(d, str) and d not in rng]
            if unknown:
                raise InternalError(f"{contract.name}.{spec.name}: no profile range for axis {unknown[0]!r}")
            shapes[spec.name] = [[rng[d][i] if isinstance(d, str) else d for d in spec.shape] for i in range(3)]
        out[pname] = shapes
    return out


@dataclass(frozen=True)
class BuildPlan:
    """Everything about a build that needs no TensorRT (what `build --dry-run` prints)."""
    artifact: str
    manifest: Manifest
    graphs: dict[str, str]  # graph name -> ONNX file
    ranges: dict[str, tuple[int, int, int]]  # dynamic axis -> (min, opt, max)
    profiles: dict[str, dict]  # graph -> profile name -> input -> [min, opt, max] shapes
    options: BuildOptions
    quantization: QuantMode | None

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "precision": str(self.options.precision),
                "quantization": None if self.quantization is None else str(self.quantization),
                "graphs": list(self.graphs), "ranges": self.ranges, "profiles": self.profiles}


@dataclass(frozen=True)
class BuildResult:
    manifest: dict[str, Any]  # the engine directory's manifest, as written
    seconds: float
    plan: BuildPlan


def plan(onnx_dir: str | Path, opts: BuildOptions) -> BuildPlan:
    """Everything about a build that needs no TensorRT: checks, lint, profiles."""
    from mythos_deploy.exporters.trt_lint import lint_artifact
    from mythos_deploy.runtimes.onnx_runner import open_onnx_artifact
    opts.check()
    onnx_dir = Path(onnx_dir)
    manifest, graphs = open_onnx_artifact(onnx_dir, "build")
    o = manifest.options
    quant = manifest.quant_mode
    if o.moe == MoeLowering.ORT:
        raise InputError("TensorRT cannot parse the ort lowering's com.microsoft::MoE; export with --moe plugin")
    if quant in (QuantMode.INT8, QuantMode.INT4):
        raise InputError(f"this artifact is quantized for onnxruntime ({quant}); for TensorRT quantize with "
                         "--mode qdq-int8, qdq-int4 or fp8")
    if opts.precision == Precision.INT8 and quant != QuantMode.QDQ_INT8:
        raise InputError("--precision int8 needs explicit quantization: mythos-export quantize --mode qdq-int8 first "
                         "(TensorRT's implicit int8 calibration is deprecated)")
    if opts.precision == Precision.FP8 and quant != QuantMode.FP8:
        raise InputError("--precision fp8 needs an fp8 Q/DQ artifact: mythos-export quantize --mode fp8 first")
    if o.past == PastForm.SLICED:
        raise InputError("this export reads only the filled cache rows (--past sliced: a data-dependent shape that "
                         "CUDA-graph capture cannot replay); for TensorRT export with --past masked (the default "
                         "with --moe plugin)")
    for mode, precision in ((QuantMode.QDQ_INT8, Precision.INT8), (QuantMode.FP8, Precision.FP8)):
        if quant == mode and opts.precision != precision:
            raise InputError(f"this artifact holds {mode} Q/DQ nodes: build it with --precision {precision}")
    if opts.precision in (Precision.FP32, Precision.BF16) and o.dtype == ExportDtype.FP16:
        raise InputError(f"this artifact was exported in fp16; --precision {opts.precision} needs an fp32 export")
    lint = lint_artifact(onnx_dir)
    if not lint.passed:
        first = [f"{f.graph}: {f.message}" for f in lint.findings if f.severity == "error"][:3]
        raise InputError(f"{onnx_dir} fails the TensorRT lint ({lint.errors} errors): " + "; ".join(first)
                         + " (mythos-export lint for all)")
    ranges = {**default_ranges(manifest.config, o.loops), **opts.profile}
    contracts = {c["name"]: GraphContract.from_dict(c) for c in manifest.data["contract"]}
    profiles = {name: profiles_for(contracts[name], ranges, opts.decode_profile) for name in graphs}
    return BuildPlan(str(onnx_dir), manifest, {k: str(v) for k, v in graphs.items()}, ranges, profiles, opts, quant)


def build_engines(onnx_dir: str | Path, out_dir: str | Path, opts: BuildOptions = BuildOptions(),
                  overwrite: bool = False, stage: Callable[[str], None] | None = None,
                  modules: tuple | None = None) -> BuildResult:
    """`modules` = (tensorrt, tensorrt.plugin) stand-ins for tests; by default the real ones."""
    from mythos_deploy.runtimes.trt_plugin import import_tensorrt, register
    from mythos_deploy.manifest import check_writable
    stage = stage or (lambda s: None)
    t0 = time.perf_counter()
    p = plan(onnx_dir, opts)
    check_writable(Path(out_dir), overwrite)
    trt, trtp = modules or import_tensorrt()
    if p.manifest.options.moe == MoeLowering.PLUGIN:
        register(trtp, trt, mode=opts.plugin)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = Path(opts.timing_cache).read_bytes() if opts.timing_cache and Path(opts.timing_cache).is_file() else b""
    engines, cache = {}, None
    for name, path in p.graphs.items():
        stage(f"parse {Path(path).name}")
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(path):
            errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
            raise CheckpointError(f"TensorRT cannot parse {Path(path).name}: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
        flags = {"fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}.get(opts.precision, [])
        if p.quantization == QuantMode.QDQ_INT4:
            flags.append("INT4")  # weight-only int4 DequantizeLinear layers
        for flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if cache is None:
            cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        for shapes in p.profiles[name].values():
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                inp = network.get_input(i)
                if inp.name in shapes:
                    profile.set_shape(inp.name, *shapes[inp.name])
            config.add_optimization_profile(profile)
        stage(f"build {name} engine ({opts.precision}; minutes for large graphs)")
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise InternalError(f"TensorRT failed to build the {name} engine (its log above says why)")
        engines[name] = bytes(blob)
    stage("write engines")
    manifest = write_engine_dir(out_dir, p, engines, trt.__version__, overwrite)
    if opts.timing_cache and cache is not None:
        Path(opts.timing_cache).write_bytes(bytes(cache.serialize()))
    return BuildResult(manifest, time.perf_counter() - t0, p)


def write_engine_dir(out_dir: str | Path, p: BuildPlan, engines: dict[str, bytes], trt_version: str,
                     overwrite: bool = False) -> dict:
    """Engines + manifest (the source artifact's options, config and contract, the plan's
    profiles, the build options), atomically."""
    from mythos_deploy.manifest import atomic_output_dir, sha256_file, write_manifest
    from mythos_deploy.tokenizer import carry_tokenizer
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        for name, blob in engines.items():
            (tmp / f"{name}.engine").write_bytes(blob)
        carry_tokenizer(p.artifact, tmp)
        src = p.manifest
        return write_manifest(
            tmp, "tensorrt", options=src.options.to_dict(), config=src.config, contract=src.data["contract"],
            source={"artifact": p.artifact, "manifest_sha256": sha256_file(Path(p.artifact) / "manifest.json"),
                    "checkpoint": src.source.get("checkpoint")},
            engines={name: f"{name}.engine" for name in engines}, profiles=p.profiles,
            build={**p.options.to_dict(), "tensorrt": trt_version,
                   "quantization": None if p.quantization is None else str(p.quantization)})
