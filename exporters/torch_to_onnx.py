"""Torch -> ONNX for the three stepped graphs (prelude, one core step, coda), and for the
whole model with the core in a torch.export `while_loop`.

By default every loop mode is built from the stepped graphs: `stepped` ships them as they are;
`unroll` and `loop` compose them into one graph at the ONNX level (exporters/onnx_compose.py).
`--loop-export while_loop` builds the `loop` graph from `WhileLoopGraph` instead, which
torch.onnx lowers to an ONNX `Loop`. The MoE custom op is emitted as the
`mythos_deploy::MoEExperts` placeholder, which a lowering pass rewrites.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from itertools import count
from pathlib import Path

import torch
from torch import nn

from mythos_deploy.cache import ConcatView
from mythos_deploy.contract import GraphContract, stepped_contracts
from mythos_deploy.model import ACTState, MythosModel

_exported = count()  # unique graph file names in a weight store

TRACE_BATCH, TRACE_SEQ, TRACE_PAST, TRACE_LOOPS = 2, 3, 4, 5  # distinct and > 1: no axis is specialised


class PreludeGraph(nn.Module):
    def __init__(self, model: MythosModel):
        super().__init__()
        self.m = model

    def forward(self, input_ids, past_len, pasts: list[torch.Tensor]):
        views = {f"prelude_{i}": ConcatView(p) for i, p in enumerate(pasts)}
        past = pasts[0].shape[1] if pasts else 0
        e = self.m.run_prelude(input_ids, past_len, views, past)
        return (e, *[v.new for v in views.values()])


class StepGraph(nn.Module):
    def __init__(self, model: MythosModel):
        super().__init__()
        self.m = model

    def forward(self, h, e, h_out, cum, halted, loops_used, loop_index, act_threshold, past_len, past):
        view = ConcatView(past)
        state = ACTState(h_out, cum, halted, loops_used)
        h, state = self.m.run_step(loop_index, h, e, state, act_threshold, past_len, view, past.shape[1])
        return (h, state.h_out, state.cum, state.halted, state.loops_used, view.new)


class FillGraph(nn.Module):
    """exit=propagate: the recurrent cache rows of loops `loop_indices` for positions frozen at
    h (see RecurrentCore.propagated_entries)."""

    def __init__(self, model: MythosModel):
        super().__init__()
        self.m = model

    def forward(self, h, e, loop_indices, past_len):
        return self.m.propagated_entries(h, e, past_len, loop_indices)


class CodaGraph(nn.Module):
    def __init__(self, model: MythosModel):
        super().__init__()
        self.m = model

    def forward(self, h_out, past_len, pasts: list[torch.Tensor]):
        views = {f"coda_{i}": ConcatView(p) for i, p in enumerate(pasts)}
        past = pasts[0].shape[1] if pasts else 0
        logits = self.m.run_coda(h_out, past_len, views, past)
        return (logits, *[v.new for v in views.values()])


class WhileLoopGraph(nn.Module):
    """The `loop` contract (exporters' model_contract) with the core as a torch.export
    while_loop: prelude, then step t while t < n_loops (and, with early_exit, not every
    position has halted), then coda. The recurrent cache's new rows are a loop-carried
    [loops, batch, seq, W] buffer written at row t; rows past the last iteration stay zero."""

    def __init__(self, model: MythosModel):
        super().__init__()
        self.m = model

    def forward(self, input_ids, past_len, n_loops, early_exit, propagate, act_threshold, pasts: list[torch.Tensor]):
        from torch._higher_order_ops.while_loop import while_loop

        P = self.m.cfg.prelude_layers
        pre, rec, coda = pasts[:P], pasts[P], pasts[P + 1:]
        past = rec.shape[2]
        pre_views = {f"prelude_{i}": ConcatView(p) for i, p in enumerate(pre)}
        e = self.m.run_prelude(input_ids, past_len, pre_views, past)
        state = ACTState.zeros(e)
        new_rec = e.new_zeros((rec.shape[0], e.shape[0], e.shape[1], rec.shape[3]))  # [loops, B, T, W]

        def cond(t, h, h_out, cum, halted, loops_used, new_rec):
            return (t < n_loops) & ~(early_exit & halted.all())

        def body(t, h, h_out, cum, halted, loops_used, new_rec):
            view = ConcatView(rec.index_select(0, t.reshape(1)).squeeze(0))
            h_new, s = self.m.run_step(t, h, e, ACTState(h_out, cum, halted, loops_used), act_threshold, past_len,
                                       view, past)
            h_new = torch.where((halted & propagate).unsqueeze(-1), h, h_new)  # exit=propagate: frozen
            return (t + 1, h_new, s.h_out, s.cum, s.halted, s.loops_used,
                    new_rec.index_copy(0, t.reshape(1), view.new[None]))

        t0 = torch.zeros((), dtype=torch.int64)
        # h starts as e but is carried as a copy: a tensor both carried and closed over would alias
        t, h, h_out, cum, _, loops_used, new_rec = while_loop(cond, body, (t0, e.clone(), *state, new_rec))
        # exit=propagate: rows past the last iteration come from the frozen state. Computed for
        # every row and selected (static shapes); the compose route computes only the rows needed.
        rows = torch.arange(new_rec.shape[0], dtype=torch.int64)
        filled = self.m.propagated_entries(h, e, past_len, rows)
        new_rec = torch.where(((rows >= t) & propagate).reshape(-1, 1, 1, 1), filled, new_rec)
        coda_views = {f"coda_{i}": ConcatView(p) for i, p in enumerate(coda)}
        logits = self.m.run_coda(h_out, past_len, coda_views, past)
        return (logits, *[v.new for v in pre_views.values()], new_rec, *[v.new for v in coda_views.values()],
                loops_used, cum, t)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
                 "int32": torch.int32, "bool": torch.bool}
_TRACE_SIZES = {"batch": TRACE_BATCH, "seq": TRACE_SEQ, "past": TRACE_PAST, "loops": TRACE_LOOPS}


def sample_inputs(contract: GraphContract, sizes: dict[str, int], seed: int = 0,
                  vocab: int = 2) -> dict[str, torch.Tensor]:
    """Inputs matching a contract, for tracing and validation."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in contract.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        dt = _TORCH_DTYPES[spec.dtype]
        if spec.name == "input_ids":
            out[spec.name] = torch.randint(0, vocab, shape, generator=g)
        elif spec.name == "past_len":  # [batch]: every row at the full past (tracing needs shapes only)
            out[spec.name] = torch.full(shape, sizes.get("past", 0), dtype=torch.int64)
        elif spec.name == "act_threshold":
            out[spec.name] = torch.tensor(0.99)
        elif spec.name == "loop_index":
            out[spec.name] = torch.tensor(1)
        elif spec.name == "n_loops":
            out[spec.name] = torch.tensor(sizes.get("loops", 1))
        elif dt == torch.bool:
            out[spec.name] = torch.zeros(shape, dtype=dt)
        elif not dt.is_floating_point:
            out[spec.name] = torch.zeros(shape, dtype=dt)
        else:
            out[spec.name] = (torch.randn(shape, generator=g) * 0.5).to(dt)
    return out


def _moe_translation():
    import onnxscript

    from mythos_deploy.contract import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP
    from mythos_deploy.exporters.onnx_ops import register_schemas
    register_schemas()
    opset = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)

    def moe_experts(x, topk_idx, gates, w_gate, w_up, w_down):
        E, F, _ = (int(d) for d in w_gate.shape)
        return getattr(opset, PLACEHOLDER_OP)(x, topk_idx, gates, w_gate, w_up, w_down,
                                              num_experts=E, top_k=int(topk_idx.shape[1]), expert_dim=F)

    return {torch.ops.mythos_deploy.moe_experts.default: moe_experts}


