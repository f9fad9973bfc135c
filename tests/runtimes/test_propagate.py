"""exit=propagate: a halted position stops changing, its deeper recurrent cache slots come from its
halted state, and the result is per position: the same tokens give the same halting, cache and
logits fed at once, in chunks, one by one, alone or batched with other rows. For the eager
backend and for `loop` exports through onnxruntime (the freeze and the fill inside the graph),
which also equal eager."""

import numpy as np
import pytest
import torch

from mythos_deploy import InputError, MythosConfig, MythosModel
from mythos_deploy.options import DecodeOptions, ExitMode
from mythos_deploy.runtimes import load
from mythos_deploy.runtimes.eager import EagerBackend

N_LOOPS = 6
PROPAGATE = DecodeOptions(N_LOOPS, 0.9, ExitMode.PROPAGATE)


def _model():
    """Halting spread over positions: some halt after one loop, some at five, some never."""
    cfg = MythosConfig.from_name("tiny")
    model = MythosModel(cfg).init_weights(2).eval()
    with torch.no_grad():
        model.recurrent.act.halt.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        model.recurrent.act.halt.bias.fill_(0.0)
    return model


@pytest.fixture(scope="module")
def backend():
    return EagerBackend(_model())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The same model as a `loop` export, composed (the default) and through while_loop, and as
    a `stepped` export (the fill graph driven from the host)."""
    pytest.importorskip("onnxruntime")
    from mythos_deploy import save_checkpoint
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    root = tmp_path_factory.mktemp("propagate")
    save_checkpoint(_model(), root / "ck")
    out = {}
    # compose and stepped with whole-buffer pasts, as TensorRT takes them: the same graphs also
    # run through the TensorRT backend's code on the stand-in runtime
    for name, opts in (("compose", OnnxExportOptions(loop="loop", past="masked", validate=False)),
                       ("while_loop", OnnxExportOptions(loop="loop", loop_export="while_loop", validate=False)),
                       ("stepped", OnnxExportOptions(loop="stepped", past="masked", validate=False))):
        export_onnx(root / "ck", root / name, opts)
        out[name] = load(root / name)
    from tests.runtimes.test_tensorrt_backend import _standin_backend
    for name in ("compose", "stepped"):
        out[f"tensorrt-{name}"] = _standin_backend(root / name, root / f"engines-{name}", [])
    return out


@pytest.fixture(params=["eager", "compose", "while_loop", "stepped", "tensorrt-compose", "tensorrt-stepped"])
def any_backend(request, backend, exported):
    return backend if request.param == "eager" else exported[request.param]


def _recurrent(session) -> np.ndarray:
    if hasattr(session, "cache"):  # eager
        return np.stack([session.cache.buffers[f"recurrent_loop_{t}"].numpy() for t in range(N_LOOPS)])
    rec = session.buffers["past_recurrent"]
    return rec.numpy().copy() if hasattr(rec, "numpy") else rec.copy()  # torch (TensorRT) or numpy


PROMPT = [5, 9, 2, 7, 7, 1, 3, 8, 4, 6]


def _feed(backend, rows, chunks, decode=PROPAGATE):
    """Feed `rows` (a batch) in chunks; returns logits and loops_used of every position, and
    the session's recurrent cache."""
    session = backend.start(len(rows), len(rows[0]), decode)
    ids = np.array(rows)
    logits, used, start = [], [], 0
    for size in chunks:
        out = session.step(ids[:, start:start + size])
        logits.append(out.logits)
        used.append(out.loops_used)
        start += size
    return np.concatenate(logits, 1), np.concatenate(used, 1), _recurrent(session)


def test_halting_depth_varies(backend):
    _, used, _ = _feed(backend, [PROMPT], [len(PROMPT)])
    assert len(set(used.flatten().tolist())) > 2 and used.min() < N_LOOPS


@pytest.mark.parametrize("chunks", [[4, 6], [1] * 10, [3, 3, 3, 1]])
def test_chunking_changes_nothing(any_backend, backend, chunks):
    ref = _feed(backend, [PROMPT], [len(PROMPT)])  # eager, at once
    got = _feed(any_backend, [PROMPT], chunks)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5, rtol=0)


