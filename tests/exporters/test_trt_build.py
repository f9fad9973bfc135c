"""`build`: everything before TensorRT (checks, lint gate, optimization profiles from the I/O
contract, --dry-run) runs here; the engine build itself needs TensorRT and skips."""

import json

import pytest
from typer.testing import CliRunner

from mythos_deploy.exporters.trt_build import BuildOptions, build_engines, default_ranges, parse_profile, plan, profiles_for
from mythos_deploy import InputError
from mythos_deploy.cli import app
from mythos_deploy.contract import contracts_for


def test_parse_profile():
    assert parse_profile(["batch=1:2:8", "seq=1:16:64"]) == {"batch": (1, 2, 8), "seq": (1, 16, 64)}
    for bad in ("batch", "batch=1:2", "batch=a:b:c", "=1:1:1"):
        with pytest.raises(InputError, match="AXIS=MIN:OPT:MAX"):
            parse_profile([bad])
    for bad in ({"batch": (2, 1, 3)}, {"seq": (-1, 1, 2)}, {"heads": (1, 1, 1)}):
        with pytest.raises(InputError, match="--profile"):
            BuildOptions(profile=bad).check()


def test_profiles_follow_the_contract(tiny_cfg):
    cfg = tiny_cfg.to_dict()
    ranges = default_ranges(cfg, 4)
    assert ranges["past"][2] == cfg["max_seq_len"] and ranges["loops"][2] == 2 * cfg["max_loop_iters"]
    (model,) = contracts_for(tiny_cfg, "unroll", 4)
    profs = profiles_for(model, ranges, decode=True)
    assert list(profs) == ["decode", "prefill"]
    W = tiny_cfg.cache_width
    assert profs["decode"]["input_ids"] == [[1, 1], [1, 1], [4, 1]]
    assert profs["prefill"]["input_ids"] == [[1, 1], [1, ranges["seq"][1]], [4, cfg["max_seq_len"]]]
    assert profs["prefill"]["past_recurrent"] == [[4, 1, 0, W], [4, 1, ranges["past"][1], W], [4, 4, ranges["past"][2], W]]
    assert profs["prefill"]["past_len"] == [[1], [1], [4]]  # one length per row: follows batch
    assert "act_threshold" not in profs["prefill"]  # scalars: no profile
    (loop,) = contracts_for(tiny_cfg, "loop", 4)
    assert profiles_for(loop, ranges, decode=False)["prefill"]["past_recurrent"][2][0] == ranges["loops"][2]
    step = contracts_for(tiny_cfg, "stepped", 4)[1]
    assert profiles_for(step, ranges, decode=False)["prefill"]["h"][2] == [4, cfg["max_seq_len"], tiny_cfg.dim]


def test_plan_refuses_what_tensorrt_cannot_build(artifacts, masked_artifacts, demo_qdq8, tmp_path):
    from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
    with pytest.raises(InputError, match="--past masked"):  # onnxruntime's default form
        plan(artifacts[("mla", "loop")][1], BuildOptions())
    _, loop_src = masked_artifacts[("mla", "loop")]
    p = plan(loop_src, BuildOptions())
    assert set(p.profiles["model"]) == {"decode", "prefill"}
    with pytest.raises(InputError, match="qdq-int8"):
        plan(loop_src, BuildOptions(precision="int8"))
    with pytest.raises(InputError, match="fp8"):
        plan(loop_src, BuildOptions(precision="fp8"))
    with pytest.raises(InputError, match="--precision"):
        plan(loop_src, BuildOptions(precision="int4"))
    q8 = tmp_path / "q8"
    quantize_artifact(artifacts[("gqa", "unroll")][1], q8, QuantizeOptions(mode="int8"))
    with pytest.raises(InputError, match="quantized for onnxruntime"):
        plan(q8, BuildOptions())
    assert plan(demo_qdq8, BuildOptions(precision="int8")).quantization == "qdq-int8"
    with pytest.raises(InputError, match="--precision int8"):
        plan(demo_qdq8, BuildOptions(precision="fp16"))


