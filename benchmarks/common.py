"""Shared helpers for benchmarks: machine info, timing percentiles, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
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


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
