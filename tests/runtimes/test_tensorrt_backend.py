"""The TensorRT backend: where TensorRT is absent (here), engine directories and a forced
tensorrt backend fail with one clear line; with TensorRT and a GPU, greedy parity with eager."""

import numpy as np
import pytest
from typer.testing import CliRunner

from mythos_deploy import InputError, MissingDependencyError
from mythos_deploy.cli import app
from mythos_deploy.manifest import read_manifest, write_manifest
from mythos_deploy.runtimes import generate, load
from mythos_deploy.options import DecodeOptions
from mythos_deploy.manifest import Manifest


def _fake_engine_dir(src, path):
    m = read_manifest(src)
    path.mkdir()
    (path / "model.engine").write_bytes(b"not an engine")
    write_manifest(path, "tensorrt", options=m["options"], config=m["config"], contract=m["contract"],
                   engines={"model": "model.engine"}, profiles={"model": {"decode": {}, "prefill": {}}},
                   build={"precision": "fp16", "plugin": "aot"})
    return path


def test_engine_directory_without_tensorrt(masked_artifacts, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    _, src = masked_artifacts[("mla", "unroll")]
    eng = _fake_engine_dir(src, tmp_path / "eng")
    with pytest.raises(MissingDependencyError, match="tensorrt not installed"):
        load(eng)
    r = CliRunner().invoke(app, ["generate", str(eng), "--prompt-ids", "1,2,3"])
    assert r.exit_code == 2 and "tensorrt not installed" in r.output and "Traceback" not in r.output, r.output
    with pytest.raises(InputError, match="only the tensorrt backend"):
        load(eng, backend="onnxruntime")


def test_forcing_tensorrt_on_other_artifacts_says_build_first(masked_artifacts):
    ck, src = masked_artifacts[("mla", "unroll")]
    for path in (ck, src):
        with pytest.raises(InputError, match="mythos-export build"):
            load(path, backend="tensorrt")


def _standin_backend(src, out, engines):
    """Engine directory whose "engines" are the export's ONNX graphs (written by the same
    code as `build`), opened by the TensorRT backend on CPU through the stand-in runtime."""
    from mythos_deploy.exporters.trt_build import BuildOptions, plan, write_engine_dir
    from mythos_deploy.runtimes.tensorrt_backend import TensorRTBackend
    from tests.runtimes import trt_runtime_standin
    p = plan(src, BuildOptions())
    write_engine_dir(out, p, {name: open(path, "rb").read() for name, path in p.graphs.items()}, "stand-in")
    return TensorRTBackend(out, Manifest.read(out), device="cpu", modules=trt_runtime_standin.make(engines))


@pytest.mark.parametrize("loop", ["unroll", "loop", "stepped"])
def test_backend_logic_through_a_standin_runtime(masked_artifacts, tmp_path, loop):
    """The backend's own code (cache buffers written in place, past_len, profile choice, the
    stepped loop, fill-forward) against the onnxruntime backend on the same graphs."""
    ck, src = masked_artifacts[("mla", loop)]
    engines = []
    trt_b = _standin_backend(src, tmp_path / "eng", engines)
    assert trt_b.name.startswith("tensorrt[") and read_manifest(tmp_path / "eng")["kind"] == "tensorrt"
    ort_b = load(src)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]
    exits = ["none"] if loop == "unroll" else ["none", "fill-forward", "propagate"]
    assert trt_b.propagate == (loop != "unroll")
    for exit in exits:
        ref = generate(ort_b, prompts, 12, decode=DecodeOptions(exit=exit))
        got = generate(trt_b, prompts, 12, decode=DecodeOptions(exit=exit))
        assert got.tokens == ref.tokens and got.loops_used == ref.loops_used, exit
    # logits step by step, and the cache the backend keeps, against onnxruntime's
    for exit in exits[::2]:  # none, and propagate (where calls end early: tests/runtimes/test_propagate.py)
        decode = DecodeOptions(trt_b.default_loops, 0.2, exit)
        sa, sb = ort_b.start(2, 16, decode), trt_b.start(2, 16, decode)
        ids = np.array(prompts)
        for _ in range(4):
            a, b = sa.step(ids), sb.step(ids)
            np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5)
            assert a.loops_run == b.loops_run
            ids = a.logits[:, -1:].argmax(-1)
        for name, buf in sa.buffers.items():
            np.testing.assert_allclose(sb.buffers[name].numpy(), buf, rtol=1e-5, atol=1e-5)
    # prefill calls use the prefill profile, one-token calls the decode profile
    profiles = read_manifest(tmp_path / "eng")["profiles"]
    first = next(iter(profiles))
    used = engines[0].contexts[0].profiles_set
    assert used[0] == list(profiles[first]).index("prefill") and list(profiles[first]).index("decode") in used
    # (a stepped export's fill engine runs only when a propagate call ends early: test_propagate.py)
    assert sb.cache_nbytes() == sum(b.nbytes for b in sa.buffers.values()) and all(e.launches > 0 for e in engines[:3])


def test_standin_rejects_a_corrupt_engine(masked_artifacts, tmp_path):
    from mythos_deploy.runtimes.tensorrt_backend import TensorRTBackend
    from tests.runtimes import trt_runtime_standin
    _, src = masked_artifacts[("mla", "unroll")]
    eng = _fake_engine_dir(src, tmp_path / "eng")
    with pytest.raises(Exception, match="cannot deserialize"):
        TensorRTBackend(eng, Manifest.read(eng), device="cpu", modules=trt_runtime_standin.make([]))


def test_tensorrt_greedy_parity_with_eager(masked_artifacts, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from mythos_deploy.exporters.trt_build import BuildOptions, build_engines
    ck, src = masked_artifacts[("mla", "stepped")]
    build_engines(src, tmp_path / "e", BuildOptions(precision="fp32"))
    ref = generate(load(ck), [1, 2, 3], 32).tokens
    got = generate(load(tmp_path / "e"), [1, 2, 3], 32).tokens
    assert np.array_equal(ref, got)
