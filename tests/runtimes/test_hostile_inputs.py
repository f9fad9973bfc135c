"""Property tests over runtime inputs and configs, and non-finite output detection.

Every input either works or raises a MythosError subclass with a message: never a numpy,
torch or onnxruntime exception from deep inside."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mythos_deploy import MythosConfig, MythosModel
from mythos_deploy.errors import ConfigError, MythosError, NumericalError
from mythos_deploy.runtimes import SamplingParams, generate
from mythos_deploy.runtimes.base import check_ids
from mythos_deploy.runtimes.eager import EagerBackend
from mythos_deploy.options import DecodeOptions

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64, np.float32, np.float64, np.bool_]


@pytest.fixture(scope="module")
def backend():
    return EagerBackend(MythosModel(MythosConfig.from_name("tiny")).init_weights(0))


@st.composite
def id_arrays(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    values = draw(st.lists(st.integers(-300, 300), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return np.array(values).astype(dtype).reshape(shape)


@FAST
@given(ids=id_arrays())
def test_check_ids_accepts_or_refuses_cleanly(ids):
    cfg = MythosConfig.from_name("tiny")
    try:
        out = check_ids(ids, cfg)
    except MythosError as exc:
        assert str(exc)
        return
    assert out.dtype == np.int64 and out.ndim == 2 and out.size > 0
    assert out.min() >= 0 and out.max() < cfg.vocab_size


@FAST
@given(ids=id_arrays(), n_loops=st.one_of(st.integers(-2, 6), st.floats(allow_nan=True), st.booleans()),
       threshold=st.one_of(st.floats(-1, 2), st.just(float("nan"))))
def test_session_step_accepts_or_refuses_cleanly(backend, ids, n_loops, threshold):
    try:
        session = backend.start(batch=max(1, ids.shape[0] if ids.ndim == 2 else 1), budget=8,
                                decode=DecodeOptions(n_loops, threshold))
        out = session.step(ids)
    except MythosError as exc:
        assert str(exc)
        return
    assert np.isfinite(out.logits).all()
    assert (out.loops_used >= 1).all() and (out.loops_used <= n_loops).all()


@FAST
@example(greedy=False, temperature=5.958519877354321e-251, top_k=0, top_p=1.0, penalty=1.0, seed=0)  # 0 in fp32
@given(greedy=st.booleans(), temperature=st.floats(allow_nan=True, allow_infinity=True),
       top_k=st.integers(-3, 400), top_p=st.floats(allow_nan=True, allow_infinity=True),
       penalty=st.floats(allow_nan=True, allow_infinity=True), seed=st.integers(0, 2**31))
def test_sampling_parameters_accept_or_refuse_cleanly(backend, greedy, temperature, top_k, top_p, penalty, seed):
    try:
        params = SamplingParams(greedy, temperature, top_k, top_p, penalty, seed)
        res = generate(backend, [1, 2, 3], max_new_tokens=2, sampling=params)
    except MythosError as exc:
        assert str(exc)
        return
    tokens = res.tokens[0]
    assert len(tokens) == 2 and all(0 <= t < backend.cfg.vocab_size for t in tokens)


FIELDS = {
    "vocab_size": st.integers(-5, 1000), "dim": st.integers(-8, 256), "n_heads": st.integers(-2, 16),
    "n_kv_heads": st.integers(-2, 16), "max_seq_len": st.integers(-4, 4096),
    "max_loop_iters": st.integers(-2, 40), "attn_type": st.sampled_from(["mla", "gqa", "mha", ""]),
    "n_experts": st.integers(-1, 64), "n_experts_per_tok": st.integers(-1, 70),
    "act_threshold": st.floats(allow_nan=True, allow_infinity=True),
    "qk_rope_head_dim": st.integers(-2, 64), "kv_lora_rank": st.integers(-2, 256),
    "rope_theta": st.floats(allow_nan=True, allow_infinity=True), "lora_rank": st.integers(-2, 32),
    "expert_dim": st.integers(-2, 512), "dropout": st.floats(-1, 2),
}


@settings(max_examples=200, deadline=None)
@given(overrides=st.fixed_dictionaries({}, optional=FIELDS))
def test_configs_validate_or_name_the_field(overrides):
    base = MythosConfig.from_name("tiny").to_dict()
    try:
        cfg = MythosConfig(**{**base, **overrides})
    except ConfigError as exc:
        assert any(name in str(exc) for name in (*FIELDS, *base)), str(exc)
        return
    assert cfg.dim % cfg.n_heads == 0 and 0 < cfg.act_threshold <= 1
    assert 1 <= cfg.n_experts_per_tok <= cfg.n_experts
    assert math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0


def test_non_finite_logits_are_detected_and_the_position_named():
    model = MythosModel(MythosConfig.from_name("tiny")).init_weights(0)
    session = EagerBackend(model).start(batch=2, budget=8)
    session.step([[1, 2], [3, 4]])  # fine
    with torch.no_grad():  # an activation overflow from here on (weights go bad mid-session)
        model.recurrent.act.halt.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"eager: non-finite logits \(decode step, batch row 0, position 2\)"):
        session.step([[5], [6]])


def test_non_finite_logits_through_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    from mythos_deploy import save_checkpoint
    from mythos_deploy.runtimes import load

    ck, od = tmp_path / "ck", tmp_path / "ox"
    save_checkpoint(MythosModel(MythosConfig.from_name("tiny")).init_weights(0), ck)
    export_onnx(ck, od, OnnxExportOptions(loop="unroll", validate=False))
    path = od / "model.onnx"
    model = onnx.load(str(path))
    w = next(t for t in model.graph.initializer  # a weight matrix of the recurrent block
             if len(t.dims) == 2 and "recurrent" in t.name and t.data_type == onnx.TensorProto.FLOAT)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[:] = np.nan
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(path))
    session = load(od, verify=False).start(batch=1, budget=8)  # the edit broke its manifest hash
    with pytest.raises(NumericalError, match=r"onnxruntime: non-finite logits \(prefill step, batch row 0"):
        session.step([[1, 5, 2]])


@pytest.fixture(scope="module")
def two_artifacts(tmp_path_factory):
    """A checkpoint (with tokenizer) and its unrolled ONNX export, made once."""
    pytest.importorskip("onnxruntime")
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    from mythos_deploy import save_checkpoint
    from mythos_deploy.tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp("corrupt")
    ck, ox = root / "ck", root / "ox"
    save_checkpoint(MythosModel(MythosConfig.from_name("tiny")).init_weights(0), ck,
                    tokenizer=ByteTokenizer().files())
    export_onnx(ck, ox, OnnxExportOptions(loop="unroll", validate=False))
    return ck, ox


CORRUPTIONS = [("ck", "model.safetensors"), ("ck", "config.json"), ("ck", "manifest.json"),
               ("ck", "tokenizer.json"), ("ox", "model.onnx"), ("ox", "manifest.json"), ("ox", "tokenizer.json")]


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
@pytest.mark.parametrize("kind,name", CORRUPTIONS)
def test_truncated_files_give_one_line_errors(two_artifacts, tmp_path, kind, name, verify):
    """Each file cut in half: exit 2 and one `error:` line, with or without the manifest check
    (without it, the file's own parser must catch the damage)."""
    import shutil
    from typer.testing import CliRunner
    from mythos_deploy.cli import app
    src = two_artifacts[0 if kind == "ck" else 1]
    art = tmp_path / kind
    shutil.copytree(src, art)
    if kind == "ox":  # the export names its checkpoint; keep the tokenizer reachable
        shutil.copytree(two_artifacts[0], tmp_path / "ck")
    data = (art / name).read_bytes()
    (art / name).write_bytes(data[: len(data) // 2])
    args = ["generate", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
    r = CliRunner().invoke(app, args + ([] if verify else ["--no-verify"]))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert lines[-1].startswith("error:") and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("field,value", [("max_seq_len", 10**10), ("dim", 2**20)])
def test_absurd_config_is_refused_with_a_memory_estimate_before_allocating(two_artifacts, tmp_path, field, value):
    import json
    import shutil
    from typer.testing import CliRunner
    from mythos_deploy.cli import app
    art = tmp_path / "ck"
    shutil.copytree(two_artifacts[0], art)
    cfg = json.loads((art / "config.json").read_text())
    cfg[field] = value
    (art / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(app, ["generate", str(art), "--prompt-ids", "1,2", "--max-new-tokens", "1", "--no-verify"])
    assert r.exit_code == 2, r.output
    assert "GiB before it runs" in r.output and "this machine has" in r.output, r.output


def test_ort_threads_env_is_checked(monkeypatch):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from mythos_deploy.errors import InputError
    from mythos_deploy.runtimes.onnx_runner import make_session
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    monkeypatch.setenv("MYTHOS_ORT_THREADS", "many")
    with pytest.raises(InputError, match="MYTHOS_ORT_THREADS must be an integer number of threads, got 'many'"):
        make_session(model)
    monkeypatch.setenv("MYTHOS_ORT_THREADS", "1")
    assert make_session(model).get_session_options().intra_op_num_threads == 1
