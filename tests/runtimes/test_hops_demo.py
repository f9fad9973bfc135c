"""The shipped demo checkpoint (checkpoints/hops): the task table is the same through every
runtime, prediction by prediction; the model really learned the task; halting varies."""

import pytest

from mythos_deploy.options import DecodeOptions
import torch

from mythos_deploy import hops
from mythos_deploy.runtimes import hops_eval

HOPS = (1, 2, 3, 4, 5, 6, 7, 8)
LOOPS = (1, 2, 4, 6, 8, 12)
COUNT = 40


@pytest.fixture(scope="module")
def eager(demo_checkpoint):
    from mythos_deploy.runtimes import load
    return load(demo_checkpoint)


@pytest.fixture(scope="module")
def eager_table(eager):
    return hops_eval.evaluate(eager, HOPS, LOOPS, COUNT)


def test_accuracy_table_identical_through_onnxruntime_loop(eager_table, demo_exports):
    from mythos_deploy.runtimes import load
    ort = hops_eval.evaluate(load(demo_exports["loop"]), HOPS, LOOPS, COUNT)
    assert hops_eval.differences(eager_table, ort) == []
    assert hops_eval.table(ort) == hops_eval.table(eager_table)
    assert hops_eval.table(ort, "mean_loops_used") == hops_eval.table(eager_table, "mean_loops_used")


def test_accuracy_identical_through_the_unrolled_export(eager_table, demo_exports):
    from mythos_deploy.runtimes import load
    backend = load(demo_exports["unroll"])  # fixed depth: the trained loop count only
    ort = hops_eval.evaluate(backend, HOPS, (backend.default_loops,), COUNT)
    cells = [c for c in eager_table["cells"] if c["n_loops"] == backend.default_loops]
    assert [c["predictions"] for c in ort["cells"]] == [c["predictions"] for c in cells]


def test_the_model_learned_the_trained_range(eager_table):
    acc = {(c["hops"], c["n_loops"]): c["accuracy"] for c in eager_table["cells"]}
    trained = eager_table["trained_loops"]
    for k in (1, 2, 3, 4):  # trained hop counts, at the trained depth
        assert acc[(k, trained)] >= 0.85, (k, acc[(k, trained)])
    # depth matters: one loop cannot resolve a 4-hop chain
    assert acc[(4, 1)] < acc[(4, trained)] - 0.3


def test_halting_depth_differs_across_tokens(eager):
    """In the sample prompt k4;q7;mk;rm;cq;wr;... each statement's value character halts
    after as many loops as its chain has hops."""
    d = hops_eval.token_depths(eager)
    used = d["loops_used"]
    text = d["text"]
    at = {text[i:i + 2]: used[i + 1] for i in range(0, 18, 3)}  # statement -> loops at its value
    assert at["k4"] < at["mk"] < at["rm"] < at["wr"], at  # hops 1 < 2 < 3 < 4
    assert len(set(used)) >= 3
    assert d["loops_computed"] == [d["n_loops"]] * len(text)  # exit none computes every loop
    # with propagate, a token decoded alone computes loops until it halts: its ACT depth
    p = hops_eval.token_depths(eager, decode=DecodeOptions(exit="propagate"))
    assert p["loops_computed"] == p["loops_used"] and sum(p["loops_computed"]) < 0.5 * sum(d["loops_computed"])


def test_halting_depth_grows_with_problem_difficulty(eager_table):
    trained = eager_table["trained_loops"]
    depth = hops_eval.statement_depth(eager_table, trained)
    assert all(depth[h] < depth[h + 1] for h in range(1, 6)), depth  # hops 1..6
    assert depth[1] < 1.5 and depth[4] > 3.5, depth


def test_text_prompt_answers_through_the_cli(demo_checkpoint):
    from typer.testing import CliRunner
    from mythos_deploy.cli import app
    r = CliRunner().invoke(app, ["generate", str(demo_checkpoint), "--prompt", "a3;ba;?b", "--max-new-tokens", "1", "--json"])
    assert r.exit_code == 0, r.output
    import json
    data = json.loads(r.output)
    assert data["tokens"][0] == [ord("3")]


def test_non_ascii_prompt_is_refused_cleanly(demo_checkpoint):
    from typer.testing import CliRunner
    from mythos_deploy.cli import app
    r = CliRunner().invoke(app, ["generate", str(demo_checkpoint), "--prompt", "a3;bä;?b"])
    assert r.exit_code == 2 and "cannot encode: 'ä' (it covers ASCII only)" in r.output and "Traceback" not in r.output


def test_training_is_reproducible():
    from mythos_deploy.train import TrainOptions, train_demo
    opts = TrainOptions(steps=6, batch=4, seed=3, threads=1)
    a, ha = train_demo(opts)
    b, hb = train_demo(opts)
    assert ha[-1]["loss"] == hb[-1]["loss"]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_eval_refuses_a_model_that_cannot_read_the_task():
    from mythos_deploy import MythosConfig, MythosModel
    from mythos_deploy.errors import InputError
    from mythos_deploy.runtimes.eager import EagerBackend
    small = MythosConfig.from_name("tiny").replace(vocab_size=64)
    with pytest.raises(InputError, match="vocab_size=64"):
        hops_eval.evaluate(EagerBackend(MythosModel(small).init_weights(0)), (1,), (1,), 2)


def test_problem_set_matches_hops_module():
    p = hops.eval_set(3, 2, seed=1234)
    assert all(len(x.prompt) == 3 * 8 + 2 for x in p)
