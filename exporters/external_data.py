"""Graphs whose weights never sit in one protobuf: a weight store, and a streaming writer.

A model past protobuf's 2 GiB cannot be serialised in memory, and holding its weights as
`raw_data` costs their size again on top of the torch model. Large exports therefore keep
their weights in a *store*: one scratch directory of raw tensor files. In memory, a graph's
large initializers are external TensorProtos whose `location` is an absolute path into the
store, so every pass can read them (`tensor_array`, memory-mapped), onnx_ir keeps them by
reference, and new large tensors (the MoE lowering's fused tables) go to the store too
(`new_tensor`, `new_tensor_rows`, one axis-0 chunk at a time). Absolute locations never reach
an artifact: `write_model` copies each tensor's bytes, in chunks, into `<graph>.onnx.data`
next to the graph and writes relative locations.

The threshold (`external_bytes`, default 1 GiB; `MYTHOS_EXTERNAL_DATA_BYTES` overrides it) decides
both when an export uses the store and when an artifact's graph keeps its weights in an
external file; the tests lower it to run this path on the tiny preset.
"""

from __future__ import annotations

import os
from itertools import count
from pathlib import Path
from typing import Iterable

import numpy as np

DEFAULT_EXTERNAL_BYTES = 1 << 30
MIN_EXTERNAL_TENSOR = 1024  # smaller tensors stay inline (shapes, axes, scalars)
_CHUNK = 64 << 20
_ALIGN = 4096
_names = count()


def external_bytes_threshold(default: int = DEFAULT_EXTERNAL_BYTES) -> int:
    """Bytes of weights above which graphs keep them in external data (MYTHOS_EXTERNAL_DATA_BYTES)."""
    from mythos_deploy.options import env_int
    return max(0, env_int("MYTHOS_EXTERNAL_DATA_BYTES", default, "bytes"))


def _info(t) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_external(t) -> bool:
    from onnx import TensorProto
    return t.data_location == TensorProto.EXTERNAL


def _np_dtype(t) -> np.dtype:
    return _np_dtype_of(t.data_type)


def _packed_bits(data_type: int) -> int:
    """Bits per element of the ONNX types stored several to a byte (int4, uint4, float4,
    int2, uint2), else 0."""
    from onnx import TensorProto
    names = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}
    return next((b for n, b in names.items() if getattr(TensorProto, n, None) == data_type), 0)


