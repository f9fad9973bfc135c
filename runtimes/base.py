"""One interface over every backend: a Backend starts Sessions; a Session owns the
preallocated latent cache of one generation and advances it one call at a time.

    backend = mythos_deploy.runtimes.load("out/tiny-onnx")           # or an eager checkpoint directory
    session = backend.start(batch=1, budget=96, decode=DecodeOptions(n_loops=8, exit=ExitMode.NONE))
    out = session.step(prompt_ids)                     # prefill (any T, chunks allowed)
    out = session.step(next_ids)                       # decode, written in place

`exit="none"` runs every loop for every token (OpenMythos's numbers). `exit="propagate"`
(eager, and `loop` exports, inside the graph) freezes a halted position's state and fills its
later recurrent cache slots with the latents those loops compute from it (CALM's state
propagation). `exit="fill-forward"`
stops a call's loop once every position in it has halted and fills that call's remaining
recurrent cache slots with the last computed latent (as Huginn's cache serves a skipped step
from the deepest one computed); measured, not assumed, in benchmarks/fill_forward.py and
benchmarks/hops_fill_forward.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mythos_deploy.config import MythosConfig
from mythos_deploy.errors import CacheError, InputError, NumericalError
from mythos_deploy.manifest import Manifest
from mythos_deploy.options import DecodeOptions, ExitMode, LoopMode, OnnxExportOptions


@dataclass
class StepOutput:
    logits: np.ndarray  # [B,T,V] float32
    loops_used: np.ndarray  # [B,T] int32
    halt_prob: np.ndarray  # [B,T] float32
    loops_run: int  # loops actually computed for this call (< n_loops after an early exit)


def check_ids(ids, cfg: MythosConfig) -> np.ndarray:
    """Token ids as int64 [B,T]; clear errors for everything a native kernel would crash on."""
    arr = np.asarray(ids)
    if arr.dtype == object or arr.dtype.kind not in "iu" and arr.size:
        raise InputError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"token ids must be [batch, seq], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError("the prompt is empty: give at least one token id")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(f"token id {lo if lo < 0 else hi} out of range [0, {cfg.vocab_size})")
    return arr.astype(np.int64, copy=False)


def _is_prefix(rows: np.ndarray, batch: int) -> bool:
    return rows.size == batch and bool((rows == np.arange(batch)).all())


def gather_pasts(buffers: dict, rows: np.ndarray, upto: int, contiguous, index=None) -> dict:
    """The `past_*` inputs of a call on the session rows `rows` (sorted, distinct): views of
    the preallocated buffers where the rows are the whole batch, else a copy of just those
    rows and their first `upto` positions (the longest row's length; graphs ignore rows at or
    past a row's own length, so a shorter buffer than the session's is valid). `contiguous`
    makes an array of the buffers' kind contiguous (numpy or torch); `index` converts `rows`
    for indexing (torch tensors take a tensor)."""
    batch = next(iter(buffers.values())).shape[-3]
    if _is_prefix(rows, batch):
        return dict(buffers)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    sel = slice(lo, hi) if hi - lo == rows.size else (rows if index is None else index(rows))
    out = {}
    for name, buf in buffers.items():
        if name == "past_recurrent":
            out[name] = contiguous(buf[:, sel, :upto])
        else:
            out[name] = buf[sel] if isinstance(sel, slice) else contiguous(buf[sel, :upto])
    return out


def write_new_rows(buffers: dict, out: dict, rows: np.ndarray, starts: np.ndarray, exit: ExitMode,
                   index=None) -> None:
    """Write a call's new cache rows (the graph's `new_*` outputs) into a session's
    preallocated `past_*` buffers (numpy or torch): session row rows[i] at its own positions
    [starts[i], starts[i] + T). Recurrent rows: every row is new with exit=propagate;
    otherwise rows from `loops_run` on repeat row loops_run-1 (fill-forward; nothing to repeat
    when every loop ran). `index` converts index arrays for the buffers (torch takes tensors)."""
    n_loops = buffers["past_recurrent"].shape[0]
    filled = n_loops if exit == ExitMode.PROPAGATE else int(out.get("loops_run", n_loops))
    T = out["new_recurrent"].shape[-2]
    batch = buffers["past_recurrent"].shape[1]
    if _is_prefix(rows, batch) and (starts == starts[0]).all():  # lockstep: plain slices
        b, p = slice(None), slice(int(starts[0]), int(starts[0]) + T)
    else:
        conv = index or (lambda a: a)
        b, p = conv(rows[:, None]), conv(starts[:, None] + np.arange(T))  # [n,1], [n,T]
    for name, buf in buffers.items():
        new = out[name.replace("past_", "new_")]
        if name == "past_recurrent":
            buf[:filled, b, p] = new[:filled]
            if filled < n_loops:
                buf[filled:, b, p] = new[filled - 1]
        else:
            buf[b, p] = new


class Session(ABC):
    """One generation's cache slots. Rows need not move in lockstep: `step_rows` advances any
    subset of rows, each at its own cached length (`lengths`), and `reset_rows` frees rows for
    new requests (what runtimes/engine.py's continuous batching does). `step` advances every
    row together."""
    backend_name = "runtime"
    per_row_positions = True  # False for exports made before per-row positions: lockstep only

    def __init__(self, cfg: MythosConfig, batch: int, budget: int, decode: DecodeOptions):
        """`decode` is resolved (Backend.start): n_loops and act_threshold are set."""
        if decode.n_loops is None or decode.act_threshold is None:
            raise InputError("a session needs resolved decode options (start it with Backend.start)")
        if not 1 <= budget <= cfg.max_seq_len:
            raise CacheError(f"sequence budget must be in [1, max_seq_len={cfg.max_seq_len}], got {budget}")
        self.cfg, self.batch, self.budget, self.decode = cfg, batch, budget, decode
        self.n_loops, self.act_threshold, self.exit = decode.n_loops, float(decode.act_threshold), decode.exit
        self.lengths = np.zeros(batch, np.int64)  # cached positions per row

    @property
    def length(self) -> int:
        """The cached length of a lockstep session (the longest row's)."""
        return int(self.lengths.max())

    def _rows(self, rows, n: int) -> np.ndarray:
        arr = np.asarray(rows, dtype=np.int64).reshape(-1)
        if arr.size != n:
            raise InputError(f"{n} rows of ids for {arr.size} session rows")
        if arr.size and (arr.min() < 0 or arr.max() >= self.batch):
            raise InputError(f"session rows must be in [0, {self.batch}), got {arr.tolist()}")
        if np.unique(arr).size != arr.size or (np.diff(arr) < 0).any():
            raise InputError(f"session rows must be distinct and ascending, got {arr.tolist()}")
        return arr

    def step(self, ids) -> StepOutput:
        """Advance every row by one chunk of ids [batch, T]."""
        ids = check_ids(ids, self.cfg)
        if ids.shape[0] != self.batch:
            raise InputError(f"this session has batch {self.batch}, got {ids.shape[0]} rows")
        return self.step_rows(ids, np.arange(self.batch))

    def step_rows(self, ids, rows, check_finite: bool = True, last_only: bool = False) -> StepOutput:
        """Advance session rows `rows` (ascending) by ids[i] each, every row at its own cached
        length. With `check_finite`, non-finite logits raise NumericalError; without, the
        caller judges each row (the engine fails one request, not its neighbours). With
        `last_only`, logits may hold only the last position ([n, 1, V]; exports that take
        logits_from compute no others)."""
        ids = check_ids(ids, self.cfg)
        rows = self._rows(rows, ids.shape[0])
        starts = self.lengths[rows].copy()
        T = ids.shape[1]
        over = np.flatnonzero(starts + T > self.budget)
        if over.size:
            r = int(rows[over[0]])
            raise CacheError(f"sequence budget exceeded: {int(self.lengths[r])} cached + {T} new > "
                             f"budget {self.budget} (max_seq_len {self.cfg.max_seq_len}) in row {r}")
        if not self.per_row_positions and (starts != starts[0]).any():
            raise InputError("this artifact was exported before per-row positions: rows of one call must all be "
                             "at one cached length; re-export it with this version (mythos-export onnx CKPT -o DIR) "
                             "to batch requests of different lengths")
        out = self._step(ids, rows, starts, last_only)
        self.lengths[rows] = starts + T
        if check_finite and not np.isfinite(out.logits).all():
            bad = np.argwhere(~np.isfinite(out.logits).all(-1))[0]
            start = int(starts[bad[0]])
            stage = "prefill" if start == 0 else "decode"
            raise NumericalError(f"{self.backend_name}: non-finite logits ({stage} step, batch row {int(rows[bad[0]])}, "
                                 f"position {start + bad[1]}); the weights or activations overflowed. "
                                 "This session is unusable; check the model with `mythos-export parity`")
        return out

    def reset_rows(self, rows) -> None:
        """Forget what rows `rows` hold: their next call starts at position 0. Nothing is
        cleared: a row's stale positions are at or past its length, which every graph ignores."""
        self.lengths[np.asarray(rows, dtype=np.int64)] = 0

    @abstractmethod
    def _step(self, ids: np.ndarray, rows: np.ndarray, starts: np.ndarray, last_only: bool = False) -> StepOutput:
        """Run ids [n, T] on session rows `rows` at cached lengths `starts` (both int64 [n])
        and write their new cache rows in place (`last_only`: see step_rows)."""

    @abstractmethod
    def cache_nbytes(self) -> int: ...

    def commit_memory(self) -> None:
        """Touch every cache buffer so its memory is committed now (zero pages are mapped
        lazily): a pool that does not fit fails at start, not mid-request."""


def tokenizer_dir(path: Path) -> Path:
    """Checkpoints and artifacts keep their tokenizer files; an artifact made before they were
    carried on names its source checkpoint."""
    import json

    from mythos_deploy.tokenizer import has_tokenizer
    if has_tokenizer(path):
        return Path(path)
    try:
        src = json.loads((Path(path) / "manifest.json").read_text()).get("source", {}).get("checkpoint")
    except (OSError, ValueError):
        src = None
    return Path(src) if src and has_tokenizer(src) else Path(path)


class Backend(ABC):
    name: str = "backend"
    cfg: MythosConfig
    default_loops: int
    artifact_dir: Path | None = None  # where load() opened it: its tokenizer lives there
    _tokenizer: object = None
    variable_depth: bool = True  # n_loops may differ from default_loops
    fill_forward: bool = True  # exit="fill-forward" supported
    propagate: bool = False  # exit="propagate" supported (the eager backend so far)

    def _read_manifest(self, path, manifest: Manifest) -> OnnxExportOptions:
        """The fields every exported-artifact backend takes from its manifest; returns its
        export options."""
        if not isinstance(manifest, Manifest):
            raise InputError(f"expected a Manifest (Manifest.read(path)), got {type(manifest).__name__}")
        self.path, self.manifest = Path(path), manifest
        self.cfg = MythosConfig.from_dict(manifest.config)
        opts = manifest.options
        self.loop_mode, self.default_loops = opts.loop, opts.loops
        self.variable_depth = self.fill_forward = self.loop_mode != LoopMode.UNROLL
        return opts

    @property
    def tokenizer(self):
        """The artifact's tokenizer (mythos_deploy.tokenizer.Tokenizer), loaded on first use;
        None where the artifact carries none (then give token ids). An artifact made before
        tokenizers were carried falls back to its source checkpoint's."""
        if self._tokenizer is None and self.artifact_dir is not None:
            from mythos_deploy.tokenizer import has_tokenizer, load_tokenizer
            found = tokenizer_dir(self.artifact_dir)
            self._tokenizer = load_tokenizer(found, self.cfg.vocab_size) if has_tokenizer(found) else False
        return self._tokenizer or None

    def start(self, batch: int, budget: int, decode: DecodeOptions = DecodeOptions()) -> Session:
        """A session of `batch` rows and `budget` positions; `decode`'s None fields take this
        artifact's defaults (its trained depth, the config's threshold)."""
        if not isinstance(decode, DecodeOptions):
            raise InputError(f"decode must be DecodeOptions, got {type(decode).__name__}")
        n_loops = self.default_loops if decode.n_loops is None else decode.n_loops
        if not self.variable_depth and n_loops != self.default_loops:
            raise InputError(f"this {self.name} artifact runs exactly n_loops={self.default_loops} (unrolled "
                             f"export); re-export with --loop loop or --loop stepped to vary depth")
        if decode.exit == ExitMode.PROPAGATE and not self.propagate:
            raise InputError(f"exit=propagate runs in the eager backend and in --loop loop / stepped exports made "
                             f"by this version; this {self.name} artifact does not carry it: use exit none or "
                             "fill-forward, or re-export with --loop loop")
        if decode.exit == ExitMode.FILL_FORWARD and not self.fill_forward:
            raise InputError(f"exit=fill-forward needs a --loop loop or --loop stepped export ({self.name} "
                             f"artifact is unrolled)")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch must be an integer >= 1, got {batch!r}")
        threshold = self.cfg.act_threshold if decode.act_threshold is None else decode.act_threshold
        return self._start(batch, budget, DecodeOptions(n_loops, threshold, decode.exit))

    @abstractmethod
    def _start(self, batch: int, budget: int, decode: DecodeOptions) -> Session: ...
