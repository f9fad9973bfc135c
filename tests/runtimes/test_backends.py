"""Every backend against the eager reference; fill-forward; the cache; bad input."""

import json

import numpy as np
import pytest

from mythos_deploy import CacheError, CheckpointError, InputError
from mythos_deploy.runtimes import generate, load, stream_generate
from mythos_deploy.runtimes.parity import compare
from mythos_deploy.options import DecodeOptions

LOOPS = ("unroll", "loop", "stepped")


@pytest.mark.parametrize("attn", ["mla", "gqa"])
@pytest.mark.parametrize("loop", LOOPS)
def test_greedy_tokens_and_logits_match_eager(artifacts, attn, loop):
    ck, od = artifacts[(attn, loop)]
    eager, ort = load(ck), load(od)
    assert eager.name == "eager" and ort.name.startswith("onnxruntime")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 256, size=(2, 6)).tolist()
    report = compare(eager, ort, prompts, new_tokens=32, tolerance=1e-4)
    assert report.passed, report
    assert all(r.loops_used_agreement == 1.0 for r in report.prompts)
    a = generate(eager, prompts[0], 32)
    b = generate(ort, prompts[0], 32)
    assert a.tokens == b.tokens and a.loops_used == b.loops_used


@pytest.mark.parametrize("loop", ["loop", "stepped"])
def test_depth_beyond_trained_max(artifacts, loop):
    ck, od = artifacts[("mla", loop)]
    report = compare(load(ck), load(od), [[5, 6, 7, 8]], new_tokens=12, decode_a=DecodeOptions(n_loops=9))  # max_loop_iters=4
    assert report.passed, report


@pytest.mark.parametrize("loop", ["loop", "stepped"])
def test_fill_forward_matches_eager_fill_forward(artifacts, loop):
    ck, od = artifacts[("mla", loop)]
    eager, ort = load(ck), load(od)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6]]
    report = compare(eager, ort, prompts, new_tokens=24, decode_a=DecodeOptions(8, 0.6, "fill-forward"))
    assert report.passed, report
    row = report.prompts[0]
    assert row.loops_run_b < 8  # some calls stopped early
    assert row.loops_run_a == row.loops_run_b


def test_fill_forward_changes_only_what_it_should(artifacts):
    """A halted token's own logits never change; later tokens may (their deeper cache slots
    read fill-forwarded latents). Both effects are measured, not assumed."""
    ck, _ = artifacts[("mla", "stepped")]
    eager = load(ck)
    prompt = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    s_none = eager.start(1, 8, DecodeOptions(8, None, "none"))
    s_ff = eager.start(1, 8, DecodeOptions(8, None, "fill-forward"))
    a, b = s_none.step(prompt), s_ff.step(prompt)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)  # one call: exact
    assert (a.loops_used == b.loops_used).all()
    assert b.loops_run <= 8


def test_unrolled_artifact_rejects_other_depths(artifacts):
    _, od = artifacts[("mla", "unroll")]
    ort = load(od)
    with pytest.raises(InputError, match="re-export"):
        generate(ort, [1, 2], 4, decode=DecodeOptions(n_loops=7))
    with pytest.raises(InputError, match="fill-forward"):
        generate(ort, [1, 2], 4, decode=DecodeOptions(exit="fill-forward"))


def test_cache_buffers_are_preallocated_and_written_in_place(artifacts):
    _, od = artifacts[("gqa", "loop")]
    session = load(od).start(batch=2, budget=12, decode=DecodeOptions(n_loops=4))
    ptrs = {k: v.ctypes.data for k, v in session.buffers.items()}
    session.step(np.array([[1, 2, 3], [4, 5, 6]]))
    for _ in range(5):
        session.step(np.array([[7], [8]]))
    assert {k: v.ctypes.data for k, v in session.buffers.items()} == ptrs
    assert session.length == 8
    rec = session.buffers["past_recurrent"]
    assert rec.shape == (4, 2, 12, session.cfg.cache_width)
    assert np.abs(rec[:, :, :8]).sum() > 0 and (rec[:, :, 8:] == 0).all()
    with pytest.raises(CacheError, match="budget"):
        session.step(np.array([[1] * 5, [2] * 5]))


def test_streaming_equals_generate(artifacts):
    _, od = artifacts[("mla", "stepped")]
    ort = load(od)
    events = list(stream_generate(ort, [9, 8, 7], 6))
    assert [e.tokens[0] for e in events] == generate(ort, [9, 8, 7], 6).tokens[0]


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(prompt=[1, 300]), InputError, "out of range"),
    (dict(prompt=[-2]), InputError, "out of range"),
    (dict(prompt=[]), InputError, "empty"),
    (dict(prompt=[[1, 2], [3]]), InputError, "equal lengths"),
    (dict(prompt=list(range(100)) + list(range(28))), InputError, "no room"),
    (dict(prompt=[1], decode=dict(exit="sometimes")), InputError, "exit"),
    (dict(prompt=[1], decode=dict(act_threshold=2.0)), InputError, "act_threshold"),
    (dict(prompt=[1.5]), InputError, "integers"),
])
def test_bad_runtime_input(artifacts, kwargs, err, match):
    _, od = artifacts[("mla", "loop")]
    with pytest.raises(err, match=match):
        if "decode" in kwargs:
            kwargs = {**kwargs, "decode": DecodeOptions(**kwargs["decode"])}
        generate(load(od), **{"max_new_tokens": 4, **kwargs})


def test_manifest_version_and_tampering(artifacts, tmp_path):
    import shutil
    _, od = artifacts[("mla", "loop")]
    copy = tmp_path / "copy"
    shutil.copytree(od, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tool_version"] = "9.9.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="9.9.0"):
        load(copy)
    load(copy, verify=False)
    manifest["tool_version"] = json.loads((od / "manifest.json").read_text())["tool_version"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load(copy)
    (copy / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a readable ONNX file|onnxruntime cannot load"):
        load(copy, verify=False)


def test_backend_choice_errors(artifacts, tmp_path):
    ck, od = artifacts[("mla", "loop")]
    with pytest.raises(InputError, match="export it first"):
        load(ck, backend="onnxruntime")
    with pytest.raises(InputError, match="eager backend needs"):
        load(od, backend="eager")
    with pytest.raises(InputError, match="backend must be"):
        load(od, backend="tensorrt-please")
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nothing")
