"""The TensorRT backend: where TensorRT is absent (here), engine directories and a forced
tensorrt backend fail with one clear line; with TensorRT and a GPU, greedy parity with eager."""

import numpy as np
import pytest
from typer.testing import CliRunner

from mythos_deploy import InputError, MissingDependencyError
from mythos_deploy.cli import app
from mythos_deploy.manifest import read_manifest, write_manifest
from runtimes import generate, load


def _fake_engine_dir(src, path):
    m = read_manifest(src)
    path.mkdir()
    (path / "model.engine").write_bytes(b"not an engine")
    write_manifest(path, "tensorrt", options=m["options"], config=m["config"], contract=m["contract"],
                   engines={"model": "model.engine"}, profiles={"model": {"decode": {}, "prefill": {}}},
                   build={"precision": "fp16", "plugin": "aot"})
    return path


def test_engine_directory_without_tensorrt(artifacts, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    _, src = artifacts[("mla", "unroll")]
    eng = _fake_engine_dir(src, tmp_path / "eng")
    with pytest.raises(MissingDependencyError, match="tensorrt not installed"):
        load(eng)
    r = CliRunner().invoke(app, ["generate", str(eng), "--prompt-ids", "1,2,3"])
    assert r.exit_code == 2 and "tensorrt not installed" in r.output and "Traceback" not in r.output, r.output
    with pytest.raises(InputError, match="only the tensorrt backend"):
        load(eng, backend="onnxruntime")


def test_forcing_tensorrt_on_other_artifacts_says_build_first(artifacts):
    ck, src = artifacts[("mla", "unroll")]
    for path in (ck, src):
        with pytest.raises(InputError, match="mythos-export build"):
            load(path, backend="tensorrt")


def test_tensorrt_greedy_parity_with_eager(artifacts, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from exporters.trt_build import BuildOptions, build_engines
    ck, src = artifacts[("mla", "stepped")]
    build_engines(src, tmp_path / "e", BuildOptions(precision="fp32"))
    ref = generate(load(ck), [1, 2, 3], 32).tokens
    got = generate(load(tmp_path / "e"), [1, 2, 3], 32).tokens
    assert np.array_equal(ref, got)
