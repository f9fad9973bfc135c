"""The multi-hop task generator: answers and hop counts checked by an independent resolver."""

import random

import pytest

from mythos_deploy import hops


def resolve_text(program: str) -> dict[str, tuple[int, str]]:
    """Resolve `x7;yx;` by reading it left to right (a second implementation)."""
    env: dict[str, tuple[int, str]] = {}
    for stmt in filter(None, program.split(";")):
        var, rhs = stmt
        if rhs.isdigit():
            env[var] = (1, rhs)
        else:
            hop, digit = env[rhs]  # KeyError if a variable is used before it is defined
            env[var] = (hop + 1, digit)
    return env


def test_training_problems_resolve():
    rng = random.Random(0)
    for _ in range(300):
        p = hops.training_problem(rng, n_statements=8, max_hops=4, n_queries=4)
        program, queries = p.text[:24], p.text[24:]
        env = resolve_text(program)
        assert len(env) == 8 and max(h for h, _ in env.values()) <= 4
        assert len(p.text) == 24 + 4 * hops.QUERY
        for i, (pos, hop) in enumerate(zip(p.answer_pos, p.hops)):
            var = queries[i * 4 + 1]
            assert p.text[pos - 2:pos] == f"?{var}"
            assert env[var] == (hop, p.text[pos])


@pytest.mark.parametrize("k", [1, 4, 8])
def test_eval_problems_have_exact_hops_and_fixed_length(k):
    problems = hops.eval_set(k, 50, seed=3)
    assert len({len(p.prompt) for p in problems}) == 1 and len(problems[0].prompt) == 26
    for p in problems:
        env = resolve_text(p.prompt[:24])
        var = p.prompt[-1]
        assert env[var] == (k, p.answers)
    assert hops.eval_set(k, 50, seed=3) == problems  # deterministic
    assert hops.eval_set(k, 50, seed=4) != problems


def test_chains_are_interleaved_not_contiguous():
    rng = random.Random(1)
    contiguous = 0
    for _ in range(200):
        statements, resolve = hops.make_program(rng, 8, [4, 4])
        first = [s[0] for s in statements[:4]]
        contiguous += all(resolve[v][1] == resolve[first[0]][1] for v in first) and \
            sorted(resolve[v][0] for v in first) == [1, 2, 3, 4]
    assert contiguous < 40  # 1/C(8,4) = 1/70 of merges keep a chain whole, plus digit collisions


def test_bad_arguments():
    with pytest.raises(ValueError):
        hops.eval_problem(random.Random(0), 9)
    with pytest.raises(ValueError):
        hops.make_program(random.Random(0), 8, [4, 3])
