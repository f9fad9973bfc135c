"""Continuous batching: many requests at once over one pool of cache slots.

    engine = Engine(mythos_deploy.runtimes.load("out/hops-onnx"), max_batch=8, max_len=256)
    handle = engine.submit(Request(prompt_ids, max_new_tokens=32, sampling=SamplingParams(...)))
    engine.run()                       # or engine.start() to run on a background thread
    handle.result().tokens             # or `for tok in handle` / `async for tok in handle.aiter()`

The engine owns one Session of `max_batch` rows x `max_len` positions, preallocated once (the
memory model sizes it and refuses a pool that will not fit). Each row is a slot. A request is
admitted when a slot frees up; its prompt is prefilled in chunks of at most `chunk` tokens,
and each engine iteration runs at most `chunk` prompt tokens before one decode call that
advances every decoding request by one token, each at its own cached length. So a long
prompt stalls the others for at most one chunk.

The invariant: a request's tokens never depend on its neighbours. Each row attends only to
its own positions, routes and halts per position, and samples from its own seeded generator
(seeded sampling gives its solo tokens). Exit `none` and `propagate` hold it across a batch (a
halted row freezes while its neighbours loop); `fill-forward` does not (a call's loop stops
when all its rows halted, so a row's cache would depend on its neighbours) and is refused.

A request that fails (non-finite logits in its row) ends with an error; its neighbours go on.
Cancelling a request frees its slot before the next model call.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from mythos_deploy.errors import InputError, MythosError, NumericalError
from mythos_deploy.options import DecodeOptions, ExitMode
from mythos_deploy.plan import check_pool
from mythos_deploy.runtimes.base import Backend, check_ids
from mythos_deploy.runtimes.sampling import SamplingParams, sample


def batch_coupling(backend: Backend) -> str | None:
    """Why this artifact's arithmetic lets a row's numbers depend on the other rows of its call,
    or None. Measured: onnxruntime's int8 activation quantization (MatMulNBits / QMoE at
    accuracy level 4) moved a 1b int4 row's logits by 1.3% of their scale between batch 1 and
    4 (bench int4 decode: 1.4e-3; level 0: 2.5e-6, as fp32), and the standard lowering's int8
    experts quantize activations per tensor."""
    manifest = getattr(backend, "manifest", None)
    q = manifest.get("quantization") if manifest is not None else None
    if not isinstance(q, dict) or q.get("mode") not in ("int8", "int4"):
        return None
    if q.get("accuracy_level") == 4:
        return (f"{q['mode']} with int8 activations (--accuracy-level 4): a row's logits depend slightly on its "
                "neighbours (quantize with --accuracy-level 0 for batch-independent answers)")
    if q.get("mode") == "int8" and manifest.options.moe == "standard":
        return ("int8 experts of the standard lowering quantize activations per tensor: a row's logits depend "
                "on its neighbours (export with --moe ort)")
    return None


class QueueFullError(InputError):
    """The engine's request queue is full: try again later (a server answers 503/429)."""


@dataclass(frozen=True)
class Request:
    """One generation: its prompt (token ids, or text for the artifact's tokenizer), how many
    tokens at most, how to sample, where to stop."""
    prompt: Sequence[int] | str
    max_new_tokens: int = 32
    sampling: SamplingParams = SamplingParams()
    stop_ids: Sequence[int] = ()
    id: str | None = None
    keep_logits: bool = False  # each Token carries its position's logits (parity checks)


@dataclass(frozen=True)
class Token:
    id: int
    index: int  # 0 for the token after the prompt
    loops_used: int  # recurrent loops its position ran before halting
    halt_prob: float
    time: float  # time.perf_counter() when it was sampled
    logits: np.ndarray | None = None  # [V], with Request.keep_logits


@dataclass
class RequestResult:
    id: str
    prompt: list[int]
    tokens: list[int]  # generated ids (a stop id included, nothing after it)
    loops_used: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    error: str | None
    submitted: float
    first_token: float | None
    finished: float | None
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    def inter_token(self) -> list[float]:
        return np.diff(self.token_times).tolist() if len(self.token_times) > 1 else []


_END = object()


