"""Shared helpers for benchmarks: machine info, timing percentiles, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    """The CPU's model name: torch's CPU matmuls (MKL) run at half speed on some vendors' chips,
    so a ratio against OpenMythos means little without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def percentiles(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean()), "n": int(a.size)}


def decode_pasts(cfg, loops: int, rows: int) -> dict[str, np.ndarray]:
    """Zero cache buffers of `rows` rows at batch 1 for every past input of a model graph:
    what a one-token decode at a position below `rows` reads."""
    W = cfg.cache_width
    slots = [f"past_prelude_{i}" for i in range(cfg.prelude_layers)] + [f"past_coda_{i}" for i in range(cfg.coda_layers)]
    return {**{s: np.zeros((1, rows, W), np.float32) for s in slots},
            "past_recurrent": np.zeros((loops, 1, rows, W), np.float32)}


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_oracle():
    """tests/oracle.py (OpenMythos model builders) loaded by file path: putting tests/ on
    sys.path would let the tests/mythos_deploy folder shadow the real package."""
    import importlib.util
    import sys
    name = "mythos_bench_oracle"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "tests" / "oracle.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
