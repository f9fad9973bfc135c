"""The I/O contract: graph input/output names, dtypes, shapes and dynamic axes, as data.

Generated from the config and export options; the exporter, the validation inputs, the
runtimes and the manifest all read it. Symbols in shapes are dynamic axes.

Cache layout (every mode): one tensor per prelude/coda slot `[batch, past, W]`, and the
recurrent slots stacked as `[loops, batch, past, W]` (slot `recurrent_loop_t` is row t).
`W = cfg.cache_width` (MLA: c_kv then the rotated shared RoPE key; GQA: rotated k then v).
The graphs take the past and return only the *new* rows for the input positions
(`new_*`, `[.., batch, seq, W]`): present = past[:past_len] ++ new. `past_len` is int64
`[batch]`: each row has its own cached length, its own RoPE positions and its own mask, so
one call can carry a row with 5 cached tokens beside one with 500. The runtime owns
preallocated buffers and writes the new rows in place, so nothing re-concatenates the cache
per token. Past rows at index >= past_len are ignored, so a runtime may pass a longer
buffer than is filled; past = 0 (an empty cache) is valid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mythos_deploy.config import MythosConfig

# the MoE custom node: the placeholder the torch exporter emits, and the TensorRT plugin node of the
# `plugin` lowering (op type, domain, and the plugin registry namespace/version TensorRT looks up)
PLACEHOLDER_DOMAIN, PLACEHOLDER_OP = "mythos_deploy", "MoEExperts"
PLUGIN_DOMAIN, PLUGIN_OP = "trt.plugins", "MythosMoE"
PLUGIN_NAMESPACE, PLUGIN_VERSION = "mythos_deploy", "1"
FLOAT = {"fp32": "float32", "fp16": "float16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints are fixed, strings are dynamic-axis symbols

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphContract:
    name: str  # graph file stem: model | prelude | step | coda
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(s for s in self.outputs if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": [asdict(s) for s in self.inputs],
                "outputs": [asdict(s) for s in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphContract":
        def specs(items):
            return tuple(TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in items)
        return cls(data["name"], specs(data["inputs"]), specs(data["outputs"]))


# each row's cached length: rows of one call may be at different positions (continuous
# batching). Earlier exports took one scalar for every row; `per_row_positions` tells them apart.
PAST_LEN = TensorSpec("past_len", "int64", ("batch",))


def per_row_positions(past_len_shape) -> bool:
    """Whether a graph's past_len input (its declared shape) takes one length per row; exports
    made before per-row positions take one scalar for the whole batch."""
    return len(tuple(past_len_shape)) == 1


# logits for positions [logits_from, seq) only: an engine needs the last position's (a 256-token
# prefill at vocab 32,000 would return 32 MB), parity all of them (logits_from = 0). Exports
# with the sliced past carry it; others return every position.
LOGITS_FROM = TensorSpec("logits_from", "int64", ())


def contracts_per_row(contracts: list[dict]) -> bool:
    """per_row_positions for every graph of an artifact, from its manifest's contract list."""
    return all(per_row_positions(i["shape"]) for c in contracts for i in c["inputs"] if i["name"] == "past_len")


def _past(name: str, W: int, dt: str, loops=None) -> TensorSpec:
    lead = () if loops is None else (loops,)
    return TensorSpec(f"past_{name}", dt, lead + ("batch", "past", W))


def _new(name: str, W: int, dt: str, loops=None) -> TensorSpec:
    lead = () if loops is None else (loops,)
    return TensorSpec(f"new_{name}", dt, lead + ("batch", "seq", W))


def _logits(cfg: MythosConfig, dt: str, last_logits: bool) -> TensorSpec:
    return TensorSpec("logits", dt, ("batch", "logits_seq" if last_logits else "seq", cfg.vocab_size))


