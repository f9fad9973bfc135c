"""Continuous batching (runtimes/engine.py): for any schedule of arrivals, prompt lengths,
chunk sizes and cancellations, every request's tokens equal its tokens running alone."""

import asyncio
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mythos_deploy import InputError
from mythos_deploy.options import DecodeOptions
from mythos_deploy.runtimes import SamplingParams, generate, load, stream_generate
from mythos_deploy.runtimes.eager import EagerBackend
from mythos_deploy.runtimes.engine import Engine, QueueFullError, Request

MAX_LEN = 24


@pytest.fixture(scope="module")
def backends(artifacts, masked_artifacts, tmp_path_factory, tiny_model):
    from tests.runtimes.test_tensorrt_backend import _standin_backend
    out = {"eager": EagerBackend(tiny_model), "ort-loop": load(artifacts[("mla", "loop")][1]),
           "ort-stepped": load(artifacts[("mla", "stepped")][1])}
    out["trt-standin"] = _standin_backend(masked_artifacts[("mla", "loop")][1], tmp_path_factory.mktemp("eng") / "e", [])
    return out


@functools.lru_cache(maxsize=None)
def _solo(backend, prompt: tuple, n: int, sampling: SamplingParams, stops: tuple, exit: str):
    res = generate(backend, list(prompt), n, sampling=sampling, stop_tokens=stops, decode=DecodeOptions(exit=exit))
    return res.tokens[0], res.loops_used[0]


def _requests(draw_spec, vocab):
    reqs = []
    for i, (length, n, seed, greedy, first) in enumerate(draw_spec):
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, vocab, length).tolist()
        sp = SamplingParams() if greedy else SamplingParams(greedy=False, temperature=0.9, top_k=20, top_p=0.95,
                                                            seed=seed)
        reqs.append((Request(prompt, min(n, MAX_LEN - length), sp, stop_ids=(first,) if i % 3 == 2 else (),
                             id=f"r{i}"), 0))
    return reqs


request_specs = st.lists(st.tuples(st.integers(1, 14), st.integers(1, 8), st.integers(0, 10**6), st.booleans(),
                                   st.integers(0, 255)), min_size=1, max_size=6)


def _run_schedule(backend, specs, arrivals, chunk, max_batch, cancel, exit="none"):
    """Submit request i at engine iteration arrivals[i]; cancel the requests in `cancel` after
    iteration 2. Returns {id: result} and the requests."""
    reqs = [r for r, _ in _requests(specs, backend.cfg.vocab_size)]
    eng = Engine(backend, max_batch=max_batch, max_len=MAX_LEN, chunk=chunk, decode=DecodeOptions(exit=exit))
    order = sorted(range(len(reqs)), key=lambda i: arrivals[i % len(arrivals)])
    handles, it = {}, 0
    while len(handles) < len(reqs) or eng.has_work():
        for i in order:
            if reqs[i].id not in handles and arrivals[i % len(arrivals)] <= it:
                handles[reqs[i].id] = eng.submit(reqs[i])
        if it == 2:
            for i in cancel:
                if i < len(reqs) and reqs[i].id in handles:
                    handles[reqs[i].id].cancel()
        eng.step()
        it += 1
    assert eng.stats().free_slots == max_batch and eng.stats().running == 0  # no slot leaks
    return {k: h.snapshot() for k, h in handles.items()}, reqs


@pytest.mark.parametrize("name", ["eager", "ort-loop", "ort-stepped", "trt-standin"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=request_specs, arrivals=st.lists(st.integers(0, 6), min_size=1, max_size=6), chunk=st.integers(1, 9),
       max_batch=st.integers(1, 4), cancel=st.sets(st.integers(0, 5), max_size=2))
def test_any_schedule_gives_solo_tokens(backends, name, specs, arrivals, chunk, max_batch, cancel):
    backend = backends[name]
    results, reqs = _run_schedule(backend, specs, arrivals, chunk, max_batch, cancel)
    for i, r in enumerate(reqs):
        got = results[r.id]
        if got.finish_reason == "cancelled":
            assert i in cancel
            continue
        solo, loops = _solo(backend, tuple(r.prompt), r.max_new_tokens, r.sampling, tuple(r.stop_ids), "none")
        assert got.tokens == solo and got.loops_used == loops, (r, got)
        assert got.finish_reason == ("stop" if r.stop_ids and solo[-1] in r.stop_ids else "length")


@pytest.mark.parametrize("name", ["eager", "ort-loop", "ort-stepped"])
def test_propagate_across_a_batch(backends, name):
    """exit propagate: rows halt at different loops in one call; each still gets its solo tokens."""
    backend = backends[name]
    specs = [(5, 6, 1, True, 0), (11, 6, 2, False, 0), (2, 6, 3, True, 0), (8, 5, 4, True, 0)]
    results, reqs = _run_schedule(backend, specs, [0, 1, 1, 3], 4, 3, set(), exit="propagate")
    for r in reqs:
        solo, loops = _solo(backend, tuple(r.prompt), r.max_new_tokens, r.sampling, tuple(r.stop_ids), "propagate")
        assert results[r.id].tokens == solo and results[r.id].loops_used == loops


def test_logits_within_parity_tolerance(backends):
    backend = backends["ort-loop"]
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8, 2]]
    eng = Engine(backend, max_batch=3, max_len=MAX_LEN, chunk=3)
    handles = [eng.submit(Request(p, 6, keep_logits=True)) for p in prompts]
    eng.run()
    for p, h in zip(prompts, handles):
        ref = [ev.logits[0] for ev in stream_generate(backend, p, 6, return_logits=True)]
        got = [t.logits for t in h.tokens]
        np.testing.assert_allclose(np.stack(got), np.stack(ref), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["eager", "ort-loop"])
