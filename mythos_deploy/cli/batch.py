"""`generate` with several requests: prompts or a JSONL file, run together through the
continuous-batching engine, printed per request."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import typer
from rich.markup import escape

from mythos_deploy.cli.app import err, out, parse_ids
from mythos_deploy.errors import InputError
from mythos_deploy.options import DecodeOptions
from mythos_deploy.runtimes.engine import Engine, Request
from mythos_deploy.runtimes.sampling import SamplingParams

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
REQUEST_KEYS = {"prompt", "prompt_ids", "max_new_tokens", "stop_ids", "id", *SAMPLING_KEYS}


def read_requests(path: Path, max_new_tokens: int, params: SamplingParams, stops: list[int]) -> list[Request]:
    """One request per JSONL line; fields a line leaves out take the command's options."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the requests file {path}: {exc}") from None
    reqs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(d, dict) or ("prompt" in d) == ("prompt_ids" in d):
            raise InputError(f'{path}:{n}: each line is an object with "prompt" (text) or "prompt_ids" (ids)')
        unknown = set(d) - REQUEST_KEYS
        if unknown:
            raise InputError(f"{path}:{n}: unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(REQUEST_KEYS))})")
        prompt = d.get("prompt", d.get("prompt_ids"))
        if "prompt" in d and not isinstance(prompt, str):
            raise InputError(f'{path}:{n}: "prompt" must be a string')
        sp = params
        given = {k: d[k] for k in SAMPLING_KEYS if k in d}
        if given:
            sampled = any(k in given for k in ("temperature", "top_k", "top_p"))
            sp = replace(params, greedy=params.greedy and not sampled, **given)
        reqs.append(Request(prompt, d.get("max_new_tokens", max_new_tokens), sp, d.get("stop_ids", stops),
                            id=str(d["id"]) if "id" in d else f"{n}"))
    if not reqs:
        raise InputError(f"{path} holds no requests")
    return reqs


def run_batch(backend, prompts: list[str], prompt_ids: list[str], requests: Path | None, max_new_tokens: int,
              params: SamplingParams, stops: list[int], decode: DecodeOptions, max_length: int | None,
              max_batch: int, chunk: int, as_json: bool) -> None:
    reqs = [Request(p, max_new_tokens, params, stops, id=str(i)) for i, p in enumerate(prompts, 1)]
    reqs += [Request(parse_ids(p, "--prompt-ids"), max_new_tokens, params, stops, id=str(len(reqs) + i))
             for i, p in enumerate(prompt_ids, 1)]
    if requests is not None:
        reqs += read_requests(requests, max_new_tokens, params, stops)
    tok = backend.tokenizer
    lengths = []
    for r in reqs:  # the slot size: the longest request (one that fails to encode fails alone, below)
        try:
            n = len(tok.encode(r.prompt)) if isinstance(r.prompt, str) and tok else len(r.prompt)
        except InputError:
            n = 0
        lengths.append(n + (r.max_new_tokens if isinstance(r.max_new_tokens, int) else 0))
    slot = max_length or min(backend.cfg.max_seq_len, max(2, *lengths))
    engine = Engine(backend, max_batch=min(max_batch, len(reqs)), max_len=slot, chunk=chunk, decode=decode,
                    max_queue=len(reqs))
    if engine.coupling:
        err.print(f"[yellow]note: {escape(engine.coupling)}[/yellow]")
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    wall = time.perf_counter() - t0
    total = sum(len(r.tokens) for r in results)
    if as_json:
        rows = [{"id": r.id, "prompt": r.prompt, "tokens": r.tokens, "loops_used": r.loops_used,
                 "text": tok.decode(r.tokens) if tok else None, "finish_reason": r.finish_reason,
                 "error": r.error, "ttft_seconds": r.ttft} for r in results]
        print(json.dumps({"backend": backend.name, "max_batch": engine.max_batch, "seconds": wall,
                          "tokens": total, "requests": rows}))
    else:
        _print(backend, engine, results, tok, total, wall)
    if any(r.error for r in results):  # every other request was answered; the exit status says one failed
        raise typer.Exit(2)


def _print(backend, engine, results, tok, total: int, wall: float) -> None:
    for r in results:
        text = tok.decode(r.tokens) if tok else " ".join(map(str, r.tokens))
        out.print(f"[bold]\\[{escape(r.id)}][/bold] {escape(text)}", highlight=False)
        if r.error:
            err.print(f"[red]\\[{escape(r.id)}] error: {escape(r.error)}[/red]")
    rate = f"{total / wall:.1f}" if wall > 0 else math.inf
    err.print(f"[dim]{escape(backend.name)}: {len(results)} requests, {total} tokens in {wall:.2f} s "
              f"({rate} tok/s together, at most {engine.max_batch} at once)[/dim]")