def test_batching_with_another_row_changes_nothing(any_backend):
    alone = _feed(any_backend, [PROMPT], [4, 6])
    other = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]
    both = _feed(any_backend, [other, PROMPT], [4, 6])
    np.testing.assert_allclose(both[0][1], alone[0][0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(both[1][1], alone[1][0])
    np.testing.assert_allclose(both[2][:, 1], alone[2][:, 0], atol=1e-5, rtol=0)


def test_deeper_slots_come_from_the_halted_state(backend):
    """For a position that halted after `ran` loops, slot t >= ran holds what loop t's
    attention computes from its halted state; fill-forward's copy of slot ran-1 differs."""
    logits, used, cache = _feed(backend, [PROMPT], [1] * len(PROMPT))
    m = backend.model
    pos = int(np.argmin(used[0]))
    ran = int(used[0, pos])
    assert ran < N_LOOPS
    # the halted state, recomputed from scratch on the same prefix
    session = backend.start(1, len(PROMPT), DecodeOptions(N_LOOPS, 0.9, ExitMode.PROPAGATE))
    for tok in PROMPT[:pos]:
        session.step([[tok]])
    with torch.no_grad():
        x = torch.tensor([[PROMPT[pos]]])
        views = {name: session.cache.view(name, pos) for name in session.cache.buffers}
        e = h = m.run_prelude(x, pos, views)
        from mythos_deploy.model import ACTState
        state = ACTState.zeros(h)
        for t in range(ran):
            h, state = m.run_step(t, h, e, state, 0.9, pos, views[f"recurrent_loop_{t}"], freeze=True)
        want = m.propagated_entries(h, e, pos, list(range(ran, N_LOOPS)))[:, 0, 0].numpy()
    np.testing.assert_allclose(cache[ran:, 0, pos], want, atol=1e-5, rtol=0)
    _, _, ff = _feed(backend, [PROMPT], [1] * len(PROMPT), DecodeOptions(N_LOOPS, 0.9, ExitMode.FILL_FORWARD))
    assert np.abs(ff[ran:, 0, pos] - want).max() > 1e-3


def test_without_halting_propagate_is_exact(backend):
    """When no position halts before the last loop, propagate equals exit none."""
    import copy
    model = copy.deepcopy(backend.model)
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-30.0)
    quiet = EagerBackend(model)
    exact = _feed(quiet, [PROMPT], [4, 6], DecodeOptions(N_LOOPS, 0.9, ExitMode.NONE))
    prop = _feed(quiet, [PROMPT], [4, 6], DecodeOptions(N_LOOPS, 0.9, ExitMode.PROPAGATE))
    assert exact[1].min() == N_LOOPS  # no position halted
    np.testing.assert_allclose(prop[0], exact[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(prop[2], exact[2], atol=1e-6, rtol=0)


def test_loops_computed_fall_once_everything_halted(any_backend, backend):
    runs = {}
    for name, be in (("eager", backend), ("other", any_backend)):
        session = be.start(1, len(PROMPT), PROPAGATE)
        runs[name] = [session.step([[tok]]).loops_run for tok in PROMPT]
    assert min(runs["eager"]) < N_LOOPS and runs["other"] == runs["eager"]


def test_other_exports_refuse_propagate(artifacts, tmp_path):
    import json
    import shutil
    _, od = artifacts[("mla", "unroll")]
    with pytest.raises(InputError, match="does not carry it"):
        load(od).start(1, 8, DecodeOptions(exit="propagate"))
    # a stepped export from before the fill graph (three graphs) still loads, without propagate
    _, src = artifacts[("mla", "stepped")]
    old = tmp_path / "old"
    shutil.copytree(src, old)
    (old / "fill.onnx").unlink()
    m = json.loads((old / "manifest.json").read_text())
    del m["graphs"]["fill"], m["files"]["fill.onnx"]
    (old / "manifest.json").write_text(json.dumps(m))
    backend = load(old)
    assert len(backend.start(1, 8).step([[1, 2]]).logits[0]) == 2
    with pytest.raises(InputError, match="does not carry it"):
        backend.start(1, 8, DecodeOptions(exit="propagate"))


def test_halting_profile_counts_ill_conditioned_positions(backend):
    """A halting head that saturates low: every position is ill-conditioned."""
    import copy

    from mythos_deploy.stats import halting_profile
    model = copy.deepcopy(backend.model)
    assert halting_profile(model)["ill_conditioned_fraction"] < 1.0
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-20.0)
        model.recurrent.act.halt.weight.zero_()
    p = halting_profile(model)
    assert p["ill_conditioned_fraction"] == 1.0 and p["min_cumulative_halt_prob"] < 1e-6
