"""benchmarks/scale.py's bookkeeping (the real runs are a benchmark, never a test)."""

import json

from benchmarks.scale import repredict, targets


def _row(stage, gb, seconds, code=0):
    return {"stage": stage, "exit_code": code, "seconds": seconds, "peak_rss_bytes": int(gb * 1e9), "peak_rss_gb": gb}


def test_targets_are_judged_from_the_recorded_numbers(tmp_path):
    data = {"preset": "1b", "stages": [_row("export", 4.8, 70), _row("export+gate", 12.5, 130),
                                       _row("int4", 5.8, 1000), _row("generate", 1.6, 6, code=1)],
            "decode": {"rows": [{"name": "openmythos", "decode": {"p50_ms": 400.0}},
                                {"name": "eager", "decode": {"p50_ms": 380.0}},
                                {"name": "onnxruntime int4", "decode": {"p50_ms": 80.0}, "speedup_vs_openmythos": 5.0,
                                 "x_floor": 1.7}]}}
    path = tmp_path / "scale_1b.json"
    path.write_text(json.dumps(data))
    out = repredict(path)  # the memory model's prediction beside each measurement, then the targets
    assert all("predicted_peak_rss_gb" in r for r in out["stages"])
    t = json.loads(path.read_text())["targets"]
    assert t["export: peak RSS <= 6.0 GB"]["met"]
    assert not t["export+gate: peak RSS <= 12.0 GB, <= 900 s"]["met"]  # over the RAM target
    assert not t["int4: peak RSS <= 8.0 GB, <= 900 s"]["met"]  # over the time target
    assert not t["generate: peak RSS <= 3.0 GB"]["met"]  # failed run
    assert t["eager decode at least as fast as OpenMythos"]["met"]
    assert t["int4 decode >= 5x OpenMythos"]["met"] and not t["int4 decode within 1.6x of its floor"]["met"]
    assert targets({"stages": []}) == {}
    t3 = targets({"preset": "3b", "stages": [_row("export+gate", 13.3, 615), _row("int4", 16.5, 540)]})
    assert t3["export+gate: peak RSS <= 16.0 GB"]["met"] and not t3["int4: peak RSS <= 16.0 GB"]["met"]
