"""The memory model: peak RSS, disk and time each stage needs, predicted from the config.

Every stage's peak is a fixed cost (the interpreter, torch, onnx and onnxruntime imported)
plus multiples of the model's weight bytes W (fp32) and, for the MoE lowering, of its routed
expert tables. The multiples come from what each stage holds at its peak:

- init: the random-init model plus safetensors' write buffers (1.25 W);
- export without the gate: the checkpoint's tensors (memory-mapped, 1.0 W); the trace
  streams weights to a scratch store and never holds a second copy; an artifact small
  enough to keep its weights inline (< 1 GiB) is serialised whole (2.2x its bytes);
- export with the gate: one copy of the weights at a time. The gate's eager half runs right
  after the trace and the torch weights are freed before onnxruntime maps the written
  artifact's (W plus its arena and prepacked copies, about 0.1 W);
- quantize (int8 / int4): the fp32 source's onnxruntime session for the gate (W mapped plus its
  arena; the quantized session loads after it is freed) plus what the quantizer left:
  1.56 W for int8, 1.25 W for int4;
- generate: the artifact's weights as onnxruntime holds them (1.75x its bytes) plus the cache.
- quantize for TensorRT (qdq-int8 / qdq-int4 / fp8), streamed like int8/int4: the graphs are
  read without their weights, the gate's fp32 half (a stepped export's step and fill graphs
  each hold the recurrent block) is recorded and freed before the quantized copy loads:
  1.75 W (1b measured: 7.1 GB qdq-int4, 7.9 GB qdq-int8). Its scratch space holds a
  quantized artifact, an fp32 copy for the gate, a standard-op copy of a plugin export and
  the lowered tables: about 4.5 W of disk.

Disk: the export keeps the weight store (W plus the MoE lowering's fused tables) and the
artifact (W) at the same time; the gate runs on the artifact's own files (a `plugin` export's
gate runs a standard-op copy, W more). Times are a start-up cost plus seconds per GB
of weights on the 2-core machine they were measured on (benchmarks/scale.py; the measured
numbers are in benchmarks/results/scale_*.json).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mythos_deploy.config import MythosConfig
from mythos_deploy.errors import InputError

GB = 1e9
BASE = {"init": 0.42 * GB, "export": 0.55 * GB, "export+gate": 0.60 * GB, "quantize": 0.50 * GB,
        "generate": 0.42 * GB}
RSS_PER_W = {"init": 1.25, "export": 1.02, "export+gate": 1.10, "quantize": 1.56, "quantize int4": 1.25,
             # TensorRT Q/DQ (qdq-int8, qdq-int4, fp8), streamed: 1b 7.1-7.9 GB (it loaded every
             # graph whole before, and was killed past 21.5 GB)
             "quantize qdq": 1.75,
             "generate": 1.75}
SECONDS_FIXED = {"init": 2.0, "export": 15.0, "export+gate": 17.0, "quantize": 4.0, "generate": 2.0}
SECONDS_PER_GB = {"init": 7.7, "export": 13.1, "export+gate": 50.5, "quantize": 43.8, "quantize int4": 39.5,
                  "quantize qdq": 150.0,  # 1b: 544 s qdq-int4, 726 s qdq-int8 (calibration included)
                  "generate": 6.0}  # generate: per GB of the artifact
QUANTIZE_KEYS = {"int4": "quantize int4", "qdq-int8": "quantize qdq", "qdq-int4": "quantize qdq", "fp8": "quantize qdq"}
INLINE_BYTES = 1 << 30  # exporters/external_data.py's default threshold
STAGES = ("init", "export", "export+gate", "quantize", "generate")


@dataclass(frozen=True)
class StagePlan:
    stage: str
    peak_rss: float  # bytes
    disk: float  # bytes the stage needs free while it runs (scratch included)
    seconds: float

    def describe(self) -> str:
        return (f"{self.stage}: peak RAM ~{self.peak_rss / GB:.1f} GB, disk ~{self.disk / GB:.1f} GB, "
                f"~{duration_text(self.seconds)} on 2 cores")


def duration_text(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def weight_bytes(cfg: MythosConfig) -> tuple[float, float]:
    """(all weights, routed expert tables) in fp32 bytes."""
    from mythos_deploy.stats import memory_estimate, parameter_counts
    p = parameter_counts(cfg)
    return float(memory_estimate(cfg, 4)["total"]), float(p["routed_experts"] * 4)


def plan_stage(cfg: MythosConfig, stage: str, dtype: str = "fp32", quant: str | None = None,
               moe: str | None = None) -> StagePlan:
    """The predicted peak RSS, disk space and time of one stage for `cfg`. `dtype` is the
    export dtype; `quant` (int8 | int4) sizes `generate` on a quantized artifact; `moe` the
    export's MoE lowering (`plugin` gates a second, standard-op copy)."""
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    W, experts = weight_bytes(cfg)
    key = QUANTIZE_KEYS.get(quant or "", stage) if stage == "quantize" else stage  # its RSS_PER_W / SECONDS_PER_GB row
    out = W / 2 if dtype == "fp16" else W  # the artifact's weights
    fused = 2 / 3 * experts  # the ort lowering's interleaved gate/up table (standard: the transposes, ~W)
    # an artifact below the external-data threshold is serialised whole: its weights inline in a
    # protobuf and again in the serialised bytes
    inline = 2.2 * out if out <= INLINE_BYTES else 0.0
    if stage == "init":
        rss, disk = BASE[stage] + RSS_PER_W[stage] * W, W
    elif stage in ("export", "export+gate"):
        rss = BASE[stage] + RSS_PER_W[stage] * W + (W / 2 if dtype == "fp16" else 0) + inline
        disk = W + fused + out + (out if stage == "export+gate" and moe == "plugin" else 0)
    elif stage == "quantize":
        q = {"int8": 0.27, "int4": 0.15}.get(quant or "int4", 0.15) * W
        rss = BASE[stage] + RSS_PER_W[key] * W
        disk = 4.5 * W if key == "quantize qdq" else 2 * q
    else:
        size = {"int8": 0.27, "int4": 0.15}.get(quant, 1.0) * out
        rss, disk = BASE[stage] + RSS_PER_W[stage] * size, 0.0
    if stage == "generate":
        seconds = SECONDS_FIXED[stage] + SECONDS_PER_GB[stage] * size / GB
    else:
        seconds = SECONDS_FIXED[stage] + SECONDS_PER_GB[key] * W / GB
    return StagePlan(stage, rss, disk, seconds)


