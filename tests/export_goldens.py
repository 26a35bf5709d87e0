"""Golden summaries of the graphs `sdrt export` writes for the tiny test models, for
tests/test_export_memory.py: per graph its operator counts, a digest of its nodes, a digest of
its weights, and (graphs the CPU provider runs) its outputs on fixed inputs.

The stored goldens were written by the export as it was before the weights stayed on disk (the
in-memory export: main at commit eeb6f45), so the test checks that the restructured export writes
the same graphs. To rewrite them, run this file with that export importable as `sdrt`, e.g.

    OLD=$(mktemp -d) && mkdir -p $OLD/src $OLD/path/sdrt && git archive eeb6f45 | tar -x -C $OLD/src
    for d in runtime schedulers export cli models; do ln -s $OLD/src/$d $OLD/path/sdrt/$d; done
    PYTHONPATH=$OLD/path python tests/export_goldens.py tests/data/export-goldens.npz

(The goldens hold every kind x target x precision, and the test checks those it lists. After a
deliberate change to the exported graphs, rewrite them with the new export: the same command
without PYTHONPATH.) The fixed inputs come from a seeded NumPy generator, so they are not stored.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

KINDS = ("tiny-sd1", "tiny-inpaint", "tiny-sd2-v")
CONFIGS = (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16"), ("cpu", "int8"))
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
# Dimension sizes of the fixed inputs (latents 8x12, images 64x96 for the tiny VAE's factor).
SIZES = {"batch": 1, "height": 8, "width": 12, "sequence": 77}


def inputs(model) -> dict[str, np.ndarray]:
    """Fixed inputs for the graph `model` (ModelProto), from its input names, types and shapes."""
    import onnx

    rng = np.random.default_rng(20261130)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or SIZES[d.dim_param] for d in i.type.tensor_type.shape.dim]
        t = i.type.tensor_type.elem_type
        if t in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            feeds[i.name] = rng.integers(0, 49408, dims).astype(onnx.helper.tensor_dtype_to_np_dtype(t))
        elif i.name == "timestep":
            feeds[i.name] = np.array(411.5, onnx.helper.tensor_dtype_to_np_dtype(t)).reshape(dims)
        else:
            feeds[i.name] = rng.standard_normal(dims).astype(onnx.helper.tensor_dtype_to_np_dtype(t))
    return feeds


def calibrated(graph) -> set[str]:
    """Initializers an int8 graph derives from calibration (activation scales and zero points,
    int32 biases at the activation's scale): ONNX Runtime computes the ranges in fp32 kernels that
    differ in the last bits between CPUs, so their digest would depend on the CPU."""
    import onnx

    names = {n.input[k] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
             for k in (1, 2) if len(n.input) > k}
    return names | {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT32}


def summary(path: Path) -> dict:
    """{"ops": {op_type: count}, "nodes": digest, "weights": digest} of the graph at `path`."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    nodes = hashlib.sha256()
    for part in [*g.input, *g.output, *g.node]:
        nodes.update(part.SerializeToString())
    skip = calibrated(g) if any(t.data_type == onnx.TensorProto.INT8 for t in g.initializer) else set()
    weights = hashlib.sha256()
    for t in sorted(g.initializer, key=lambda t: t.name):
        if t.name not in skip:
            a = onnx.numpy_helper.to_array(t)
            weights.update(json.dumps([t.name, t.data_type, list(t.dims)]).encode())
            weights.update(np.ascontiguousarray(a).tobytes())
    return {"ops": dict(sorted(Counter(n.op_type for n in g.node).items())), "nodes": nodes.hexdigest(),
            "weights": weights.hexdigest(), "calibrated_initializers": len(skip)}


def outputs(path: Path) -> list[np.ndarray]:
    """The graph's outputs on `inputs`, run by ONNX Runtime's CPU provider."""
    import onnx
    import onnxruntime as ort

    feeds = inputs(onnx.load(str(path), load_external_data=False))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def main(dst: str) -> None:
    from sdrt.export import export_model
    from sdrt.export.testmodels import build

    summaries, arrays = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            src = build(Path(tmp) / kind, kind)
            for target, precision in CONFIGS:
                out = export_model(src, Path(tmp) / f"{kind}-{target}-{precision}", target=target,
                                   precision=precision, log=lambda m: None)
                for graph in GRAPHS:
                    key = f"{kind}/{target}/{precision}/{graph}"
                    summaries[key] = summary(out / graph / "model.onnx")
                    if (target, precision) == ("cpu", "fp32"):
                        for i, a in enumerate(outputs(out / graph / "model.onnx")):
                            arrays[f"{key}/{i}"] = a
    np.savez_compressed(dst, summaries=np.array(json.dumps(summaries)), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
