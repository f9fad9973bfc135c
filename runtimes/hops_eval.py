"""Accuracy of the multi-hop demo task (mythos_deploy.hops) through any runtime backend.

For every (hop count, n_loops) cell, `count` problems of that hop count (a fixed seed: every
backend sees the same problems) are prefilled as one batch; the prediction is the greedy
token after `?x=`. The table keeps each problem's prediction, so two backends can be compared
exactly, not just by their accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from mythos_deploy import hops
from mythos_deploy.errors import InputError
from mythos_deploy.options import DecodeOptions
from mythos_deploy.runtimes.base import Backend

DEFAULT_HOPS = (1, 2, 3, 4, 5, 6, 7, 8)
SAMPLE_PROMPT = "k4;q7;mk;rm;cq;wr;?c7;?w4;?k4;"  # ?c: 2 hops, ?w: 4 hops, ?k: 1 hop


def check_task_model(backend: Backend) -> None:
    cfg = backend.cfg
    need = max(hops.encode(hops.LETTERS + hops.DIGITS + ";?")) + 1
    if cfg.vocab_size < need:
        raise InputError(f"this model's vocab_size={cfg.vocab_size} cannot read the hops task "
                         f"(needs byte ids up to {need - 1}); use the demo checkpoint")


def evaluate(backend: Backend, hop_counts: Sequence[int] = DEFAULT_HOPS,
             loops: Sequence[int] = (1, 2, 4, 6, 8, 12), count: int = 100, seed: int = 1234,
             n_statements: int = 8, progress: Callable[[int, int], None] | None = None,
             decode: DecodeOptions = DecodeOptions()) -> dict:
    """Returns {"cells": [{hops, n_loops, accuracy, mean_loops_used, predictions}], ...}.
    Each cell runs at its own loop count (`loops`), with `decode`'s threshold and exit mode."""
    check_task_model(backend)
    if count < 1:
        raise InputError(f"count must be >= 1, got {count}")
    for k in hop_counts:
        if not 1 <= k <= n_statements:
            raise InputError(f"hop counts must be in 1..{n_statements}, got {k}")
    cells, total, done = [], len(hop_counts) * len(loops), 0
    for k in hop_counts:
        problems = hops.eval_set(k, count, seed, n_statements)
        ids = np.array([hops.encode(p.prompt) for p in problems], dtype=np.int64)
        answers = np.array([hops.encode(p.answers)[0] for p in problems])
        # each statement's own hop count, to read the ACT depth at its value character
        envs = [hops.resolve(p.prompt) for p in problems]
        stmt_hops = np.array([[env[p.prompt[i]][0] for i in range(0, n_statements * hops.STATEMENT, hops.STATEMENT)]
                              for p, env in zip(problems, envs)])
        value_pos = np.arange(n_statements) * hops.STATEMENT + 1
        for n in loops:
            session = backend.start(batch=count, budget=ids.shape[1], decode=dataclasses.replace(decode, n_loops=n))
            out = session.step(ids)
            pred = out.logits[:, -1].argmax(-1)
            at_values = out.loops_used[:, value_pos]
            cells.append({"hops": k, "n_loops": n, "accuracy": float((pred == answers).mean()),
                          "mean_loops_used": float(out.loops_used[:, -1].mean()), "loops_run": int(out.loops_run),
                          "statement_loops_by_hop": {int(h): float(at_values[stmt_hops == h].mean())
                                                     for h in np.unique(stmt_hops)},
                          "predictions": hops.decode(pred)})
            done += 1
            if progress:
                progress(done, total)
    return {"hops": list(hop_counts), "loops": list(loops), "count": count, "seed": seed,
            "act_threshold": backend.cfg.act_threshold if decode.act_threshold is None else decode.act_threshold,
            "exit": str(decode.exit),
            "n_statements": n_statements, "trained_loops": backend.default_loops, "cells": cells}


def token_depths(backend: Backend, text: str = SAMPLE_PROMPT, decode: DecodeOptions = DecodeOptions()) -> dict:
    """Per-token ACT depth (loops until halting) for one prompt, prefilled in one call; and the
    loops actually computed per token when the prompt is fed one token per call (as in
    decoding): n_loops each with exit none, fewer with an early exit."""
    check_task_model(backend)
    ids = np.array([hops.encode(text)], dtype=np.int64)
    n = backend.default_loops if decode.n_loops is None else decode.n_loops
    decode = dataclasses.replace(decode, n_loops=n)
    out = backend.start(batch=1, budget=ids.shape[1], decode=decode).step(ids)
    session = backend.start(batch=1, budget=ids.shape[1], decode=decode)
    computed = [session.step(ids[:, i:i + 1]).loops_run for i in range(ids.shape[1])]
    return {"text": text, "n_loops": n, "exit": str(decode.exit), "loops_used": out.loops_used[0].tolist(),
            "loops_computed": computed, "halt_prob": [round(float(p), 4) for p in out.halt_prob[0]],
            "predicted_next": hops.decode(out.logits[0].argmax(-1))}


