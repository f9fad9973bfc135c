"""The large-model path on the tiny preset: MYTHOS_EXTERNAL_DATA_BYTES lowered so that the
export keeps its weights in a scratch store (never in a protobuf) and every artifact graph
keeps them in `<graph>.onnx.data`; then load, verify, tamper detection and location safety."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from mythos_deploy.checkpoint import load_checkpoint
from mythos_deploy.cli import app
from mythos_deploy.errors import CheckpointError
from mythos_deploy.exporters import external_data as xd
from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_form, export_onnx
from mythos_deploy.manifest import read_manifest, verify_files
from mythos_deploy.runtimes import load

SMALL = "2048"  # bytes: every tiny-preset weight table is above it


def _tensors(path):
    m = onnx.load(str(path), load_external_data=False)
    return [t for t in m.graph.initializer]


def _graph(tmp_path, n=3000, tensors=2):
    inits = [numpy_helper.from_array(np.arange(n, dtype=np.float32) * (i + 1), f"w{i}") for i in range(tensors)]
    nodes = [helper.make_node("Add", ["x", "w0"], ["a"])] + [
        helper.make_node("Add", ["a" if i == 1 else f"a{i - 1}", f"w{i}"], [f"a{i}" if i < tensors - 1 else "y"])
        for i in range(1, tensors)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [n])],
                          [helper.make_tensor_value_info("y", 1, [n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def test_write_model_streams_tensors_and_leaves_the_model_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(xd, "_CHUNK", 1000)  # several chunks per tensor
    m = _graph(tmp_path)
    before = m.SerializeToString()
    path = xd.write_model(m, tmp_path, "g.onnx", external_bytes=100)
    assert m.SerializeToString() == before
    ts = _tensors(path)
    assert all(xd.is_external(t) for t in ts)
    assert {e.value for t in ts for e in t.external_data if e.key == "location"} == {"g.onnx.data"}
    assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0 for t in ts)
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), np.arange(3000, dtype=np.float32) * 2)
    # below the threshold the weights are inline, external sources read back in
    path2 = xd.write_model(onnx.load(str(path), load_external_data=False), tmp_path / "", "inline.onnx",
                           external_bytes=1 << 30, base_dir=tmp_path)
    assert not any(xd.is_external(t) for t in _tensors(path2))
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(path2)).graph.initializer[0]),
                                  np.arange(3000, dtype=np.float32))


def test_store_backed_tensors_are_read_mapped_and_new_ones_streamed(tmp_path):
    m = _graph(tmp_path)
    xd.write_model(m, tmp_path, "g.onnx", external_bytes=100)
    sm = xd.load_into_store(tmp_path / "g.onnx")
    assert xd.store_dir(sm) == tmp_path.resolve()
    arr = xd.tensor_array(sm.graph.initializer[0])
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    other = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    xd.adopt(other, tmp_path / "elsewhere")
    assert xd.store_dir(other) is None  # a directory not marked as a store is never written to
    rows = [np.full((1, 4), i, np.float32) for i in range(300)]
    t = xd.new_tensor_rows(sm, "big", (300, 4), np.float32, iter(rows))
    assert xd.is_external(t) and xd.tensor_nbytes(t) == 4800
    np.testing.assert_array_equal(xd.tensor_array(t)[:, 0], np.arange(300, dtype=np.float32))
    small = xd.new_tensor(sm, np.arange(3, dtype=np.int64), "axes")
    assert not xd.is_external(small)
    with pytest.raises(CheckpointError, match="holds"):  # external data shorter than its shape
        t.dims[0] = 301
        xd.tensor_array(t)


def test_checker_sees_a_store_backed_model(tmp_path):
    xd.write_model(_graph(tmp_path), tmp_path, "g.onnx", external_bytes=100)
    sm = xd.load_into_store(tmp_path / "g.onnx")
    xd.check_model_file(sm, "g")  # absolute locations in memory are fine for the check
    sm.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        xd.check_model_file(sm, "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == [xd.STORE_MARK, "g.onnx", "g.onnx.data"]  # no probe left


def test_int4_tensors_stay_packed_in_external_data(tmp_path):
    """int4 is stored two to a byte: writing, mapping back and materializing keep it so (the
    qdq-int4 weights of a graph past the threshold were once written one to a byte)."""
    import ml_dtypes
    q = np.random.default_rng(0).integers(-8, 8, (64, 33)).astype(ml_dtypes.int4)
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.INT4, [64, 33])],
                          [numpy_helper.from_array(q, "w")])
    xd.write_model(helper.make_model(g), tmp_path, "m.onnx", external_bytes=10)
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 33 // 2
    same = lambda a: np.array_equal(np.asarray(a).astype(np.int8), q.astype(np.int8))  # noqa: E731
    assert same(numpy_helper.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0]))  # onnx's own reader
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    xd.adopt(lazy, tmp_path)
    assert same(xd.tensor_array(lazy.graph.initializer[0]))
    xd.materialize(lazy)
    assert same(numpy_helper.to_array(lazy.graph.initializer[0]))


def test_threshold_env_is_checked(monkeypatch):
    monkeypatch.setenv("MYTHOS_EXTERNAL_DATA_BYTES", "lots")
    with pytest.raises(Exception, match="MYTHOS_EXTERNAL_DATA_BYTES must be an integer"):
        xd.external_bytes_threshold()
    monkeypatch.setenv("MYTHOS_EXTERNAL_DATA_BYTES", "123")
    assert xd.external_bytes_threshold() == 123


def test_export_form_copies_modules_not_weights(tiny_ckpt):
    model = load_checkpoint(tiny_ckpt)
    e32 = export_form(model, OnnxExportOptions(mla="absorbed"))
    assert all(a is b for a, b in zip(model.parameters(), e32.parameters()))
    assert e32 is not model
    from mythos_deploy.layers import MLAttention
    assert not any(m.absorb for m in model.modules() if isinstance(m, MLAttention))
    assert all(m.absorb for m in e32.modules() if isinstance(m, MLAttention))
    e16 = export_form(model, OnnxExportOptions(dtype="fp16"))
    assert all(p.dtype == torch.float16 for p in e16.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("loop, moe, extra", [
    ("loop", "ort", {}),
    ("stepped", "standard", {}),
    ("loop", "standard", {"loop_export": "while_loop"}),
    ("loop", "standard", {"dtype": "fp16"}),
])
def test_store_export_matches_the_in_memory_export(tiny_ckpt, tmp_path, monkeypatch, loop, moe, extra):
    """The same export through the weight store and with external data: graphs identical to
    the in-memory export's (weights included), gate passed, artifact loads, verifies and
    decodes the same tokens."""
    import dataclasses
    opts = OnnxExportOptions(loop=loop, moe=moe, loops=3, **extra)
    export_onnx(tiny_ckpt, tmp_path / "ref", dataclasses.replace(opts, validate=False))  # in memory
    monkeypatch.setenv("MYTHOS_EXTERNAL_DATA_BYTES", SMALL)
    monkeypatch.setenv("MYTHOS_SCRATCH_DIR", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    res = export_onnx(tiny_ckpt, tmp_path / "big", opts)  # through the store, parity-gated
    assert res.report["passed"] is True
    assert list((tmp_path / "scratch").iterdir()) == []  # the store is gone
    graphs = res.manifest["graphs"]
    for f in graphs.values():
        assert (tmp_path / "big" / f"{f}.data").is_file() and f"{f}.data" in res.manifest["files"]
        a, b = onnx.load(str(tmp_path / "ref" / f)), onnx.load(str(tmp_path / "big" / f))
        for x in (a, b):
            for t in x.graph.initializer:
                del t.external_data[:]
                t.data_location = 0
        assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
        for ta, tb in zip(a.graph.initializer, b.graph.initializer):
            np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))
        assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    if moe == "plugin":
        return
    out = []
    for d in ("ref", "big"):
        backend = load(tmp_path / d)  # verifies every file's sha256, the .data files included
        s = backend.start(1, 16)
        logits = s.step(np.array([[3, 5, 7]])).logits
        out.append(logits)
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=0)


def test_tampered_or_escaping_external_data_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MYTHOS_EXTERNAL_DATA_BYTES", SMALL)
    export_onnx(tiny_ckpt, tmp_path / "a", OnnxExportOptions(loop="loop", loops=2, validate=False))
    data = tmp_path / "a" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0xFF
    data.write_bytes(bytes(raw))
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "a"), "--prompt", "ab", "--max-new-tokens", "1"])
    assert r.exit_code != 0 and "model.onnx.data" in r.output and "Traceback" not in r.output
    # a graph naming data outside its directory is refused even without verification
    m = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    onnx.save_model(m, str(tmp_path / "a" / "model.onnx"))
    with pytest.raises(CheckpointError, match="outside"):
        load(tmp_path / "a", verify=False)


def test_cli_export_with_external_data(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MYTHOS_EXTERNAL_DATA_BYTES", SMALL)
    r = CliRunner().invoke(app, ["onnx", str(tiny_ckpt), "-o", str(tmp_path / "o"), "--loops", "2"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["files"]
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "o"), "--prompt", "ab", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("moe, mode", [("ort", "int4"), ("standard", "int8"), ("stepped-standard", "qdq-int8"),
                                       ("stepped-plugin", "qdq-int4")])
def test_quantize_an_external_data_artifact(tiny_ckpt, tmp_path, monkeypatch, moe, mode):
    """Quantization reads the source's external data in place (expert tables expert by
    expert) and writes its own; the result equals the in-memory path's, tensor for tensor.
    The Q/DQ modes read the graphs without their weights and put the gate's dequantized
    weights (and a plugin export's standard-op tables) in a scratch store, never in the
    artifact or the source."""
    from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
    loop, moe = moe.split("-") if "-" in moe else ("unroll", moe)
    opts = OnnxExportOptions(loop=loop, moe=moe, loops=2, validate=False)
    export_onnx(tiny_ckpt, tmp_path / "ref", opts)
    qopts = QuantizeOptions(mode=mode, block_size=16, accept_accuracy_loss=True, calib_prompts=2)
    quantize_artifact(tmp_path / "ref", tmp_path / "qref", qopts)
    monkeypatch.setenv("MYTHOS_EXTERNAL_DATA_BYTES", "1024")
    export_onnx(tiny_ckpt, tmp_path / "src", opts)
    res = quantize_artifact(tmp_path / "src", tmp_path / "q", qopts)
    for f in res.manifest["graphs"].values():
        big = tmp_path / "q" / f"{f}.data"
        assert big.is_file() and f"{f}.data" in res.manifest["files"]
        a, b = onnx.load(str(tmp_path / "qref" / f)), onnx.load(str(tmp_path / "q" / f))
        ta = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
        tb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k])
        assert not any(p.key == xd.STORE_KEY for p in b.metadata_props)  # the scratch store's path stays behind
    src_files = {p.name for p in (tmp_path / "src").iterdir()}
    assert src_files == {*read_manifest(tmp_path / "src")["files"], "manifest.json"}  # nothing written into the source
    if moe == "plugin":  # onnxruntime cannot run the plugin: its files are verified, and built in test_trt_build
        verify_files(tmp_path / "q", read_manifest(tmp_path / "q"))
    else:
        load(tmp_path / "q")  # verifies its files, the external data included


def test_stale_weight_stores_of_killed_exports_are_removed(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from mythos_deploy.exporters.onnx_export import remove_stale_stores
    monkeypatch.setenv("MYTHOS_SCRATCH_DIR", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"mythos-store-{dead.pid}-abc").mkdir()
    (tmp_path / f"mythos-store-{dead.pid}-abc" / "w.bin").write_bytes(b"x" * 10)
    (tmp_path / f"mythos-store-{os.getpid()}-live").mkdir()  # a running export's store stays
    (tmp_path / "mythos-store-notapid-x").mkdir()
    assert remove_stale_stores() == [f"mythos-store-{dead.pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"mythos-store-{os.getpid()}-live",
                                                                 "mythos-store-notapid-x"])


def test_the_gate_holds_one_copy_of_the_weights(tiny_ckpt, tmp_path, monkeypatch):
    """The gate's eager half runs before onnxruntime loads anything, the torch model is freed
    in between, and onnxruntime runs the artifact's own files (no second copy on disk)."""
    import weakref
    from pathlib import Path
    from mythos_deploy.exporters import onnx_export
    from mythos_deploy.runtimes import onnx_runner
    monkeypatch.setenv("MYTHOS_EXTERNAL_DATA_BYTES", SMALL)
    monkeypatch.setenv("MYTHOS_SCRATCH_DIR", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    models, seen = [], []
    real_load, real_runner = onnx_export.load_checkpoint, onnx_runner.OnnxModelRunner

    def loaded(path):
        m = real_load(path)
        models.append(weakref.ref(m))
        return m

    class Runner(real_runner):
        def __init__(self, graphs, *args, **kw):
            seen.append((dict(graphs), models[0]() is None, sorted(p.name for p in (tmp_path / "scratch").iterdir())))
            super().__init__(graphs, *args, **kw)

    monkeypatch.setattr(onnx_export, "load_checkpoint", loaded)
    monkeypatch.setattr(onnx_runner, "OnnxModelRunner", Runner)
    res = export_onnx(tiny_ckpt, tmp_path / "o", OnnxExportOptions(loop="loop", moe="ort", loops=3))
    assert res.report["passed"] and any(s["scenario"].startswith("propagate") for s in res.report["outputs"])
    (paths, freed, scratch), = seen
    assert freed  # no torch weights left when onnxruntime maps the export's
    assert {Path(p).parent.name.split("-")[0] for p in paths.values()} == {".o.tmp"}  # the artifact being written
    assert len(scratch) == 1 and scratch[0].startswith("mythos-store-")  # the weight store, no validation copy
    assert json.loads((tmp_path / "o" / "validation.json").read_text())["passed"]
