"""Writing ONNX files, and graphs whose weights stay on disk while they are transformed.

A graph is written as one file, or, when its tensors would pass protobuf's 2 GB, as `model.onnx`
plus all its tensors in one `model.onnx_data`.

While the exporter fuses, converts or quantizes a graph, its weights stay in external data files
next to the graph (`load_graph` reads the graph proto without them): a tensor's bytes are read when
a pass needs its values (`tensor_array`) and new large tensors are appended to a scratch file
(`ScratchWeights`). `write_graph` then streams the tensors into the destination one at a time,
so no stage holds more than the graph structure and the tensor at hand.
"""

from __future__ import annotations

import os
from pathlib import Path

TWO_GB = 2**31
# Tensor bytes from which a graph is written with external data (protobuf's limit, with headroom).
EXTERNAL_DATA_FROM = TWO_GB - (64 << 20)
# In a graph with external data, tensors smaller than this stay inline (onnx's own default).
INLINE_BELOW = 1024

# Field numbers of onnx.proto used by the streaming writer.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9


def tensor_bytes(model) -> int:
    """Bytes of the graph's tensors, inline or external (ByteSize() itself fails on protos past 2 GB)."""
    from onnx import external_data_helper

    return sum(tensor_nbytes(t) for t in external_data_helper._get_all_tensors(model))


def save_onnx(model, path: Path) -> None:
    """Save an onnx ModelProto whose tensors are all in memory, with its tensors in `model.onnx_data`
    when it would pass 2 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + "_data")
    if data.exists():
        data.unlink()
    if tensor_bytes(model) >= EXTERNAL_DATA_FROM:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
        )
    else:
        onnx.save_model(model, str(path))


def load_graph(path: Path):
    """The graph at `path` without its external tensors' bytes (they stay in the files beside it)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def is_external(t) -> bool:
    from onnx import TensorProto

    return t.data_location == TensorProto.EXTERNAL


def _external_info(t) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in t.external_data}
    length = info.get("length")
    return info["location"], int(info.get("offset", 0)), int(length) if length is not None else None


def tensor_nbytes(t) -> int:
    """Bytes of a tensor's data, wherever it is stored."""
    import numpy as np
    from onnx import helper

    if is_external(t):
        _, _, length = _external_info(t)
        if length is not None:
            return length
    if t.HasField("raw_data"):
        return len(t.raw_data)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return t.ByteSize()
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def read_external(t, base_dir: Path) -> bytes:
    """The bytes of the external tensor `t`, from its file relative to `base_dir`."""
    location, offset, length = _external_info(t)
    path = Path(base_dir) / location
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise ValueError(f"tensor {t.name}: external data location {location!r} is outside the graph's folder")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if length is None else f.read(length)
    if length is not None and len(data) != length:
        raise ValueError(f"tensor {t.name}: {path.name} ends before its {length} bytes (truncated file?)")
    return data


def tensor_array(t, base_dir: Path):
    """The tensor as a NumPy array, read from its external file when it has one (the proto is not changed)."""
    from onnx import TensorProto, numpy_helper

    if not is_external(t):
        return numpy_helper.to_array(t)
    inline = TensorProto()
    inline.CopyFrom(t)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = read_external(t, base_dir)
    return numpy_helper.to_array(inline)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload_len: int) -> bytes:
    """Tag and length prefix of a length-delimited protobuf field."""
    return _varint((number << 3) | 2) + _varint(payload_len)