def stepped_contracts(cfg: MythosConfig, dtype: str = "fp32", last_logits: bool = False) -> list[GraphContract]:
    dt, W, D = FLOAT[dtype], cfg.cache_width, cfg.dim
    ids = TensorSpec("input_ids", "int64", ("batch", "seq"))
    past_len = PAST_LEN
    act = [TensorSpec("h_out", "float32", ("batch", "seq", D)), TensorSpec("cum", "float32", ("batch", "seq")),
           TensorSpec("halted", "bool", ("batch", "seq")), TensorSpec("loops_used", "int32", ("batch", "seq"))]
    pre = [f"prelude_{i}" for i in range(cfg.prelude_layers)]
    coda = [f"coda_{i}" for i in range(cfg.coda_layers)]
    prelude = GraphContract(
        "prelude", (ids, past_len, *[_past(s, W, dt) for s in pre]),
        (TensorSpec("e", dt, ("batch", "seq", D)), *[_new(s, W, dt) for s in pre]))
    step = GraphContract(
        "step",
        (TensorSpec("h", dt, ("batch", "seq", D)), TensorSpec("e", dt, ("batch", "seq", D)), *act,
         TensorSpec("loop_index", "int64", ()), TensorSpec("act_threshold", "float32", ()), past_len,
         _past("recurrent", W, dt)),
        (TensorSpec("h_next", dt, ("batch", "seq", D)),
         *[TensorSpec(f"{s.name}_next", s.dtype, s.shape) for s in act], _new("recurrent", W, dt)))
    coda_g = GraphContract(
        "coda", (TensorSpec("h_out", "float32", ("batch", "seq", D)), past_len, *[_past(s, W, dt) for s in coda],
                 *([LOGITS_FROM] if last_logits else [])),
        (_logits(cfg, dt, last_logits), *[_new(s, W, dt) for s in coda]))
    return [prelude, step, coda_g]


def fill_contract(cfg: MythosConfig, dtype: str = "fp32") -> GraphContract:
    """exit=propagate: the recurrent cache rows that loops `loop_indices` compute from a frozen
    state h (the attention entry of RMSNorm_rec(h + L(t) + e)), one batched projection."""
    dt, W, D = FLOAT[dtype], cfg.cache_width, cfg.dim
    return GraphContract(
        "fill", (TensorSpec("h", dt, ("batch", "seq", D)), TensorSpec("e", dt, ("batch", "seq", D)),
                 TensorSpec("loop_indices", "int64", ("loops",)), PAST_LEN),
        (TensorSpec("rows", dt, ("loops", "batch", "seq", W)),))


def model_contract(cfg: MythosConfig, loop_mode: str, n_loops: int, dtype: str = "fp32",
                   last_logits: bool = False) -> GraphContract:
    """The single-graph contract of `unroll` (n_loops fixed) and `loop` (n_loops an input)."""
    dt, W = FLOAT[dtype], cfg.cache_width
    loops = n_loops if loop_mode == "unroll" else "loops"
    pre = [f"prelude_{i}" for i in range(cfg.prelude_layers)]
    coda = [f"coda_{i}" for i in range(cfg.coda_layers)]
    inputs = [TensorSpec("input_ids", "int64", ("batch", "seq")), PAST_LEN]
    if loop_mode == "loop":
        # early_exit=True lets the Loop stop once every position has halted; the rows of
        # new_recurrent past loops_run are then zeros and the runtime fills them (fill-forward).
        # propagate=True (with early_exit) freezes a halted position's state and the graph fills
        # its later rows from that state (exit=propagate).
        inputs += [TensorSpec("n_loops", "int64", ()), TensorSpec("early_exit", "bool", ()),
                   TensorSpec("propagate", "bool", ())]
    inputs += [TensorSpec("act_threshold", "float32", ())]
    inputs += [_past(s, W, dt) for s in pre] + [_past("recurrent", W, dt, loops)] + [_past(s, W, dt) for s in coda]
    inputs += [LOGITS_FROM] if last_logits else []
    outputs = [_logits(cfg, dt, last_logits)]
    outputs += [_new(s, W, dt) for s in pre] + [_new("recurrent", W, dt, loops)] + [_new(s, W, dt) for s in coda]
    outputs += [TensorSpec("loops_used", "int32", ("batch", "seq")), TensorSpec("halt_prob", "float32", ("batch", "seq"))]
    if loop_mode == "loop":  # iterations run (< n_loops after an early exit); rows past it are zero
        outputs.append(TensorSpec("loops_run", "int64", ()))
    return GraphContract("model", tuple(inputs), tuple(outputs))


def contracts_for(cfg: MythosConfig, loop_mode: str, n_loops: int, dtype: str = "fp32",
                  last_logits: bool = False) -> list[GraphContract]:
    """Every graph's contract. `last_logits`: the graph that computes logits takes logits_from
    (exports with the sliced past)."""
    if loop_mode == "stepped":  # and the exit=propagate fill
        return [*stepped_contracts(cfg, dtype, last_logits), fill_contract(cfg, dtype)]
    return [model_contract(cfg, loop_mode, n_loops, dtype, last_logits)]
