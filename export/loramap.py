"""Where each LoRA-able weight of a PyTorch module lives in its exported ONNX graph.

A LoRA changes the weights of Linear and Conv2d layers (attention q/k/v/out, feed-forward,
projections, resnet convolutions; the text encoder's q/k/v/out and fc layers). After tracing and
ONNX Runtime's fusions those weights sit in initializers under other names and layouts: a MatMul
stores a Linear weight transposed ([in, out]); the cpu target's fused self-attention packs q, k
and v side by side ([in, 3 * out]); the cuda target's packed QKV / KV attention interleaves them
per head ([in, heads, 3 or 2, head size]) and its NhwcConv holds convolution weights as
[out, kh, kw, in]; fp16 graphs hold the weights cast to fp16. The map is found by matching values:
before the module is freed, each weight's hash is taken, of its fp32 values and, for fp16 graphs,
of the values ONNX Runtime's fp16 converter makes of them (`fingerprints`); once the final graph is
written, every initializer is hashed in each layout it may hold a weight in (`build_map`). The
result is written as `lora_map.json` beside the graph and read by sdrt.runtime.lora.

Entry per module name (as in module.named_modules()):
    {"shape": [out, in(, kh, kw)], "at": [{"initializer": NAME, "dtype": "float32" | "float16",
                                           "layout": LAYOUT, "offset": K, ...}]}
Layouts:
    "same":   the initializer is the weight as PyTorch holds it;
    "T":      columns K..K+out of a 2-D initializer are the weight's transpose (its [out, rest] view);
    "nhwc":   the initializer is the convolution weight transposed to [out, kh, kw, in];
    "packed": the 2-D initializer [in, heads * count * head] viewed as [in, heads, count, head]
              holds the weight's transpose at [:, :, index, :] (keys "heads", "count", "index").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MAP_FILE = "lora_map.json"
MAP_VERSION = 2


def _hash(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _as_fp16(a: np.ndarray) -> np.ndarray:
    """`a` as ONNX Runtime's fp16 converter stores it (tiny values kept nonzero), back in fp32."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return convert_np_to_float16(a).astype(np.float32)


def _print(w2: np.ndarray) -> dict:
    return {"h": _hash(w2), "ht": _hash(w2.T), "col0": w2[:, 0].copy()}


def fingerprints(module, prefix: str = "", half: bool = False) -> dict[str, dict]:
    """name -> {shape, "float32": {hash of the [out, rest] view, hash of its transpose, first
    column}} for every Linear and Conv2d weight of `module`, and the same under "float16" for the
    fp16 values when `half` (small: the weights themselves are not kept). Names start with `prefix`
    when they do not already (the text encoder's layers are named as LoRA files name them,
    text_model.encoder..., whether or not the transformers version wraps them in text_model)."""
    import torch

    out = {}
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not name.startswith(prefix):
            name = prefix + name
        w = m.weight.detach().float().cpu().numpy()
        w2 = w.reshape(w.shape[0], -1)
        out[name] = {"shape": list(w.shape), "float32": _print(w2)}
        if half:
            out[name]["float16"] = _print(_as_fp16(w2))
    return out


def _initializers(path: Path):
    """(name, dtype name, float32 array) of each fp32/fp16 initializer of 2+ dimensions of the
    graph at `path`, read one at a time from its file (the graph itself is not loaded: a graph
    below 2 GB holds its weights inline)."""
    from sdrt.runtime.onnxinit import initializers

    kinds = {1: "float32", 10: "float16"}  # TensorProto.FLOAT, FLOAT16
    for name, init in initializers(path).items():
        if init.dtype in kinds and len(init.dims) >= 2:
            yield name, kinds[init.dtype], init.read().astype(np.float32)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Tables:
    """Lookups from hashes (and first columns) to module names, for one dtype."""

    def __init__(self, prints: dict[str, dict], dtype: str):
        self.shape = {n: p["shape"] for n, p in prints.items()}
        own = {n: p[dtype] for n, p in prints.items() if dtype in p}
        self.prints = own
        self.same = {p["h"]: n for n, p in own.items()}
        self.trans = {p["ht"]: n for n, p in own.items()}
        self.heads: dict[tuple, list[str]] = {}  # (in, col0[0], col0[1]) of 2-D weights
        self.cols: dict[tuple, list[str]] = {}  # (in, col0) of 2-D weights
        for n, p in own.items():
            c, shape = p["col0"], self.shape[n]
            if len(shape) == 2:
                self.cols.setdefault((shape[1], c.tobytes()), []).append(n)
                if len(c) >= 2:
                    self.heads.setdefault((shape[1], c[0].tobytes(), c[1].tobytes()), []).append(n)