def plan_all(cfg: MythosConfig) -> list[StagePlan]:
    """Every stage; quantize and generate for int4 (the edge target)."""
    return [plan_stage(cfg, s, quant="int4" if s in ("quantize", "generate") else None) for s in STAGES]


def available_memory() -> float | None:
    """MemAvailable (what can be allocated without swapping), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    from mythos_deploy.stats import physical_memory
    mem = physical_memory()
    return None if mem is None else float(mem)


def free_disk(path: Path) -> float | None:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return float(shutil.disk_usage(p).free)
    except OSError:
        return None


def check_plan(plan: StagePlan, out_dir: Path, force: bool = False) -> str:
    """Refuse, before any work, a stage predicted not to fit this machine's memory or disk
    (`force` overrides, for a machine the model misjudges). Returns the plan as one line."""
    line = plan.describe()
    if force:
        return line
    mem, disk = available_memory(), free_disk(out_dir)
    problems = []
    if mem is not None and plan.peak_rss > mem:
        problems.append(f"needs ~{plan.peak_rss / GB:.1f} GB of RAM, {mem / GB:.1f} GB is available")
    if disk is not None and plan.disk > disk:
        problems.append(f"needs ~{plan.disk / GB:.1f} GB of disk, {disk / GB:.1f} GB is free at {out_dir}")
    if problems:
        raise InputError(f"{plan.stage} will not fit this machine: " + "; ".join(problems)
                         + " (mythos-export inspect --plan has the numbers; --force-plan runs it anyway)")
    return line


def pool_bytes(cfg: MythosConfig, n_loops: int, max_batch: int, max_len: int, itemsize: int = 4) -> float:
    """The batching engine's slot pool: every cache slot (prelude, one per loop, coda) for
    `max_batch` rows of `max_len` positions, `cfg.cache_width` values each."""
    slots = cfg.prelude_layers + n_loops + cfg.coda_layers
    return float(slots * max_batch * max_len * cfg.cache_width * itemsize)


def check_pool(cfg: MythosConfig, n_loops: int, max_batch: int, max_len: int, itemsize: int = 4) -> float:
    """Refuse, before allocating it, a slot pool that will not fit the memory available now
    (with a quarter of it kept for activations and the rest of the process). Returns its bytes."""
    need = pool_bytes(cfg, n_loops, max_batch, max_len, itemsize)
    mem = available_memory()
    if mem is not None and need > 0.75 * mem:
        raise InputError(f"a slot pool of {max_batch} x {max_len} positions needs {need / GB:.2f} GB "
                         f"({cfg.prelude_layers + n_loops + cfg.coda_layers} cache slots x {cfg.cache_width} values); "
                         f"{mem / GB:.1f} GB is available: lower --max-batch or --max-len")
    return need


def plan_dict(plans: list[StagePlan]) -> list[dict]:
    return [{**asdict(p), "peak_rss_gb": round(p.peak_rss / GB, 2), "disk_gb": round(p.disk / GB, 2)} for p in plans]