def _data_bytes(data_type: int, shape) -> int:
    n = int(np.prod(shape, dtype=np.int64))
    bits = _packed_bits(data_type)
    return -(-n * bits // 8) if bits else n * _np_dtype_of(data_type).itemsize


def _np_dtype_of(data_type: int) -> np.dtype:
    from onnx import helper
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def _onnx_dtype(dtype: np.dtype) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def tensor_nbytes(t) -> int:
    """Bytes of a tensor's data, inline or external, without reading it (packed for int4)."""
    if is_external(t):
        return int(_info(t).get("length", 0))
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return _data_bytes(t.data_type, t.dims)


def raw_bytes(t) -> bytes:
    """An inline tensor's data as ONNX stores it (int4 packed two to a byte)."""
    from onnx import numpy_helper
    return t.raw_data if t.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _source(t, base_dir: Path | None) -> tuple[Path, int, int]:
    info = _info(t)
    path = Path(info["location"])
    if not path.is_absolute():
        if base_dir is None:
            from mythos_deploy.errors import InternalError
            raise InternalError(f"tensor {t.name!r} has relative external data {path} and no base directory")
        path = Path(base_dir) / path
    return path, int(info.get("offset", 0)), int(info.get("length", path.stat().st_size))


def _checked_source(t, base_dir: Path | None) -> tuple[Path, int, int, np.dtype, tuple[int, ...]]:
    """An external tensor's file, offset, length, dtype and shape, its length checked against its shape."""
    path, offset, length = _source(t, base_dir)
    dtype = _np_dtype(t)
    shape = tuple(int(d) for d in t.dims)
    if _data_bytes(t.data_type, shape) != length:
        from mythos_deploy.errors import CheckpointError
        raise CheckpointError(f"external data of {t.name!r} holds {length} bytes, its shape {shape} needs "
                              f"{_data_bytes(t.data_type, shape)}")
    return path, offset, length, dtype, shape


def _stored_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _inline(t, data: bytes) -> None:
    """Make `t` an inline tensor holding `data` (its bytes as ONNX stores them)."""
    from onnx import TensorProto
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    t.raw_data = data


def tensor_array(t, base_dir: Path | None = None) -> np.ndarray:
    """A tensor's value. External data is memory-mapped read-only (no copy; pages are read
    as they are touched and can be dropped again by the kernel)."""
    from onnx import numpy_helper
    if not is_external(t):
        return numpy_helper.to_array(t)
    path, offset, length, dtype, shape = _checked_source(t, base_dir)
    if length == 0:
        return np.zeros(shape, dtype)
    if _packed_bits(t.data_type):  # several elements to a byte: unpacked by onnx, from a copy
        inline = type(t)()
        inline.CopyFrom(t)
        _inline(inline, _stored_bytes(path, offset, length))
        return numpy_helper.to_array(inline)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class RowReader:
    """An external [N, ...] tensor read a slice of rows at a time with plain file reads (a
    memory map would keep every page it touched resident: a 2 GB table read expert by
    expert would still end up counted whole in the process's RSS)."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), shape
        self.ndim = len(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            from mythos_deploy.errors import InternalError
            raise InternalError("RowReader takes contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        n = max(0, stop - start)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            data = np.fromfile(f, dtype=self.dtype, count=n * self.row_bytes // self.dtype.itemsize)
        return data.reshape((n, *self.shape[1:]))

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


def tensor_rows(t, base_dir: Path | None = None):
    """A tensor for row-by-row reading: a RowReader when external, else its array."""
    if not is_external(t) or len(t.dims) == 0:
        return tensor_array(t, base_dir)
    path, offset, _, dtype, shape = _checked_source(t, base_dir)
    return RowReader(path, offset, dtype, shape)


def _external_proto(name: str, dtype: np.dtype, shape: tuple[int, ...], location: str, offset: int, length: int):
    from onnx import TensorProto, helper
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    t.dims.extend(int(d) for d in shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


STORE_MARK = ".mythos-weight-store"


def make_store(directory: Path) -> Path:
    """Mark `directory` as a weight store: new large tensors of graphs living in it go there."""
    directory = Path(directory).resolve()
    (directory / STORE_MARK).touch()
    return directory


STORE_KEY = "mythos.weight_store"  # metadata of a model in memory; write_model drops it


def use_store(model, directory: Path) -> None:
    """Send `model`'s new large tensors to the store `directory` (see make_store), also when
    its weights are read in place from an artifact that must not be written to."""
    drop_store_key(model)
    model.metadata_props.add(key=STORE_KEY, value=str(Path(directory).resolve()))


def drop_store_key(model) -> None:
    keep = [p for p in model.metadata_props if p.key != STORE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def clear_store(directory: Path) -> None:
    """Remove the tensors new_tensor_rows wrote into the store `directory` (the mark stays):
    for a caller done with every model that referenced them."""
    for t in Path(directory).glob("t*_*.bin"):
        t.unlink()


def store_dir(model) -> Path | None:
    """The weight store a model's initializers live in (None: the model holds its weights,
    or reads them from an artifact it must not write to), or the one `use_store` named."""
    from mythos_deploy.exporters.graph_passes import iter_graphs
    for p in model.metadata_props:
        if p.key == STORE_KEY:
            return Path(p.value)
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if is_external(t):
                loc = Path(_info(t)["location"])
                if loc.is_absolute() and (loc.parent / STORE_MARK).exists():
                    return loc.parent
    return None


def materialize(model, keep_external=lambda t: False) -> int:
    """Read external tensors back inline (for code that needs `raw_data`, such as
    onnxruntime's quantizers), except those `keep_external` selects. Returns bytes read."""
    from mythos_deploy.exporters.graph_passes import iter_graphs
    done = 0
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if is_external(t) and not keep_external(t):
                path, offset, length, _, _ = _checked_source(t, None)
                _inline(t, _stored_bytes(path, offset, length))  # the bytes as stored (int4 stays packed)
                done += length
    return done


def new_tensor_rows(model, name: str, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]):
    """A new initializer made of axis-0 chunks. In a store-backed model it is written to the
    store one chunk at a time (never whole in memory); otherwise it is an inline tensor."""
    from onnx import numpy_helper
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    store = store_dir(model)
    if store is None or nbytes < MIN_EXTERNAL_TENSOR or _packed_bits(_onnx_dtype(dtype)):  # int4: inline, packed
        parts = [np.asarray(c, dtype) for c in chunks]
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return numpy_helper.from_array(np.ascontiguousarray(arr.reshape(shape)), name)
    path = store / f"t{os.getpid()}_{next(_names)}.bin"
    written = 0
    with open(path, "wb") as f:
        for c in chunks:
            b = np.ascontiguousarray(c, dtype)
            f.write(memoryview(b).cast("B"))
            written += b.nbytes
    if written != nbytes:
        from mythos_deploy.errors import InternalError
        raise InternalError(f"tensor {name!r}: wrote {written} bytes for shape {shape} ({nbytes})")
    return _external_proto(name, dtype, shape, str(path), 0, nbytes)


