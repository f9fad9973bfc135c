"""The multi-hop variable-resolution task behind the shipped demo checkpoint.

A program is `S` assignments of three characters each, `x7;` (x := 7) or `yx;` (y := x, an
earlier variable), then queries `?y` whose answer is the digit the variable resolves to. A
variable's hop count is the length of its chain: `x7` is 1 hop, `yx` after it 2, and so on.
(No `=`: each lookup is then the classic induction pattern "find where this name stood before,
read what followed", which a small model learns several times faster.) Resolving
k hops needs k dependent lookups, so the answer needs depth that grows with k. Statements of a
chain keep their order but chains are interleaved, so "the nearest digit" is not the answer.

All problems with the same number of statements have the same length (3*S + 2 characters to
the first answer), so whole batches run without padding. Characters are bytes: the demo
checkpoint uses an ASCII byte tokenizer, so `--prompt "a3;ba;?b"` works.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits
STATEMENT = 3  # characters per statement, "xy;"
QUERY = 4  # characters per training query, "?xd;"


@dataclass(frozen=True)
class Problem:
    text: str  # the program and the queries with their answers, e.g. "a7;ba;?b7;"
    answer_pos: tuple[int, ...]  # index in text of each answer digit
    hops: tuple[int, ...]  # hop count of each query

    @property
    def prompt(self) -> str:
        """The text up to the first answer (what the model sees to predict it)."""
        return self.text[:self.answer_pos[0]]

    @property
    def answers(self) -> str:
        return "".join(self.text[i] for i in self.answer_pos)


def _interleave(chains: list[list[str]], rng: random.Random) -> list[str]:
    """Random merge of the chains, each chain's statements kept in order."""
    cursors = [0] * len(chains)
    out: list[str] = []
    pending = [i for i, c in enumerate(chains) for _ in c]
    rng.shuffle(pending)
    for i in pending:
        out.append(chains[i][cursors[i]])
        cursors[i] += 1
    return out


def make_program(rng: random.Random, n_statements: int, lengths: list[int]):
    """Chains with the given lengths (summing to n_statements), distinct single-letter names,
    interleaved. Returns (statements, {variable: (hop, digit)})."""
    if sum(lengths) != n_statements or min(lengths) < 1:
        raise ValueError(f"chain lengths {lengths} do not fill {n_statements} statements")
    names = rng.sample(LETTERS, n_statements)
    chains, resolve, k = [], {}, 0
    for length in lengths:
        digit = rng.choice(DIGITS)
        chain, prev = [], digit
        for hop in range(1, length + 1):
            var = names[k]
            k += 1
            chain.append(f"{var}{prev};")
            resolve[var] = (hop, digit)
            prev = var
        chains.append(chain)
    return _interleave(chains, rng), resolve


def _fill(rng: random.Random, total: int, max_len: int, first: int | None = None) -> list[int]:
    lengths = [first] if first else []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(1, max_len), total - sum(lengths)))
    rng.shuffle(lengths)
    return lengths


def training_problem(rng: random.Random, n_statements: int = 8, max_hops: int = 4,
                     n_queries: int = 4) -> Problem:
    """A program whose chains are at most `max_hops` long and `n_queries` queries, each of a
    hop count drawn uniformly from those present (so deep queries are not rare)."""
    statements, resolve = make_program(rng, n_statements, _fill(rng, n_statements, max_hops))
    text = "".join(statements)
    by_hop: dict[int, list[str]] = {}
    for var, (hop, _) in resolve.items():
        by_hop.setdefault(hop, []).append(var)
    answer_pos, hops = [], []
    for _ in range(n_queries):
        hop = rng.choice(sorted(by_hop))
        var = rng.choice(by_hop[hop])
        text += f"?{var}"
        answer_pos.append(len(text))
        hops.append(hop)
        text += resolve[var][1] + ";"
    return Problem(text, tuple(answer_pos), tuple(hops))


def eval_problem(rng: random.Random, hops: int, n_statements: int = 8, distractor_hops: int = 4) -> Problem:
    """One query of exactly `hops` hops (1..n_statements); the other statements are distractor
    chains of at most `distractor_hops`."""
    if not 1 <= hops <= n_statements:
        raise ValueError(f"hops must be in 1..{n_statements}, got {hops}")
    lengths = _fill(rng, n_statements, distractor_hops, first=hops)
    statements, resolve = make_program(rng, n_statements, lengths)
    var = rng.choice([v for v, (h, _) in resolve.items() if h == hops])
    text = "".join(statements) + f"?{var}"
    return Problem(text + resolve[var][1], (len(text),), (hops,))


def eval_set(hops: int, count: int, seed: int = 1234, n_statements: int = 8) -> list[Problem]:
    rng = random.Random(seed * 1000 + hops)
    return [eval_problem(rng, hops, n_statements) for _ in range(count)]


def resolve(program: str) -> dict[str, tuple[int, str]]:
    """{variable: (hop count, digit)} of a program `x7;yx;...` (statements only)."""
    env: dict[str, tuple[int, str]] = {}
    for i in range(0, len(program) - STATEMENT + 1, STATEMENT):
        var, rhs = program[i], program[i + 1]
        env[var] = (1, rhs) if rhs in DIGITS else (env[rhs][0] + 1, env[rhs][1])
    return env


def encode(text: str) -> list[int]:
    """Byte ids (the demo tokenizer has offset 0)."""
    return list(text.encode("ascii"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("ascii", errors="replace")
