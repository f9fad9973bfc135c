"""Checks on files from strangers, run before onnx or onnxruntime read them.

ONNX external data names files by a `location` string; onnx and onnxruntime have had
path-traversal bugs with absolute paths, `..` and symlinks. We refuse any location that is
absolute, climbs with `..`, or resolves (symlinks followed) outside the artifact directory.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from mythos_deploy.errors import CheckpointError


def _tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(g)


def external_locations(onnx_path: str | Path) -> list[str]:
    """Every external-data location an ONNX file names (the file is parsed, no data read)."""
    import onnx
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CheckpointError(f"{onnx_path} is not a readable ONNX file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    out = []
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            out.append(loc if loc is not None else "")
    return out


def check_external_data(onnx_path: str | Path, root: str | Path | None = None) -> None:
    """Refuse external-data locations that could read outside `root` (default: the file's
    directory)."""
    onnx_path = Path(onnx_path)
    root = Path(root if root is not None else onnx_path.parent).resolve()
    for loc in external_locations(onnx_path):
        posix, win = PurePosixPath(loc), PureWindowsPath(loc)
        if not loc or posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
            raise CheckpointError(f"{onnx_path}: external data location {loc!r} is not a plain relative path; refused")
        target = (onnx_path.parent / loc).resolve()
        if root != target and root not in target.parents:
            raise CheckpointError(f"{onnx_path}: external data {loc!r} resolves outside {root}; refused")