def new_tensor(model, array: np.ndarray, name: str):
    """A new initializer for `model`: in its store when the model has one and it is large."""
    array = np.asarray(array)
    return new_tensor_rows(model, name, array.shape, array.dtype, [array])


def adopt(model, base_dir: Path) -> None:
    """Make a loaded model's relative external locations absolute (paths into `base_dir`)."""
    from mythos_deploy.exporters.graph_passes import iter_graphs
    base = Path(base_dir).resolve()
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if is_external(t):
                for e in t.external_data:
                    if e.key == "location" and not Path(e.value).is_absolute():
                        e.value = str(base / e.value)


def load_into_store(path: Path):
    """A graph file written by the torch exporter into the store: its protobuf only, with
    the store's absolute paths as external locations."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    adopt(model, make_store(Path(path).parent))
    return model


def _copy_range(src: Path, offset: int, length: int, out) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            buf = f.read(min(_CHUNK, left))
            if not buf:
                from mythos_deploy.errors import CheckpointError
                raise CheckpointError(f"external data file {src} is shorter than its tensors say")
            out.write(buf)
            left -= len(buf)


def write_model(model, directory: Path, filename: str, external_bytes: int | None = None,
                base_dir: Path | None = None) -> Path:
    """Write `model` as `directory/filename`. When its weights exceed `external_bytes`, every
    tensor of at least 1 KiB goes to `filename.data` (page-aligned, copied in 64 MiB chunks:
    a multi-GB graph is never whole in memory) and the graph records relative locations;
    otherwise the weights are inline. `model` itself is not modified. `base_dir` resolves
    relative external locations of a model loaded without its data."""
    import onnx
    from onnx import ModelProto

    from mythos_deploy.exporters.graph_passes import iter_graphs
    threshold = external_bytes_threshold() if external_bytes is None else external_bytes
    directory = Path(directory)
    path = directory / filename
    out = ModelProto()
    out.CopyFrom(model)
    drop_store_key(out)
    if base_dir is not None:
        adopt(out, base_dir)
    tensors = [t for g in iter_graphs(out.graph) for t in g.initializer]
    total = sum(tensor_nbytes(t) for t in tensors)
    if total <= threshold:
        materialize(out)
        onnx.save_model(out, str(path))
        return path
    data_name = f"{filename}.data"
    with open(directory / data_name, "wb") as f:
        for t in tensors:
            nbytes = tensor_nbytes(t)
            if nbytes < MIN_EXTERNAL_TENSOR and not is_external(t):
                continue
            pad = -f.tell() % _ALIGN
            if pad:
                f.write(b"\0" * pad)
            offset = f.tell()
            if is_external(t):
                _copy_range(*_source(t, None), f)
            else:
                f.write(raw_bytes(t))  # as stored: int4 stays packed
            name, dtype, shape = t.name, _np_dtype(t), tuple(t.dims)
            t.Clear()
            t.CopyFrom(_external_proto(name, dtype, shape, data_name, offset, nbytes))
        f.flush()
        os.fsync(f.fileno())
    onnx.save_model(out, str(path))
    return path


def check_model_file(model, name: str, full_check: bool = True) -> None:
    """onnx.checker on a store-backed model: it refuses absolute locations in memory, so a
    copy with locations relative to the store is checked from a file in the store."""
    import onnx
    from onnx import ModelProto
    store = store_dir(model)
    if store is None:
        onnx.checker.check_model(model, full_check=full_check)
        return
    from mythos_deploy.exporters.graph_passes import iter_graphs
    probe = ModelProto()
    probe.CopyFrom(model)
    for g in iter_graphs(probe.graph):
        for t in g.initializer:
            for e in t.external_data:
                if e.key == "location" and Path(e.value).is_absolute():
                    e.value = os.path.relpath(e.value, store)
    path = store / f"check_{os.getpid()}_{next(_names)}_{name}.onnx"
    try:
        onnx.save_model(probe, str(path))
        onnx.checker.check_model(str(path), full_check=full_check)
    finally:
        path.unlink(missing_ok=True)
