"""The OpenMythos-configuration sweep: the property test of tests/exporters/test_openmythos_configs.py
with more examples (default 30), each result recorded, summarised in JSON.

    python -m benchmarks.om_configs --examples 30 --out benchmarks/results/om_configs.json

Per drawn configuration and loop mode (unroll, loop): whether the parity gate passed, whether
12 greedy onnxruntime tokens equal OpenMythos 0.5.0's cached decoding, the worst error over
the gate's limit, and how many gate positions were ill-conditioned (never halted)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_json


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results/om_configs.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        record = Path(d) / "records.jsonl"
        env = {**os.environ, "MYTHOS_OM_EXAMPLES": str(args.examples), "MYTHOS_OM_RECORD": str(record)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/exporters/test_openmythos_configs.py"], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    cells = [r[loop] for r in rows for loop in ("unroll", "loop")]
    summary = {"examples": len(rows), "exports": len(cells), "seconds": round(seconds, 1),
               "gate_passed": sum(c["gate_passed"] for c in cells),
               "tokens_equal": sum(c["tokens_equal"] for c in cells),
               "with_ill_conditioned_positions": sum(c["ill_conditioned"] > 0 for c in cells),
               "worst_error_over_limit": max((c["worst_error_over_limit"] for c in cells), default=None),
               "pytest_exit_code": proc.returncode}
    out = write_json(Path(args.out), {"benchmark": "om_configs", **summary, "results": rows})
    print(json.dumps(summary, indent=2))
    if proc.returncode:
        print(proc.stdout[-3000:], file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