def _locate(t: _Tables, arr: np.ndarray) -> list[tuple[str, dict]]:
    """(module, entry) for each weight of `t` that the initializer `arr` holds."""
    h = _hash(arr.reshape(arr.shape[0], -1))
    n = t.same.get(h)
    if n is not None and list(arr.shape) == t.shape[n]:
        return [(n, {"layout": "same", "offset": 0})]
    if arr.ndim == 4:
        nchw = arr.transpose(0, 3, 1, 2)
        n = t.same.get(_hash(nchw.reshape(arr.shape[0], -1)))
        if n is not None and list(nchw.shape) == t.shape[n]:
            return [(n, {"layout": "nhwc", "offset": 0})]
        return []
    if arr.ndim != 2:
        return []
    if h in t.trans:  # a whole MatMul weight: the transpose of the [out, in] weight
        return [(t.trans[h], {"layout": "T", "offset": 0})]
    found = []
    row = arr[0]
    for j in range(arr.shape[1] - 1):  # side by side: [in, q | k | v]
        for n in t.heads.get((arr.shape[0], row[j].tobytes(), row[j + 1].tobytes()), ()):
            rows = t.shape[n][0]
            if j + rows <= arr.shape[1] and _hash(arr[:, j:j + rows].T) == t.prints[n]["h"]:
                found.append((n, {"layout": "T", "offset": j}))
    return found or _locate_packed(t, arr)


def _locate_packed(t: _Tables, arr: np.ndarray) -> list[tuple[str, dict]]:
    """Weights interleaved per head, as ONNX Runtime's packed QKV (count 3) and KV (count 2)."""
    rows, cols = arr.shape
    for count in (3, 2):
        if cols % count:
            continue
        for heads in _divisors(cols // count)[1:]:
            view = arr.reshape(rows, heads, count, cols // count // heads)
            found = []
            for index in range(count):
                for n in t.cols.get((rows, view[0, :, index, :].reshape(-1).tobytes()), ()):
                    if _hash(view[:, :, index, :].reshape(rows, -1).T) == t.prints[n]["h"]:
                        found.append((n, {"layout": "packed", "offset": 0, "heads": heads, "count": count,
                                          "index": index}))
                        break
            if len(found) == count:
                return found
    return []


def build_map(prints: dict[str, dict], path: Path) -> dict:
    """Locate each fingerprinted weight in the graph at `path` (see the module docstring)."""
    tables: dict[str, _Tables] = {}
    found: dict[str, list[dict]] = {}
    for name, dtype, arr in _initializers(path):
        if dtype not in tables:
            tables[dtype] = _Tables(prints, dtype)
        for module, entry in _locate(tables[dtype], arr):
            found.setdefault(module, []).append({"initializer": name, "dtype": dtype, **entry})
    modules = {n: {"shape": prints[n]["shape"], "at": at} for n, at in sorted(found.items())}
    return {"version": MAP_VERSION, "modules": modules, "missing": sorted(set(prints) - set(found))}


def write_map(prints: dict[str, dict], path: Path) -> dict:
    """build_map for the graph at `path`, written to `lora_map.json` beside it; returns the map."""
    m = build_map(prints, path)
    (path.parent / MAP_FILE).write_text(json.dumps(m, indent=1) + "\n")
    return m