@contextlib.contextmanager
def _quiet():
    """The torch exporter prints progress and warnings to stdout; keep our CLI output clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_graph(module: nn.Module, contract: GraphContract, opset: int, list_arg: bool = False,
                 store: Path | None = None):
    """Export one wrapper module to an onnx.ModelProto named and shaped by its contract.
    With a weight `store` (exporters/external_data.py) the weights are streamed there from
    the torch tensors, tensor by tensor, and the returned graph references them."""
    from torch.export import Dim

    dims = {"batch": Dim("batch", min=1), "seq": Dim("seq", min=1), "past": Dim("past", min=0),
            "loops": Dim("loops", min=1)}
    sizes = dict(_TRACE_SIZES)
    inputs = sample_inputs(contract, sizes)
    names = [s.name for s in contract.inputs]
    specs = {s.name: {ax: dims[sym] for ax, sym in s.dynamic_axes().items()} or None for s in contract.inputs}
    if not list_arg:
        args = tuple(inputs[n] for n in names)
        dynamic = tuple(specs[n] for n in names)
    else:  # trailing cache inputs travel as one list argument
        head = [n for n in names if not n.startswith("past_") or n == "past_len"]
        tail = [n for n in names if n not in head]
        args = (*[inputs[n] for n in head], [inputs[n] for n in tail])
        dynamic = (*[specs[n] for n in head], [specs[n] for n in tail])
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
            input_names=names, output_names=[s.name for s in contract.outputs],
            custom_translation_table=_moe_translation(), optimize=True, verbose=False)
        try:
            if store is None:
                return program.model_proto
            from mythos_deploy.exporters.external_data import load_into_store
            path = Path(store) / f"{contract.name}_{next(_exported)}.onnx"
            try:
                program.save(str(path), external_data=True)
            except OSError as exc:  # numpy's tofile reports a full disk without an errno
                from mythos_deploy.errors import MythosError
                raise MythosError(f"cannot write the export's weight store in {store}: {exc.strerror or exc} "
                                  "(disk full or a file-size limit?); nothing was left half-written") from None
        finally:
            _release_weights(program)
    return load_into_store(path)


def _release_weights(program) -> None:
    """Drop the exported graph's references to the torch weights: onnxscript's rewrite
    rules are module-level objects that keep the last graph they matched alive, which would
    pin the whole model (4 GB at 1b) after it is deleted."""
    import gc
    for graph in program.model.graphs():
        for value in graph.initializers.values():
            value.const_value = None
    for obj in gc.get_objects():  # values the optimizer removed stay referenced by its matchers
        if type(obj).__name__ == "SimplePatternMatcher":
            for attr in ("_graph", "_current_node", "_match"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)


def export_stepped(model: MythosModel, dtype: str, opset: int,
                   store: Path | None = None) -> dict[str, "onnx.ModelProto"]:  # noqa: F821
    """The prelude, step and coda graphs of a model (already cast to the export dtype), and the
    exit=propagate fill graph."""
    model = model.eval()
    prelude_c, step_c, coda_c = stepped_contracts(model.cfg, dtype)
    return {
        "prelude": export_graph(PreludeGraph(model), prelude_c, opset, list_arg=True, store=store),
        "step": export_graph(StepGraph(model), step_c, opset, store=store),
        "coda": export_graph(CodaGraph(model), coda_c, opset, list_arg=True, store=store),
        "fill": export_fill(model, dtype, opset, store=store),
    }


def export_fill(model: MythosModel, dtype: str, opset: int,
                store: Path | None = None) -> "onnx.ModelProto":  # noqa: F821
    """The exit=propagate fill graph (model already cast to the export dtype)."""
    from mythos_deploy.contract import fill_contract
    return export_graph(FillGraph(model.eval()), fill_contract(model.cfg, dtype), opset, store=store)


def export_while_loop(model: MythosModel, contract: GraphContract, opset: int,
                      store: Path | None = None) -> "onnx.ModelProto":  # noqa: F821
    """The `loop` graph through torch.export while_loop (model already cast to the export dtype)."""
    return export_graph(WhileLoopGraph(model.eval()), contract, opset, list_arg=True, store=store)