def _set_external(t, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


class ScratchWeights:
    """An append-only external data file in a graph's folder for tensors a transformation creates.

    `put(tensor, data)` appends `data` (bytes, or the tensor's own inline data when None) and turns
    `tensor` into a reference to it, so the proto never holds large tensor bytes.
    """

    def __init__(self, folder: Path, name: str = "scratch.onnx_data"):
        self.folder = Path(folder)
        self.name = name
        self.path = self.folder / name
        self._f = None

    def put(self, t, data: bytes | None = None) -> None:
        from onnx import numpy_helper

        if data is None:
            data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        if self._f is None:
            self._f = open(self.path, "ab")
        self._f.seek(0, os.SEEK_END)
        offset = self._f.tell()
        self._f.write(data)
        self._f.flush()
        _set_external(t, self.name, offset, len(data))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def write_graph(model, base_dir: Path, dst: Path, external: bool | None = None) -> None:
    """Write the graph `model`, whose external tensors are relative to `base_dir`, to `dst`.

    The layout is save_onnx's: one file below EXTERNAL_DATA_FROM tensor bytes, else `dst` plus one
    `dst.onnx_data` holding every tensor of INLINE_BELOW bytes or more (external=True: always that). Tensors are copied one at a
    time. With external data, `model`'s tensors refer to `dst`'s data file afterwards; otherwise
    `model` is unchanged.
    """
    from onnx import external_data_helper

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(dst.name + "_data")
    tensors = list(external_data_helper._get_all_tensors(model))
    if external is None:
        external = sum(tensor_nbytes(t) for t in tensors) >= EXTERNAL_DATA_FROM
    if external:
        _write_external(model, tensors, Path(base_dir), dst, data)
    else:
        _write_inline(model, Path(base_dir), dst)
        if data.exists():
            data.unlink()


def _write_external(model, tensors, base_dir: Path, dst: Path, data: Path) -> None:
    from onnx import numpy_helper

    tmp = data.with_name(data.name + ".writing")
    moves = []
    with open(tmp, "wb") as out:
        for t in tensors:
            if is_external(t):
                blob = read_external(t, base_dir)
            elif t.HasField("raw_data") and len(t.raw_data) >= INLINE_BELOW:
                blob = t.raw_data
            elif not t.HasField("raw_data") and tensor_nbytes(t) >= INLINE_BELOW:
                blob = numpy_helper.to_array(t).tobytes()
            else:
                continue
            offset = out.tell()
            out.write(blob)
            moves.append((t, offset, len(blob)))
    for t, offset, length in moves:
        _set_external(t, data.name, offset, length)
    os.replace(tmp, data)
    with open(dst, "wb") as f:
        f.write(model.SerializeToString())


def _write_inline(model, base_dir: Path, dst: Path) -> None:
    """Serialize `model` with every tensor inline, streaming the initializers one at a time.

    A protobuf message may carry a repeated field in several runs: the graph is written as its
    fields without initializers followed by one initializer record per tensor, which parses to
    the same graph.
    """
    from onnx import ModelProto, TensorProto

    shell = ModelProto()
    shell.CopyFrom(model)  # tensors are references or small: this copy is small
    # Tensors outside the initializer list (node attributes) are loaded in place: they are small.
    from onnx import external_data_helper

    inits = list(shell.graph.initializer)
    init_ids = {id(t) for t in inits}
    for t in external_data_helper._get_all_tensors(shell):
        if id(t) not in init_ids and is_external(t):
            raw = read_external(t, base_dir)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw
    records = []
    for t in model.graph.initializer:
        if is_external(t):
            stub = TensorProto()
            stub.CopyFrom(t)
            length = tensor_nbytes(t)
            del stub.external_data[:]
            stub.ClearField("data_location")
            size = stub.ByteSize() + len(_field(_TENSOR_RAW_DATA, length)) + length
        else:
            stub, size = t, t.ByteSize()
        records.append((t, stub, size))
    del shell.graph.initializer[:]
    graph_head = shell.graph.SerializeToString()
    shell.ClearField("graph")
    head = shell.SerializeToString()
    graph_len = len(graph_head) + sum(len(_field(_GRAPH_INITIALIZER, size)) + size for _, _, size in records)
    tmp = dst.with_name(dst.name + ".writing")
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(_field(_MODEL_GRAPH, graph_len))
        f.write(graph_head)
        for t, stub, size in records:
            if stub is not t:
                stub.raw_data = read_external(t, base_dir)
            blob = stub.SerializeToString()
            if stub is not t:
                stub.ClearField("raw_data")
            if len(blob) != size:
                raise AssertionError(f"tensor {t.name}: {len(blob)} bytes serialized, {size} expected")
            f.write(_field(_GRAPH_INITIALIZER, size))
            f.write(blob)
            del blob
    os.replace(tmp, dst)