def test_garbage_and_nan_in_one_request_leave_its_neighbours_alone(backends, name):
    backend = backends[name]
    prompts = [[5, 6, 7, 8], [9, 10, 11], [1, 2, 3, 4, 5, 6]]
    for poison in (1e4, np.nan):
        eng = Engine(backend, max_batch=3, max_len=MAX_LEN, chunk=8)
        handles = [eng.submit(Request(p, 8)) for p in prompts]
        eng.step()  # every prompt prefilled, first tokens sampled
        victim = handles[1]
        before = len(victim.tokens)
        _poison_rows(eng.session, victim.slot, poison)
        eng.run()
        for i in (0, 2):
            assert handles[i].snapshot().tokens == _solo(backend, tuple(prompts[i]), 8, SamplingParams(), (), "none")[0]
        res = victim.snapshot()
        if np.isnan(poison):
            assert res.finish_reason == "error" and "non-finite logits" in res.error and len(res.tokens) == before
        with pytest.raises(Exception, match="non-finite") if np.isnan(poison) else _nothing():
            list(victim)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _poison_rows(session, slot, value):
    n = int(session.lengths[slot])
    bufs = session.cache.buffers if hasattr(session, "cache") else session.buffers
    for name, buf in bufs.items():
        if name == "past_recurrent":
            buf[:, slot, :n] = value
        else:
            buf[slot, :n] = value


def test_neighbour_at_the_length_limit_and_a_cancelled_one(backends):
    backend = backends["ort-stepped"]
    eng = Engine(backend, max_batch=3, max_len=MAX_LEN, chunk=4)
    full = eng.submit(Request(list(range(1, 11)), MAX_LEN - 10))  # fills its slot to the last position
    gone = eng.submit(Request([4, 4, 4], 12))
    kept = eng.submit(Request([8, 9], 10))
    for _ in range(3):
        eng.step()
    gone.cancel()
    assert gone.done and gone.finish_reason == "cancelled"
    eng.step()
    assert eng.stats().running == 2  # its slot was freed before the next model call
    waiting = eng.submit(Request([3, 3], 5))  # takes the freed slot
    eng.run()
    assert full.snapshot().tokens == _solo(backend, tuple(range(1, 11)), MAX_LEN - 10, SamplingParams(), (), "none")[0]
    assert kept.snapshot().tokens == _solo(backend, (8, 9), 10, SamplingParams(), (), "none")[0]
    assert waiting.snapshot().tokens == _solo(backend, (3, 3), 5, SamplingParams(), (), "none")[0]
    assert len(full.snapshot().tokens) == MAX_LEN - 10 and full.finish_reason == "length"


def test_bad_requests_fail_alone_with_one_line(backends):
    backend = backends["ort-loop"]
    eng = Engine(backend, max_batch=2, max_len=MAX_LEN, max_queue=2)
    ok = eng.submit(Request([1, 2, 3], 4))
    with pytest.raises(InputError, match=r"prompt of 20 tokens \+ max_new_tokens 5 = 25 is longer than a slot \(24"):
        eng.submit(Request(list(range(20)), 5))
    with pytest.raises(InputError, match="out of range"):
        eng.submit(Request([1, 99999], 4))
    with pytest.raises(InputError, match="empty"):
        eng.submit(Request([], 4))
    with pytest.raises(InputError, match="max_new_tokens"):
        eng.submit(Request([1], 0))
    with pytest.raises(InputError, match="temperature"):
        eng.submit(Request([1], 2, SamplingParams(greedy=False, temperature=-1.0)))
    with pytest.raises(InputError, match="stop ids"):
        eng.submit(Request([1], 2, stop_ids=[-3]))
    eng.submit(Request([4], 2))
    with pytest.raises(QueueFullError, match="queue is full"):
        eng.submit(Request([5], 2))
    eng.run()
    assert ok.snapshot().tokens == _solo(backend, (1, 2, 3), 4, SamplingParams(), (), "none")[0]


def test_engine_refusals(backends):
    backend = backends["ort-loop"]
    with pytest.raises(InputError, match="fill-forward"):
        Engine(backend, decode=DecodeOptions(exit="fill-forward"))
    with pytest.raises(InputError, match="lower --max-batch or --max-len"):
        Engine(backend, max_batch=10**7, max_len=64)  # refused before anything is allocated
    with pytest.raises(InputError, match="max_len"):
        Engine(backend, max_len=10**6)


