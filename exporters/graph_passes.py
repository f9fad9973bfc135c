"""Generic graph passes, from onnx_ir: every produced graph goes through `finish` once.

onnx_ir holds tensors by reference (external data included), so these passes do not need a
graph's weights serialised into one protobuf. The project-specific rewrites (composition,
MoE lowering, past slicing, quantization) stay in their own modules.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import PassManager
from onnx_ir.passes.common import (ClearMetadataAndDocStringPass, DeduplicateHashedInitializersPass, NameFixPass,
                                   RemoveUnusedNodesPass, RemoveUnusedOpsetsPass, TopologicalSortPass)

IR_VERSION = 10  # onnx 1.23 writes 11+ by default; onnxruntime 1.31 rejects newer IRs
# initializers hashed for deduplication at most this large (the repeated ones are RoPE tables
# and small constants; hashing every expert table would read the whole model once more)
DEDUP_MAX_ELEMENTS = 1 << 22


def subgraphs(node):
    """The graphs a node carries as attributes (Loop body, If branches, ...)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def iter_graphs(graph):
    """`graph` and every graph nested in it, depth first (protobuf graphs)."""
    yield graph
    for node in graph.node:
        for g in subgraphs(node):
            yield from iter_graphs(g)


class _ScopedNames:
    """Node names for NameFixPass: an unnamed node is called after its op type, prefixed with
    its subgraph's name (`core_step/MatMul_3`), so names are unique across the whole model
    (onnxruntime's quantizers select and exclude nodes by name)."""

    def __init__(self, root: ir.Graph):
        self.root = root

    def generate_node_name(self, node: ir.Node) -> str:
        if node.name:
            return node.name
        graph = node.graph
        scope = f"{graph.name}/" if graph is not None and graph is not self.root and graph.name else ""
        return f"{scope}{node.op_type}"

    def generate_value_name(self, value: ir.Value) -> str:
        return value.name or "v"


def _apply(model, passes):
    """The onnx_ir passes `passes(ir_model)` returns, run on a ModelProto: a new ModelProto."""
    irm = ir.from_proto(model)
    PassManager(passes(irm))(irm)
    out = ir.to_proto(irm)
    out.ir_version = IR_VERSION
    return out


def _run(model, passes) -> None:
    """`_apply`, in place."""
    model.CopyFrom(_apply(model, passes))


def _prune_passes(irm):
    return [RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(), TopologicalSortPass()]


def _clear_value_metadata(irm: ir.Model) -> None:
    """ClearMetadataAndDocStringPass covers nodes and graphs; values carry torch's too."""
    irm.metadata_props.clear()
    for graph in (irm.graph, *irm.graph.subgraphs()):
        for value in (*graph.inputs, *graph.outputs, *(v for node in graph for v in node.outputs)):
            value.doc_string = None
            value.metadata_props.clear()


def clear_metadata(model) -> None:
    """No exporter doc strings or metadata (torch records Python stack traces and module paths
    there: local paths, and most of the bytes of an unrolled graph); our IR version."""
    def passes(irm):
        _clear_value_metadata(irm)
        return [ClearMetadataAndDocStringPass()]
    _run(model, passes)


def finish(model) -> None:
    """One copy of identical initializers (a composed graph brings the prelude's, step's and
    coda's RoPE tables), no dead nodes or initializers, no unused opsets, unique node names,
    nodes in topological order (subgraphs included)."""
    _run(model, lambda irm: [DeduplicateHashedInitializersPass(size_limit=DEDUP_MAX_ELEMENTS), RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(),
                             NameFixPass(_ScopedNames(irm.graph)), TopologicalSortPass()])


def prune(model) -> None:
    """No dead nodes, initializers or opsets; nodes in topological order: after a rewrite such
    as quantization (onnxruntime's quantizers reorder nodes without regard to Loop bodies)."""
    _run(model, _prune_passes)


def pruned(model):
    """`prune` returning a new ModelProto instead of copying the result back into `model`
    (one copy of the weights fewer at the peak; the caller drops `model`)."""
    return _apply(model, _prune_passes)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise,
    and a multi-GB graph freed before the next stage would still count in its peak RSS)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_unused_opsets(model) -> None:
    """No opset imports that no node uses (a lowering that replaced every node of a domain)."""
    _run(model, lambda irm: [RemoveUnusedOpsetsPass()])
