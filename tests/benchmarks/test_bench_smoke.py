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


def test_batching_bench_runs_and_checks_solo_tokens(tmp_path):
    from benchmarks.batching import main
    out = tmp_path / "b.json"
    data = main(["--preset", "tiny", "--concurrency", "1", "3", "--new-tokens", "3", "--max-prompt", "12",
                 "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "batching"
    for art in data["artifacts"]:
        assert [r["concurrency"] for r in art["rows"]] == [1, 3]
        assert all(r["solo_tokens_equal"] and r["batched"]["tokens"] == 3 * r["concurrency"] for r in art["rows"])
        assert art["pool"]["predicted_bytes"] > 0


def test_engine_soak_judges_its_requests(tmp_path):
    from benchmarks.soak import main
    r = main(["--preset", "tiny", "--engine-requests", "40", "--out", str(tmp_path / "s.json")])
    assert r["requests"] == 40 and r["completed"] + r["cancelled"] == 40
    assert r["solo_mismatches"] == [] and r["no_slot_leak"]