def test_streams_through_asyncio_and_callbacks(backends):
    backend = backends["ort-loop"]
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    seen = {}
    eng = Engine(backend, max_batch=2, max_len=MAX_LEN, chunk=2).start()
    try:
        async def main():
            handles = [eng.submit(Request(p, 7), on_token=lambda h, t: seen.setdefault(h.id, []).append(t))
                       for p in prompts]

            async def collect(h):
                return [t.id async for t in h.aiter()]
            return handles, await asyncio.gather(*(collect(h) for h in handles))
        handles, streamed = asyncio.run(main())
    finally:
        eng.stop()
    assert not eng.running
    for p, h, toks in zip(prompts, handles, streamed):
        solo = _solo(backend, tuple(p), 7, SamplingParams(), (), "none")[0]
        assert toks == solo == [t.id for t in h] == [t.id for t in seen[h.id] if t is not None]
        assert seen[h.id][-1] is None  # the end of the request


def test_ragged_call_on_an_export_without_per_row_positions(artifacts, tmp_path):
    """Artifacts exported before per-row positions (scalar past_len) still run lockstep; a
    ragged call is one line that says how to re-export."""
    import onnx
    from onnx import helper
    from mythos_deploy.manifest import carried_fields, read_manifest, write_manifest
    _, src = artifacts[("mla", "loop")]
    old = tmp_path / "old"
    m = read_manifest(src)
    graph = onnx.load(src / "model.onnx")
    g = graph.graph
    _rename_in(g, "past_len", "past_len/rows")  # every reader, Loop bodies included
    inp = next(i for i in g.input if i.name == "past_len")
    inp.type.tensor_type.shape.ClearField("dim")  # the old scalar input, expanded to the rows
    g.node.insert(0, helper.make_node("Shape", ["input_ids"], ["pl/shape"], end=1))
    g.node.insert(1, helper.make_node("Expand", ["past_len", "pl/shape"], ["past_len/rows"]))
    old.mkdir()
    onnx.save(graph, old / "model.onnx")
    contract = m["contract"]
    for c in contract:
        for i in c["inputs"]:
            if i["name"] == "past_len":
                i["shape"] = []
    write_manifest(old, "onnx", **carried_fields(m))
    b = load(old, verify=False)
    assert b.runner.per_row is False
    ref = generate(load(src), [[1, 2, 3], [4, 5, 6]], 5).tokens
    assert generate(b, [[1, 2, 3], [4, 5, 6]], 5).tokens == ref
    with pytest.raises(InputError, match="exported before per-row positions.*re-export"):
        Engine(b, max_batch=2, max_len=MAX_LEN)
    session = b.start(2, MAX_LEN)
    session.step_rows(np.array([[1, 2, 3]]), [0])
    with pytest.raises(InputError, match="exported before per-row positions.*re-export"):
        session.step_rows(np.array([[4], [5]]), [0, 1])
    one = Engine(b, max_batch=1, max_len=MAX_LEN)  # one slot: every call is one row
    assert one.generate([Request([1, 2, 3], 5)])[0].tokens == ref[0]


def _rename_in(graph, old, new):
    import onnx
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_in(attr.g, old, new)


def test_artifacts_whose_rows_are_coupled_say_so(backends, tmp_path, artifacts):
    """int8 activations (accuracy level 4) make a row's logits depend on its neighbours: the
    engine names it; fp32 exports and level-0 quantizations are batch-independent."""
    from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
    from mythos_deploy.runtimes.engine import batch_coupling
    assert batch_coupling(backends["ort-loop"]) is None and batch_coupling(backends["eager"]) is None
    _, src = artifacts[("mla", "loop")]
    for level, coupled in ((4, True), (0, False)):
        out = tmp_path / f"q{level}"
        quantize_artifact(src, out, QuantizeOptions(mode="int4", accuracy_level=level, accept_accuracy_loss=True))
        note = Engine(load(out), max_batch=2, max_len=MAX_LEN).coupling
        assert (note is not None) == coupled and (not coupled or "--accuracy-level 0" in note)


def test_last_position_logits(artifacts, masked_artifacts):
    """Sliced-past exports take logits_from: the engine's calls return only the last
    position's logits, equal to that position of the full ones; masked exports (TensorRT's)
    return every position."""
    from mythos_deploy.runtimes.onnx_runner import runner_from_dir
    from mythos_deploy.manifest import Manifest
    for loop in ("loop", "stepped", "unroll"):
        od = artifacts[("mla", loop)][1]
        b = load(od)
        ids = np.array([[3, 1, 4, 1, 5, 9]])
        full = b.start(1, 16).step(ids).logits
        last = b.start(1, 16).step_rows(ids, [0], last_only=True).logits
        assert last.shape == (1, 1, full.shape[-1]) and full.shape[1] == 6
        np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)
        runner = runner_from_dir(od, Manifest.read(od))
        with pytest.raises(InputError, match="logits_from"):
            runner.forward(ids, 0, b.start(1, 16).buffers, logits_from=6)
    mb = load(masked_artifacts[("mla", "loop")][1])
    assert mb.start(1, 16).step_rows(np.array([[1, 2, 3]]), [0], last_only=True).logits.shape[1] == 3