def table(result: dict, key: str = "accuracy") -> list[list[float]]:
    """Rows = hop counts, columns = n_loops."""
    by = {(c["hops"], c["n_loops"]): c[key] for c in result["cells"]}
    return [[by[(k, n)] for n in result["loops"]] for k in result["hops"]]


def statement_depth(result: dict, n_loops: int) -> dict[int, float]:
    """Mean ACT loops at a statement's value character, by the statement's own hop count,
    over every problem evaluated at `n_loops`."""
    sums: dict[int, list[float]] = {}
    for c in result["cells"]:
        if c["n_loops"] == n_loops:
            for h, v in c["statement_loops_by_hop"].items():
                sums.setdefault(int(h), []).append(v)
    return {h: float(np.mean(v)) for h, v in sorted(sums.items())}


def differences(a: dict, b: dict) -> list[str]:
    """Cells where two results disagree (predictions compared problem by problem)."""
    if (a["hops"], a["loops"], a["count"], a["seed"]) != (b["hops"], b["loops"], b["count"], b["seed"]):
        raise InputError("the two evaluations used different problem sets")
    out = []
    for ca, cb in zip(a["cells"], b["cells"]):
        if ca["predictions"] != cb["predictions"]:
            n = sum(x != y for x, y in zip(ca["predictions"], cb["predictions"]))
            out.append(f"hops={ca['hops']} n_loops={ca['n_loops']}: {n} of {a['count']} predictions differ")
    return out


def plot(result: dict, depths: dict, path) -> None:
    """Accuracy heatmap (hops x n_loops), mean loops used by hops, per-token ACT depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 7.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.2])
    ax = fig.add_subplot(grid[0, 0])
    acc = np.array(table(result))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(result["loops"])), [str(n) for n in result["loops"]])
    ax.set_yticks(range(len(result["hops"])), [str(k) for k in result["hops"]])
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center",
                    color="white" if acc[i, j] < 0.6 else "black", fontsize=8)
    trained = result["trained_loops"]
    if trained in result["loops"]:
        ax.axvline(result["loops"].index(trained), color="red", lw=1, ls="--")
    ax.set_xlabel("n_loops (dashed: trained depth)")
    ax.set_ylabel("hops")
    ax.set_title(f"accuracy ({result['count']} problems per cell)")
    fig.colorbar(im, ax=ax, fraction=0.04)

    ax = fig.add_subplot(grid[0, 1])
    loops_used = np.array(table(result, "mean_loops_used"))
    shown = sorted({n for n in (trained, max(result["loops"])) if n in result["loops"]})
    for n in shown:
        j = result["loops"].index(n)
        ax.plot(result["hops"], loops_used[:, j], marker="o", label=f"query (at its letter), n_loops={n}")
        depth = statement_depth(result, n)
        ax.plot(list(depth), list(depth.values()), marker="s", ls="--",
                label=f"statement (at its value), n_loops={n}")
    ax.axvspan(0.5, 4.5, color="grey", alpha=0.12, label="trained hops")
    ax.set_xlabel("hops (of the query / of the statement)")
    ax.set_ylabel("mean ACT loops")
    ax.set_title("halting depth by difficulty")
    ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[1, :])
    rows = [depths["loops_used"]] + ([depths["loops_computed"]] if "loops_computed" in depths else [])
    d = np.array(rows)
    ax.imshow(d, cmap="magma", aspect="auto", vmin=1, vmax=max(2, depths["n_loops"]))
    ax.set_xticks(range(len(depths["text"])), list(depths["text"]), fontfamily="monospace")
    ax.set_yticks(range(len(rows)), ["ACT depth", f"computed ({depths.get('exit', 'none')})"][:len(rows)], fontsize=8)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v < depths["n_loops"] / 2 + 1 else "black",
                    fontsize=8)
    ax.set_title(f"per token (n_loops={depths['n_loops']}): ACT depth, and loops computed one token per call "
                 "(answers are predicted at the query's letter)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
