"""Soak benchmark: many generated tokens through onnxruntime, memory and latency over time.

    python -m benchmarks.soak [--preset bench] [--steps 10000] [--batch 1 --batch 4]
    python -m benchmarks.soak --engine-requests 1000    # continuous batching (engine_soak)

The cache budget policy is the runtime's own: a session holds at most max_seq_len positions,
preallocated; at the limit the generation ends and a new session starts (a fresh prompt,
like a serving loop taking the next request). Per batch size this records, in one process:
resident memory (VmRSS) after every session, and decode latency by position bucket in every
session. Flat means: RSS after the last session within 5% (+16 MB) of after the first, and
the last session's mean latency within 10% of the first's (see summarize). The growth of
attention cost with position inside a session is reported, not judged.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_json

BUCKET = 256


def rss_mb() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def soak(backend, batch: int, steps: int, prompt_len: int = 32, seed: int = 0) -> dict:
    cfg = backend.cfg
    per_session = cfg.max_seq_len - prompt_len
    rng = np.random.default_rng(seed)
    sessions, done = [], 0
    while done < steps:
        n = min(per_session, steps - done)
        prompt = rng.integers(0, cfg.vocab_size, size=(batch, prompt_len))
        session = backend.start(batch=batch, budget=prompt_len + n)
        out = session.step(prompt)
        nxt = out.logits[:, -1].argmax(-1)[:, None]
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = session.step(nxt)
            times.append(time.perf_counter() - t0)
            nxt = out.logits[:, -1].argmax(-1)[:, None]
        done += n
        buckets = [float(np.mean(times[i:i + BUCKET]) * 1e3) for i in range(0, len(times), BUCKET)]
        sessions.append({"tokens": n, "rss_mb": round(rss_mb(), 1), "ms_by_position_bucket": buckets,
                         "mean_ms": float(np.mean(times) * 1e3)})
        del session
    return {"batch": batch, "steps": steps, "session_tokens": per_session, "sessions": sessions,
            **summarize(sessions)}


def engine_soak(backend, n_requests: int, max_batch: int = 8, max_len: int = 96, seed: int = 0) -> dict:
    """`n_requests` requests of random prompt lengths, new tokens and sampling through the
    batching engine, arriving a few per iteration, a fifth of them cancelled at a random later
    iteration. Judged: every request that was not cancelled gets the tokens `generate` gives it
    alone; the pool's slots all come back; RSS after the last tenth within 5% (+16 MB) of after
    the first."""
    from mythos_deploy.runtimes import SamplingParams, generate
    from mythos_deploy.runtimes.engine import Engine, Request
    rng = np.random.default_rng(seed)
    cfg = backend.cfg
    eng = Engine(backend, max_batch=max_batch, max_len=max_len, chunk=16, max_queue=n_requests)
    reqs, cancel_at = [], {}
    for i in range(n_requests):
        length = int(rng.integers(1, 48))
        sp = SamplingParams() if rng.random() < 0.5 else SamplingParams(greedy=False, temperature=0.8, top_p=0.9,
                                                                          seed=int(rng.integers(1 << 31)))
        reqs.append(Request(rng.integers(0, cfg.vocab_size, length).tolist(), int(rng.integers(1, 17)), sp, id=str(i)))
        if rng.random() < 0.2:
            cancel_at[str(i)] = int(rng.integers(0, 6))
    handles, pending, it, rss_trace = {}, list(reqs), 0, []
    t0 = time.perf_counter()
    while pending or eng.has_work():
        for _ in range(int(rng.integers(0, 4))):
            if pending:
                r = pending.pop(0)
                handles[r.id] = (eng.submit(r), it)
        for rid, (h, born) in handles.items():
            if rid in cancel_at and it - born == cancel_at[rid]:
                h.cancel()
        eng.step()
        it += 1
        if len(handles) % max(1, n_requests // 10) == 0 and (not rss_trace or rss_trace[-1][0] != len(handles)):
            rss_trace.append((len(handles), round(rss_mb(), 1)))
    seconds = time.perf_counter() - t0
    mismatches, done, cancelled = [], 0, 0
    for r in reqs:
        res = handles[r.id][0].snapshot()
        if res.finish_reason == "cancelled":
            cancelled += 1
            continue
        done += 1
        solo = generate(backend, list(r.prompt), r.max_new_tokens, sampling=r.sampling).tokens[0]
        if res.tokens != solo:
            mismatches.append(r.id)
    stats = eng.stats()
    first, last = rss_trace[0][1], rss_trace[-1][1]
    return {"requests": n_requests, "completed": done, "cancelled": cancelled, "iterations": it,
            "seconds": round(seconds, 1), "tokens": stats.tokens, "solo_mismatches": mismatches,
            "slots_free_at_end": stats.free_slots, "slots": max_batch, "rss_mb_by_requests_submitted": rss_trace,
            "memory_flat": last <= first * 1.05 + 16, "no_slot_leak": stats.free_slots == max_batch and stats.running == 0}


def summarize(sessions: list[dict]) -> dict:
    """Flat memory: RSS after the last session within 5% (+16 MB) of after the first. No
    slowdown: the last session's mean decode latency within 10% of the first's (single
    256-token buckets vary by +-15% on a shared 2-core machine, so they are reported only)."""
    first, last = sessions[0], sessions[-1]
    common = min(len(first["ms_by_position_bucket"]), len(last["ms_by_position_bucket"]))
    by_bucket = [b / a for a, b in zip(first["ms_by_position_bucket"][:common],
                                       last["ms_by_position_bucket"][:common])]
    rss_growth = last["rss_mb"] - first["rss_mb"]
    ratio = last["mean_ms"] / first["mean_ms"]
    b0 = first["ms_by_position_bucket"]
    return {
        "rss_growth_mb_after_first_session": round(rss_growth, 1),
        "memory_flat": rss_growth <= 0.05 * first["rss_mb"] + 16,
        "slowdown_last_vs_first_session_mean": round(ratio, 3),
        "slowdown_last_vs_first_session_by_bucket": [round(x, 3) for x in by_bucket],
        "no_slowdown": ratio <= 1.10,
        "attention_growth_in_session": round(b0[-1] / b0[0], 3) if len(b0) > 1 else None,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--steps", type=int, default=10_000, help="decode steps per batch size")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=None, help="override the preset's (shorter sessions)")
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    ap.add_argument("--engine-requests", type=int, default=0, help="instead: this many requests through the "
                                                                    "batching engine (random lengths, cancellations)")
    args = ap.parse_args(argv)
    if args.engine_requests:
        return main_engine(args)

    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    from mythos_deploy import MythosConfig, MythosModel, save_checkpoint
    import mythos_deploy.runtimes

    cfg = MythosConfig.from_name(args.preset)
    if args.max_seq_len:
        cfg = cfg.replace(max_seq_len=args.max_seq_len)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ck, ox = Path(tmp) / "ck", Path(tmp) / "ox"
        save_checkpoint(MythosModel(cfg).init_weights(0), ck)
        export_onnx(ck, ox, OnnxExportOptions(loop="loop", validate=False))
        backend = mythos_deploy.runtimes.load(ox, threads=args.threads)
        for batch in args.batch or [1, 4]:
            t0 = time.perf_counter()
            r = soak(backend, batch, args.steps)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(f"batch {batch}: {args.steps} tokens in {r['seconds']} s, RSS growth "
                  f"{r['rss_growth_mb_after_first_session']} MB (flat: {r['memory_flat']}), last/first session "
                  f"latency {r['slowdown_last_vs_first_session_mean']} (no slowdown: {r['no_slowdown']})", flush=True)
    data = {"preset": args.preset, "max_seq_len": cfg.max_seq_len, "backend": "onnxruntime loop/standard fp32",
            "results": results}
    write_json(args.out, data)
    return data


def main_engine(args) -> dict:
    from mythos_deploy import MythosConfig, MythosModel, save_checkpoint
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    import mythos_deploy.runtimes
    cfg = MythosConfig.from_name(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        ck, ox = Path(tmp) / "ck", Path(tmp) / "ox"
        save_checkpoint(MythosModel(cfg).init_weights(0), ck)
        export_onnx(ck, ox, OnnxExportOptions(loop="loop", moe="ort", validate=False))
        r = engine_soak(mythos_deploy.runtimes.load(ox, threads=args.threads), args.engine_requests)
    print(f"{r['requests']} requests ({r['cancelled']} cancelled) in {r['seconds']} s: solo mismatches "
          f"{len(r['solo_mismatches'])}, memory flat {r['memory_flat']}, no slot leak {r['no_slot_leak']}")
    out = args.out if args.out != "benchmarks/results/soak.json" else "benchmarks/results/soak_engine.json"
    print(f"wrote {write_json(out, {'benchmark': 'soak_engine', 'preset': args.preset, **r})}")
    return r


if __name__ == "__main__":
    main()
