"""Read single initializers of an ONNX file without the onnx package and without parsing the graph.

The protobuf records of ModelProto.graph.initializer are walked in a memory map: each tensor's
name, type, shape and where its bytes are (inside the .onnx file, or in its external data file)
are noted, and its bytes are read only when asked for. ONNX Runtime loads the graph itself.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# onnx.proto field numbers
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_DATA_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14
DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}


@dataclass(frozen=True)
class Initializer:
    name: str
    dtype: int  # TensorProto data type
    dims: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    def read(self) -> np.ndarray:
        dt = DTYPES.get(self.dtype)
        if dt is None:
            raise ValueError(f"initializer {self.name}: data type {self.dtype} is not read here")
        count = self.nbytes // np.dtype(dt).itemsize
        arr = np.fromfile(self.file, dtype=dt, count=count, offset=self.offset)
        if arr.size != int(np.prod(self.dims, dtype=np.int64)):
            raise ValueError(f"initializer {self.name}: {self.file.name} ends before its data (truncated file?)")
        return arr.reshape(self.dims)


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, n), pos + n
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _tensor(buf, start: int, end: int, path: Path) -> Initializer | None:
    name, dtype, dims, raw, ext, external = "", 1, [], None, {}, False
    for number, wire, value in _fields(buf, start, end):
        if number == _T_NAME:
            name = bytes(buf[value[0]:value[0] + value[1]]).decode("utf-8")
        elif number == _T_DATA_TYPE:
            dtype = value
        elif number == _T_DIMS:
            if wire == 0:
                dims.append(value)
            else:  # packed
                pos, stop = value[0], value[0] + value[1]
                while pos < stop:
                    d, pos = _varint(buf, pos)
                    dims.append(d)
        elif number == _T_RAW:
            raw = value
        elif number == _T_LOCATION:
            external = value == 1
        elif number == _T_EXTERNAL:
            kv = {f: bytes(buf[v[0]:v[0] + v[1]]).decode("utf-8") for f, _, v in _fields(buf, value[0], value[0] + value[1])}
            ext[kv.get(1, "")] = kv.get(2, "")
    if external:
        location = ext.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            return None
        return Initializer(name, dtype, tuple(dims), path.parent / location, int(ext.get("offset", 0)), int(ext.get("length", 0)))
    if raw is None:
        return None  # values in typed fields (small tensors): not needed here
    return Initializer(name, dtype, tuple(dims), path, raw[0], raw[1])


def initializers(path: str | os.PathLike) -> dict[str, Initializer]:
    """Name -> Initializer for the initializers of the graph at `path` whose bytes are raw
    (inline raw_data or external data)."""
    path = Path(path)
    out = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        view = memoryview(buf)
        try:
            for number, wire, value in _fields(view, 0, len(buf)):
                if number != _MODEL_GRAPH or wire != 2:
                    continue
                for n, w, v in _fields(view, value[0], value[0] + value[1]):
                    if n == _GRAPH_INITIALIZER and w == 2:
                        t = _tensor(view, v[0], v[0] + v[1], path)
                        if t is not None:
                            out[t.name] = t
        finally:
            view.release()
    return out