def test_dry_run_and_missing_tensorrt(masked_artifacts, tmp_path):
    _, src = masked_artifacts[("gqa", "stepped")]
    runner = CliRunner()
    r = runner.invoke(app, ["build", str(src), "-o", str(tmp_path / "e"), "--dry-run", "--json", "--profile", "batch=1:2:3"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["graphs"] == ["prelude", "step", "coda", "fill"] and summary["ranges"]["batch"] == [1, 2, 3]
    assert summary["profiles"]["coda"]["prefill"]["h_out"][2][0] == 3
    r = runner.invoke(app, ["build", str(src), "-o", str(tmp_path / "e"), "--dry-run"])
    assert r.exit_code == 0 and "past_prelude_0" in r.output and "nothing built" in r.output
    assert not (tmp_path / "e").exists()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        r = runner.invoke(app, ["build", str(src), "-o", str(tmp_path / "e")])
        assert r.exit_code == 2 and "tensorrt not installed" in r.output and "[tensorrt]" in r.output, r.output
        assert not (tmp_path / "e").exists() and "Traceback" not in r.output
    r = runner.invoke(app, ["build", str(tmp_path / "none"), "-o", str(tmp_path / "e"), "--dry-run"])
    assert r.exit_code == 2 and "not found" in r.output


def test_builds_engines_with_tensorrt(masked_artifacts, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    _, src = masked_artifacts[("mla", "stepped")]
    res = build_engines(src, tmp_path / "e", BuildOptions(precision="fp32"))
    assert set(res.manifest["engines"]) == {"prelude", "step", "coda", "fill"}


def test_build_drives_the_builder_api_as_documented(masked_artifacts, demo_qdq8, tmp_path):
    """build_engines against a recording stand-in for TensorRT's builder API."""
    from mythos_deploy.exporters.trt_build import build_engines
    from mythos_deploy import CheckpointError, InternalError
    from mythos_deploy.manifest import read_manifest, verify_files
    from tests.exporters import trt_builder_standin, trt_standins
    rec = trt_builder_standin.Recorder()
    modules = trt_builder_standin.make(rec, trt_standins.make()[1])
    _, src = masked_artifacts[("gqa", "stepped")]
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"old")
    res = build_engines(src, tmp_path / "e", BuildOptions(precision="fp16", workspace_mib=64, timing_cache=str(cache)),
                        modules=modules)
    m = read_manifest(tmp_path / "e")
    verify_files(tmp_path / "e", m)
    assert m["kind"] == "tensorrt" and m["engines"] == {g: f"{g}.engine" for g in ("prelude", "step", "coda", "fill")}
    assert (tmp_path / "e" / "step.engine").read_bytes() == b"engine:step.onnx"
    assert rec.parsed == ["prelude.onnx", "step.onnx", "coda.onnx", "fill.onnx"] and len(rec.configs) == 4
    for cfg, graph in zip(rec.configs, ("prelude", "step", "coda", "fill")):
        assert cfg.flags == {"FP16"} and cfg.pool == ("WORKSPACE", 64 << 20) and len(cfg.profiles) == 2
        assert [p.shapes for p in cfg.profiles] == list(m["profiles"][graph].values())  # decode, prefill
    assert rec.configs[0].profiles[0].shapes["input_ids"] == [[1, 1], [1, 1], [4, 1]]
    assert cache.read_bytes() == b"old+" and res.manifest["build"]["precision"] == "fp16"
    # int8 on a qdq-int8 plugin artifact: INT8 with FP16 fallback, and the plugin registered
    rec2 = trt_builder_standin.Recorder()
    trt, trtp, registry = trt_standins.make()
    build_engines(demo_qdq8, tmp_path / "e8", BuildOptions(precision="int8"),
                  modules=trt_builder_standin.make(rec2, trtp))
    assert rec2.configs[0].flags == {"INT8", "FP16"} and {k for k, _ in registry} == {"register", "autotune", "aot_impl"}
    # the engine directory carries the artifact's tokenizer (hashed in its manifest)
    assert read_manifest(tmp_path / "e8")["files"]["tokenizer.json"] == read_manifest(demo_qdq8)["files"]["tokenizer.json"]
    # a parse error or a failed build: one clear error, nothing written
    rec.fail_parse = True
    with pytest.raises(CheckpointError, match="cannot parse prelude.onnx: In node 3"):
        build_engines(src, tmp_path / "x", BuildOptions(), modules=modules)
    rec.fail_parse, rec.fail_build = False, True
    with pytest.raises(InternalError, match="failed to build"):
        build_engines(src, tmp_path / "x", BuildOptions(), modules=modules)
    assert not (tmp_path / "x").exists()
