"""Where each LoRA-able weight of a PyTorch module lives in its exported ONNX graph.

A LoRA changes the weights of Linear and Conv2d layers (attention q/k/v/out, feed-forward,
projections, resnet convolutions; the text encoder's q/k/v/out and fc layers). After tracing and
ONNX Runtime's fusions those weights sit in initializers under other names: a MatMul stores a
Linear weight transposed ([in, out]); a fused self-attention packs q, k and v side by side
([in, 3 * out]). The map is found by matching values: before the module is freed, each weight's
hash is taken (`fingerprints`); once the final graph is written, every initializer is hashed and
packed ones are searched column by column (`build_map`). The result is written as
`lora_map.json` beside the graph and read by sdrt.runtime.lora.

Entry per module name (as in module.named_modules()):
    {"shape": [out, in(, kh, kw)], "at": [{"initializer": NAME, "layout": "same" | "T", "offset": K}]}
"same": the initializer is the weight as PyTorch holds it; "T": columns K..K+out of a 2-D
initializer are the weight's transpose (its [out, rest] view).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MAP_FILE = "lora_map.json"
MAP_VERSION = 1


def _hash(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def fingerprints(module, prefix: str = "") -> dict[str, dict]:
    """name -> {shape, hash of the [out, rest] view, hash of its transpose, first column} for every
    Linear and Conv2d weight of `module` (small: the weights themselves are not kept). Names start
    with `prefix` when they do not already (the text encoder's layers are named as LoRA files name
    them, text_model.encoder..., whether or not the transformers version wraps them in text_model)."""
    import torch

    out = {}
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not name.startswith(prefix):
            name = prefix + name
        w = m.weight.detach().float().cpu().numpy()
        w2 = w.reshape(w.shape[0], -1)
        out[name] = {"shape": list(w.shape), "h": _hash(w2), "ht": _hash(w2.T), "col0": w2[:, 0].copy()}
    return out


def _initializers(path: Path):
    """(name, float32 array) of each float32 initializer of the graph at `path`, one at a time."""
    from onnx import TensorProto

    from .onnxfile import load_graph, tensor_array

    model = load_graph(path)
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
            yield t.name, tensor_array(t, path.parent)


def build_map(prints: dict[str, dict], path: Path) -> dict:
    """Locate each fingerprinted weight in the graph at `path` (see the module docstring)."""
    same = {p["h"]: n for n, p in prints.items()}
    trans = {p["ht"]: n for n, p in prints.items()}
    heads: dict[tuple, list[str]] = {}
    for n, p in prints.items():
        c = p["col0"]
        if len(c) >= 2 and len(p["shape"]) == 2:
            heads.setdefault((int(np.prod(p["shape"][1:])), c[0].tobytes(), c[1].tobytes()), []).append(n)
    found: dict[str, list[dict]] = {}
    for name, arr in _initializers(path):
        h = _hash(arr.reshape(arr.shape[0], -1))
        if h in same and list(arr.shape) == prints[same[h]]["shape"]:
            found.setdefault(same[h], []).append({"initializer": name, "layout": "same", "offset": 0})
            continue
        if arr.ndim != 2:
            continue
        if h in trans:  # a whole MatMul weight: the transpose of the [out, in] weight
            found.setdefault(trans[h], []).append({"initializer": name, "layout": "T", "offset": 0})
            continue
        row = arr[0]
        for j in range(arr.shape[1] - 1):
            for n in heads.get((arr.shape[0], row[j].tobytes(), row[j + 1].tobytes()), ()):
                rows = prints[n]["shape"][0]
                if j + rows <= arr.shape[1] and _hash(arr[:, j:j + rows].T) == prints[n]["h"]:
                    found.setdefault(n, []).append({"initializer": name, "layout": "T", "offset": j})
    modules = {n: {"shape": prints[n]["shape"], "at": at} for n, at in sorted(found.items())}
    return {"version": MAP_VERSION, "modules": modules, "missing": sorted(set(prints) - set(found))}


def write_map(prints: dict[str, dict], path: Path) -> dict:
    """build_map for the graph at `path`, written to `lora_map.json` beside it; returns the map."""
    m = build_map(prints, path)
    (path.parent / MAP_FILE).write_text(json.dumps(m, indent=1) + "\n")
    return m