class RequestHandle:
    """A submitted request: stream its tokens (iterate, `aiter()`, or an `on_token` callback),
    wait for its result, or cancel it. Thread-safe."""

    def __init__(self, engine: "Engine", request: Request, rid: str, on_token: Callable | None):
        self.engine, self.request, self.id = engine, request, rid
        self.prompt = [int(t) for t in request.prompt]
        self.tokens: list[Token] = []
        self.state = "queued"  # queued | prefill | decode | done
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self.finished_at: float | None = None
        self._on_token = on_token
        self._cond = threading.Condition()
        self._async: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._cancel = False
        # engine-side state
        self.slot = -1
        self.prefilled = 0
        self.pending: int | None = None  # the last sampled token, fed by the next decode call
        self.generator = torch.Generator().manual_seed(int(request.sampling.seed))
        self.stops = {int(s) for s in request.stop_ids}

    # ---- the caller's side --------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this request: its slot is freed before the engine's next model call."""
        self.engine._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def result(self, timeout: float | None = None) -> RequestResult:
        """Block until the request ends (driving the engine here if no thread runs it)."""
        self._drive(lambda: self.done)
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.snapshot()

    def _drive(self, ready: Callable[[], bool]) -> None:
        while not self.engine.running and not ready() and self.engine.step():
            pass

    def snapshot(self) -> RequestResult:
        with self._cond:
            toks = list(self.tokens)
            return RequestResult(self.id, self.prompt, [t.id for t in toks], [t.loops_used for t in toks],
                                 self.finish_reason or "running", self.error, self.submitted,
                                 toks[0].time if toks else None, self.finished_at, [t.time for t in toks])

    def __iter__(self) -> Iterator[Token]:
        """Tokens as they arrive; raises the request's error if it failed."""
        i = 0
        while True:
            self._drive(lambda: i < len(self.tokens) or self.done)
            with self._cond:
                self._cond.wait_for(lambda: i < len(self.tokens) or self.done)
                if i >= len(self.tokens):
                    break
                tok = self.tokens[i]
            i += 1
            yield tok
        if self.finish_reason == "error":
            raise NumericalError(self.error)

    async def aiter(self):
        """`async for token in handle.aiter()`: the engine must run on its own thread
        (Engine.start); tokens are handed to this event loop as they are sampled."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._cond:
            for tok in self.tokens:
                q.put_nowait(tok)
            if self.done:
                q.put_nowait(_END)
            else:
                self._async.append((loop, q))
        while True:
            item = await q.get()
            if item is _END:
                break
            yield item
        if self.finish_reason == "error":
            raise NumericalError(self.error)

    # ---- the engine's side --------------------------------------------------------------
    def _emit(self, tok: Token) -> None:
        with self._cond:
            self.tokens.append(tok)
            self._cond.notify_all()
            subs = list(self._async)
        for loop, q in subs:
            loop.call_soon_threadsafe(q.put_nowait, tok)
        if self._on_token is not None:
            self._on_token(self, tok)

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self.finish_reason, self.error, self.state = reason, error, "done"
            self.finished_at = time.perf_counter()
            self._cond.notify_all()
            subs, self._async = self._async, []
        for loop, q in subs:
            loop.call_soon_threadsafe(q.put_nowait, _END)
        if self._on_token is not None:
            self._on_token(self, None)


@dataclass
class EngineStats:
    queued: int
    running: int
    free_slots: int
    submitted: int
    completed: int
    tokens: int
    steps: int


class Engine:
    """Continuous batching over one backend (eager, onnxruntime, TensorRT)."""

    def __init__(self, backend: Backend, max_batch: int = 8, max_len: int | None = None, chunk: int = 64,
                 max_queue: int = 256, decode: DecodeOptions = DecodeOptions(), check_memory: bool = True):
        if not isinstance(backend, Backend):
            raise InputError(f"expected a Backend (mythos_deploy.runtimes.load), got {type(backend).__name__}")
        for name, v, lo in (("max_batch", max_batch, 1), ("chunk", chunk, 1), ("max_queue", max_queue, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")
        cfg = backend.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_seq_len:
            raise InputError(f"max_len must be an integer in [2, max_seq_len={cfg.max_seq_len}], got {max_len!r}")
        if decode.exit == ExitMode.FILL_FORWARD:
            raise InputError("the batching engine runs exit none or propagate: with fill-forward a call's loop stops "
                             "when all its rows halted, so one request's cache would depend on its neighbours")
        n_loops = backend.default_loops if decode.n_loops is None else decode.n_loops
        if check_memory:
            check_pool(cfg, n_loops, max_batch, max_len, getattr(backend, "cache_itemsize", 4))
        self.backend, self.cfg = backend, cfg
        self.max_batch, self.max_len, self.chunk, self.max_queue = max_batch, max_len, chunk, max_queue
        self.coupling = batch_coupling(backend)  # None: every answer equals the request's solo run
        self.session = backend.start(max_batch, max_len, decode)
        if max_batch > 1 and not self.session.per_row_positions:
            raise InputError("this artifact was exported before per-row positions, so its rows cannot be at "
                             "different lengths: re-export it with this version (mythos-export onnx CKPT -o DIR) "
                             "to batch requests, or run with max_batch 1")
        self.session.commit_memory()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._slots: list[RequestHandle | None] = [None] * max_batch
        self._ids = 0
        self.submitted = self.completed = self.tokens_out = self.steps = 0
        # time inside model calls: prefill chunks, decode calls and the rows those advanced
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_rows = 0
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- admission ----------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Everything that would fail a request, checked before it takes a place in the queue."""
        if not isinstance(request, Request):
            raise InputError(f"expected a Request, got {type(request).__name__}")
        prompt = list(request.prompt) if not isinstance(request.prompt, (str, bytes)) else None
        if prompt is None or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise InputError("the prompt must be a list of integer token ids")
        check_ids(np.array(prompt, dtype=np.int64), self.cfg)
        n = request.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if len(prompt) + n > self.max_len:
            raise InputError(f"prompt of {len(prompt)} tokens + max_new_tokens {n} = {len(prompt) + n} is longer "
                             f"than a slot ({self.max_len} positions)")
        if not isinstance(request.sampling, SamplingParams):
            raise InputError(f"sampling must be SamplingParams, got {type(request.sampling).__name__}")
        if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s < self.cfg.vocab_size
                   for s in request.stop_ids):
            raise InputError(f"stop ids must be token ids in [0, {self.cfg.vocab_size}), got {list(request.stop_ids)}")

    def encode(self, request: Request) -> Request:
        """A request whose prompt is text, with its prompt encoded by the artifact's tokenizer."""
        if not isinstance(request, Request) or not isinstance(request.prompt, str):
            return request
        tok = self.backend.tokenizer
        if tok is None:
            raise InputError("this artifact carries no tokenizer: give the prompt as token ids")
        return replace(request, prompt=tok.encode(request.prompt))

    def submit(self, request: Request, on_token: Callable | None = None) -> RequestHandle:
        """Queue a request (its prompt as token ids, or text for the artifact's tokenizer);
        raises InputError for a bad one, QueueFullError when the queue is full.
        `on_token(handle, token)` is called on the engine's thread for every token, and with
        token None when the request ends."""
        request = self.encode(request)
        self.check_request(request)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); try again later")
            self._ids += 1
            handle = RequestHandle(self, request, request.id or f"req-{self._ids}", on_token)
            self._queue.append(handle)
            self.submitted += 1
            self._wake.notify_all()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        """The request ends now for its caller; a slot it holds is freed at the start of the
        engine's next iteration, before any model call (the engine thread owns the slots)."""
        with self._lock:
            if handle.done:
                return
            if handle.state == "queued":
                self._queue.remove(handle)
            handle._finish("cancelled")
            self.completed += 1
            self._wake.notify_all()

    def _reap(self) -> None:
        with self._lock:
            for h in self._slots:
                if h is not None and h.done:
                    self._free(h)

    def _free(self, handle: RequestHandle) -> None:
        if handle.slot >= 0 and self._slots[handle.slot] is handle:
            self._slots[handle.slot] = None
            self.session.reset_rows([handle.slot])
        handle.slot = -1

    def _end(self, handle: RequestHandle, reason: str, error: str | None = None) -> None:
        with self._lock:
            self._free(handle)
            if not handle.done:
                handle._finish(reason, error)
                self.completed += 1

    def _admit(self) -> None:
        with self._lock:
            for slot in range(self.max_batch):
                if not self._queue:
                    return
                if self._slots[slot] is None:
                    h = self._queue.popleft()
                    h.slot, h.state, h.prefilled = slot, "prefill", 0
                    self._slots[slot] = h

    # ---- one iteration ------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._lock:
            running = sum(h is not None for h in self._slots)
            return EngineStats(len(self._queue), running, self.max_batch - running, self.submitted,
                               self.completed, self.tokens_out, self.steps)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue) or any(h is not None for h in self._slots)

    def step(self) -> bool:
        """One iteration: admit, prefill up to `chunk` prompt tokens, one decode call for
        every decoding request. Returns whether work remains."""
        self._reap()
        self._admit()
        budget = self.chunk
        while budget > 0:
            with self._lock:
                pre = [h for h in self._slots if h is not None and h.state == "prefill" and not h.done]
            if not pre:
                break
            h = min(pre, key=lambda r: r.submitted)
            n = min(budget, len(h.prompt) - h.prefilled)
            ids = np.array([h.prompt[h.prefilled:h.prefilled + n]], dtype=np.int64)
            t0 = time.perf_counter()
            out = self._call(ids, [h])
            self.prefill_seconds += time.perf_counter() - t0
            budget -= n
            if out is None:
                continue
            h.prefilled += n
            if h.prefilled == len(h.prompt):
                self._sample([h], out)
        with self._lock:
            dec = [h for h in self._slots if h is not None and h.state == "decode" and not h.done]
        if dec:
            ids = np.array([[h.pending] for h in dec], dtype=np.int64)
            t0 = time.perf_counter()
            out = self._call(ids, dec)
            self.decode_seconds += time.perf_counter() - t0
            self.decode_rows += len(dec)
            if out is not None:
                self._sample(dec, out)
        self.steps += 1
        return self.has_work()

    def _call(self, ids: np.ndarray, handles: list[RequestHandle]):
        """One model call on the handles' slots; a failure ends those requests alone."""
        rows = np.array([h.slot for h in handles], dtype=np.int64)
        order = np.argsort(rows)
        try:
            out = self.session.step_rows(ids[order], rows[order], check_finite=False, last_only=True)
        except MythosError as exc:
            for h in handles:
                self._end(h, "error", str(exc))
            return None
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return out.logits[inv, -1], out.loops_used[inv, -1], out.halt_prob[inv, -1]

    def _sample(self, handles: list[RequestHandle], out) -> None:
        logits, used, halt = out
        now = time.perf_counter()
        ok = np.isfinite(logits).all(-1)
        greedy = [i for i, h in enumerate(handles) if ok[i] and h.request.sampling.is_greedy
                  and h.request.sampling.repetition_penalty == 1.0]
        picks = {}
        if greedy:
            picks.update(zip(greedy, logits[greedy].argmax(-1).tolist()))
        for i, h in enumerate(handles):
            if h.done:  # cancelled during the call
                continue
            if not ok[i]:
                self._end(h, "error", f"{self.session.backend_name}: non-finite logits in request {h.id} at position "
                                      f"{int(self.session.lengths[h.slot]) - 1}; the weights or activations overflowed")
                continue
            if i not in picks:
                sp = h.request.sampling
                seen = None
                if sp.repetition_penalty != 1.0:
                    seen = torch.tensor([h.prompt + [t.id for t in h.tokens]], dtype=torch.int64)
                picks[i] = int(sample(torch.from_numpy(np.ascontiguousarray(logits[i:i + 1])), sp, h.generator,
                                      seen)[0])
            tok = picks[i]
            h.state, h.pending = "decode", tok
            h._emit(Token(tok, len(h.tokens), int(used[i]), float(halt[i]), now,
                          logits[i].copy() if h.request.keep_logits else None))
            self.tokens_out += 1
            if tok in h.stops:
                self._end(h, "stop")
            elif len(h.tokens) >= h.request.max_new_tokens:
                self._end(h, "length")

    # ---- driving ------------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Drive the engine on this thread until every request has ended (or `until()`)."""
        while self.step():
            if until is not None and until():
                return

    def generate(self, requests: Sequence[Request]) -> list[RequestResult]:
        """Run every request together (submitting as the queue has room) and return their
        results in order. A bad request fails alone: its result has finish_reason "error"."""
        results: list[RequestResult | RequestHandle] = []
        for r in requests:
            try:
                r = self.encode(r)
                self.check_request(r)
                results.append(r)
            except InputError as exc:
                now = time.perf_counter()
                results.append(RequestResult(getattr(r, "id", None) or f"req-{len(results) + 1}",
                                             [], [], [], "error", str(exc), now, None, now))
        pending = [i for i, r in enumerate(results) if isinstance(r, Request)]
        while pending or self.has_work():
            while pending and len(self._queue) < self.max_queue:
                i = pending.pop(0)
                results[i] = self.submit(results[i])
            if self.running:
                time.sleep(0.01)
            else:
                self.step()
        return [r.snapshot() if isinstance(r, RequestHandle) else r for r in results]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run the engine on a background thread (what a server does)."""
        if self.running:
            return self
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mythos-engine", daemon=True)
        self._thread.start()
        return self

    def _unfinished(self) -> list[RequestHandle]:
        """Every request holding a slot or waiting for one (call with the lock held)."""
        return [h for h in self._slots if h is not None] + list(self._queue)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._stop or self.has_work())
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug: end every request with it rather than hang their clients
                with self._lock:
                    victims = self._unfinished()
                    self._queue.clear()
                for h in victims:
                    self._end(h, "error", f"internal error: {type(exc).__name__}: {exc}")

    def stop(self, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the background thread; `cancel` ends every request still queued or running."""
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if cancel:
            with self._lock:
                victims = self._unfinished()
            for h in victims:
                h.cancel()


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan
