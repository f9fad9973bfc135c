"""The benchmark harness runs end to end (numbers are not asserted: they are measurements)."""

import json



def test_runtime_bench_runs_and_writes_json_and_plot(tmp_path, capsys):
    from benchmarks.runtime_bench import main, print_table
    out = tmp_path / "rt.json"
    data = main(["--preset", "tiny", "--prompt", "4", "--new-tokens", "4",
                 "--only", "eager,ort loop/standard propagate", "--out", str(out)])
    assert json.loads(out.read_text()) == data
    print_table(data)
    assert "decode, batch 1, tiny: prompt 4, 4 new tokens" in capsys.readouterr().out
    names = [x["name"] for x in data["results"]]
    assert names == ["openmythos 0.5.0 (cached)", "eager", "ort loop/standard propagate"]
    assert [x["exit"] for x in data["results"]] == ["none", "none", "propagate"]
    for x in data["results"]:
        assert x["decode"]["p50_ms"] > 0 and x["peak_rss_mb"] > 0 and x["bandwidth_floor_ms"] > 0
    assert data["cache_bytes_per_token"]["openmythos"] > data["cache_bytes_per_token"]["mythos_deploy"]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_soak_runs_several_sessions_and_writes_json(tmp_path):
    from benchmarks.soak import main
    out = tmp_path / "soak.json"
    data = main(["--preset", "tiny", "--max-seq-len", "40", "--steps", "20", "--batch", "2", "--out", str(out)])
    r = data["results"][0]
    assert [s["tokens"] for s in r["sessions"]] == [8, 8, 4]  # 40 - 32 prompt tokens per session
    assert all(s["rss_mb"] > 0 and s["mean_ms"] > 0 for s in r["sessions"])
    assert json.loads(out.read_text())["results"][0]["batch"] == 2
