"""Streaming clients through `mythos-export serve` against the engine in process.

    python -m benchmarks.serve_bench [--preset bench] [--artifact DIR] [--clients 1 4 16]

The artifact (default: a seeded random `bench` checkpoint, no tokenizer, exported with `--loop
loop --moe ort`) is served on a loopback port with 16 slots. For c clients at once, each
streams one completion (prompt ids of 8-256 tokens, 64 new tokens, greedy); without a
tokenizer the server sends one SSE chunk per token (its id), so chunk times are token times.
Reported: aggregate tokens/s, time to first token and inter-token latency p50/p99; the same
requests through the engine in process (Engine.generate) for the HTTP overhead; with
`--triton`, aggregate tokens/s of the same weights behind tritonserver (non-streaming). The server
process is started and stopped here, by its id.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_json


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, seconds: float = 120.0) -> None:
    """Poll `url` until it answers 200 (a server just started)."""
    import httpx
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def make_artifact(root: Path, preset: str, seed: int, tokenizer: bool = False) -> Path:
    from mythos_deploy import MythosConfig, MythosModel, save_checkpoint
    from mythos_deploy.exporters.onnx_export import export_onnx
    from mythos_deploy.options import OnnxExportOptions
    from mythos_deploy.tokenizer import ByteTokenizer
    cfg = MythosConfig.from_name(preset)
    name = "loop-tok" if tokenizer else "loop"
    save_checkpoint(MythosModel(cfg).init_weights(seed).eval(), root / f"ck-{name}",
                    tokenizer=ByteTokenizer().files() if tokenizer else None)
    export_onnx(root / f"ck-{name}", root / name, OnnxExportOptions(loop="loop", moe="ort", validate=False))
    return root / name


def triton_rows(root: Path, preset: str, seed: int, clients: list[int], n: int, lo: int, hi: int,
                max_batch: int, max_len: int) -> list[dict]:
    """The same weights behind tritonserver (the repository `triton-repo` writes), non-streaming
    `generate` requests, c at a time: aggregate tokens/s. The artifact carries the byte
    tokenizer (Triton's text_input needs one; it has no EOS, so each request makes n tokens),
    prompts are random ASCII of lo-hi bytes (one token each)."""
    import httpx
    path = make_artifact(root, preset, seed, tokenizer=True)
    cli = Path(sys.executable).parent / "mythos-export"
    repo = root / "repo"
    subprocess.run([str(cli), "triton-repo", str(path), "-o", str(repo), "--name", "bench", "--max-batch",
                    str(max_batch), "--max-len", str(max_len)], check=True, capture_output=True)
    ports = [_port() for _ in range(3)]
    proc = subprocess.Popen([str(cli), "triton-serve", str(repo), "--http-port", str(ports[0]), "--grpc-port",
                             str(ports[1]), "--metrics-port", str(ports[2])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports[0]}/v2/models/bench"
    rows = []
    try:
        wait_ready(url + "/ready")
        rng = np.random.default_rng(seed)

        def one(text):
            httpx.post(url + "/generate", json={"text_input": text, "max_tokens": n, "temperature": 0.0}, timeout=600)
        one("warm up")
        for c in clients:
            texts = ["".join(chr(int(x)) for x in rng.integers(97, 123, int(rng.integers(lo, hi + 1)))) for _ in range(c)]
            threads = [threading.Thread(target=one, args=(t,)) for t in texts]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            rows.append({"clients": c, "tokens": c * n, "seconds": wall, "tokens_per_s": c * n / wall})
            print(f"{c} clients through tritonserver: {c * n / wall:.1f} tok/s", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return rows


def prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def stream_one(url: str, model: str, prompt: list[int], n: int, out: dict) -> None:
    import httpx
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    times, tokens = [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                times.append(time.perf_counter())
                tokens += [int(t) for t in text.split()]
    out.update(t0=t0, times=times, tokens=tokens)


def summarize(results: list[dict], wall: float) -> dict:
    from mythos_deploy.runtimes.engine import percentile
    ttft = [r["times"][0] - r["t0"] for r in results if r["times"]]
    itl = [g for r in results for g in np.diff(r["times"]).tolist()]
    n = sum(len(r["tokens"]) for r in results)
    return {"tokens": n, "seconds": wall, "tokens_per_s": n / wall,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "itl_p50_ms": percentile(itl, 50) * 1e3, "itl_p99_ms": percentile(itl, 99) * 1e3}


def http_run(url: str, model: str, reqs: list[list[int]], n: int) -> tuple[dict, list]:
    outs = [{} for _ in reqs]
    threads = [threading.Thread(target=stream_one, args=(url, model, p, n, o)) for p, o in zip(reqs, outs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(outs, time.perf_counter() - t0), [o["tokens"] for o in outs]


def in_process(path: Path, reqs: list[list[int]], n: int, max_batch: int, max_len: int) -> tuple[dict, list]:
    from mythos_deploy.runtimes import load
    from mythos_deploy.runtimes.engine import Engine, Request
    eng = Engine(load(path), max_batch=max_batch, max_len=max_len)
    t0 = time.perf_counter()
    res = eng.generate([Request(p, n) for p in reqs])
    wall = time.perf_counter() - t0
    outs = [{"t0": t0, "times": r.token_times, "tokens": r.tokens} for r in res]
    return summarize(outs, wall), [r.tokens for r in res]


def _rss_mb(pid: int) -> float:
    import re
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def soak(url: str, pid: int, path: Path, n: int, vocab: int, seed: int, workers: int = 8) -> dict:
    """`n` streaming requests, `workers` at a time, random prompt lengths, lengths and seeds;
    about a quarter dropped after a few chunks. Judged: every request that was not dropped
    returns its solo output (the engine in process, one at a time), the server's running
    requests return to zero, its RSS stays flat (last tenth within 5% + 16 MB of the first)."""
    import httpx
    from mythos_deploy.runtimes import SamplingParams, load
    from mythos_deploy.runtimes.engine import Engine, Request
    rng = np.random.default_rng(seed)
    specs = [dict(prompt=rng.integers(0, vocab, int(rng.integers(1, 64))).tolist(), max_tokens=int(rng.integers(1, 24)),
                  temperature=float(rng.choice([0.0, 0.8])), seed=int(rng.integers(1 << 31)),
                  drop=int(rng.integers(1, 4)) if rng.random() < 0.25 else 0) for _ in range(n)]
    got: list = [None] * n
    rss: list = []
    lock = threading.Lock()
    todo = list(range(n))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
                if i % max(1, n // 10) == 0:
                    rss.append((i, round(_rss_mb(pid), 1)))
            sp = specs[i]
            body = {"model": "bench", "prompt": sp["prompt"], "max_tokens": sp["max_tokens"],
                    "temperature": sp["temperature"], "seed": sp["seed"], "stream": True}
            toks, chunks = [], 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunks += 1
                    toks += [int(t) for t in json.loads(line[6:])["choices"][0]["text"].split()]
                    if sp["drop"] and chunks >= sp["drop"]:
                        break  # the client goes away mid-stream
            got[i] = None if sp["drop"] else toks
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    deadline = time.time() + 30
    while time.time() < deadline:
        text = httpx.get(url + "/metrics").text
        running = float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("mythos_running_requests ")))
        if running == 0:
            break
        time.sleep(0.2)
    rss.append((n, round(_rss_mb(pid), 1)))
    eng = Engine(load(path), max_batch=1, max_len=96)
    solo = eng.generate([Request(sp["prompt"], sp["max_tokens"],
                                 SamplingParams(greedy=sp["temperature"] == 0, temperature=sp["temperature"] or 1.0,
                                                seed=sp["seed"])) for sp in specs])
    kept = [i for i in range(n) if not specs[i]["drop"]]
    mismatches = [i for i in kept if got[i] != solo[i].tokens]
    first, last = rss[0][1], rss[-1][1]
    return {"requests": n, "dropped": n - len(kept), "seconds": round(seconds, 1), "solo_mismatches": mismatches,
            "running_after": running, "server_rss_mb_by_request": rss, "memory_flat": last <= first * 1.05 + 16}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/serve_bench.json")
    ap.add_argument("--triton", action="store_true", help="also the same weights behind tritonserver "
                                                          "(needs .venv-triton from make install)")
    ap.add_argument("--soak", type=int, default=0, help="instead: this many streaming requests with random drops "
                                                        "(results in serve_soak.json)")
    args = ap.parse_args(argv)
    if args.soak:
        args.clients, args.max_prompt, args.new_tokens = [8], 64, 32
    max_batch, max_len = max(args.clients), args.max_prompt + args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.artifact) if args.artifact else make_artifact(Path(tmp), args.preset, args.seed)
        from mythos_deploy.manifest import Manifest
        vocab = Manifest.read(path).config["vocab_size"]
        port = _port()
        cli = Path(sys.executable).parent / "mythos-export"
        server = subprocess.Popen([str(cli), "serve", str(path), "--port", str(port), "--max-batch", str(max_batch),
                                   "--max-len", str(max_len), "--model-name", "bench"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        rows = []
        try:
            wait_ready(url + "/health")
            http_run(url, "bench", prompts(vocab, 2, 8, 16, 999), 4)  # warm-up
            if args.soak:
                r = soak(url, server.pid, path, args.soak, vocab, args.seed)
                print(f"{r['requests']} requests ({r['dropped']} dropped) in {r['seconds']} s: solo mismatches "
                      f"{len(r['solo_mismatches'])}, running after {r['running_after']}, memory flat {r['memory_flat']}")
                out = args.out if args.out != "benchmarks/results/serve_bench.json" else "benchmarks/results/serve_soak.json"
                print(f"wrote {write_json(out, {'benchmark': 'serve_soak', **r})}")
                return r
            for c in args.clients:
                reqs = prompts(vocab, c, args.min_prompt, args.max_prompt, args.seed + c)
                h, h_tokens = http_run(url, "bench", reqs, args.new_tokens)
                e, e_tokens = in_process(path, reqs, args.new_tokens, max_batch, max_len)
                rows.append({"clients": c, "http": h, "in_process": e, "same_tokens": h_tokens == e_tokens,
                             "http_vs_in_process": h["tokens_per_s"] / e["tokens_per_s"]})
                print(f"{c} clients: HTTP {h['tokens_per_s']:.1f} tok/s (ttft p50 {h['ttft_p50_ms']:.0f} ms, itl "
                      f"p50/p99 {h['itl_p50_ms']:.1f}/{h['itl_p99_ms']:.1f} ms); in process {e['tokens_per_s']:.1f} "
                      f"tok/s; HTTP/in-process {rows[-1]['http_vs_in_process']:.2f}; same tokens {rows[-1]['same_tokens']}",
                      flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        triton = (triton_rows(Path(tmp), args.preset, args.seed, args.clients, args.new_tokens, args.min_prompt,
                              args.max_prompt, max_batch, max_len) if args.triton else
                  "not measured (--triton)")
    one = next((r for r in rows if r["clients"] == 1), None)
    data = {"benchmark": "serve_bench", "artifact": str(path), "new_tokens": args.new_tokens,
            "prompt_lengths": [args.min_prompt, args.max_prompt], "slots": max_batch, "rows": rows,
            "scaling_vs_one_client": {r["clients"]: r["http"]["tokens_per_s"] / one["http"]["tokens_per_s"]
                                      for r in rows} if one else {},
            "triton": triton}
    path_out = write_json(args.out, data)
    print(f"wrote {path_out}")
    return data


if __name__ == "__main__":
    main()
