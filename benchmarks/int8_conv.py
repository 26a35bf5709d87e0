"""One convolution, fp32 against int8 (QDQ, fused by ONNX Runtime into QLinearConv), on SD 1.5 shapes,
with int8 weights within +-64 (what `sdrt export --precision int8` writes: exact on every CPU) and
within +-127 (full range: exact only with VNNI, AMX or on ARM64).

    python benchmarks/int8_conv.py

The int8 graph is what `sdrt export --precision int8` writes around each quantized convolution:
QuantizeLinear -> DequantizeLinear -> Conv (int8 weights per channel, int32 bias) -> QuantizeLinear
-> DequantizeLinear, so its time includes quantizing the input, dequantizing the output and the
layout transposes ONNX Runtime adds for its NHWC kernel. Random weights (speed does not depend on
their values); one intra-op thread per physical core, as sdrt's sessions use.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from sdrt.export.quantize import quantize_convs
from sdrt.runtime.sessions import session_options

# (channels in, channels out, side, batch): UNet levels at 256x256 (batch 2 = CFG), VAE decoder levels.
SHAPES = [(320, 320, 32, 2), (640, 640, 16, 2), (1280, 1280, 8, 2), (320, 320, 64, 2),
          (512, 512, 64, 1), (256, 256, 128, 1), (128, 128, 256, 1)]


def conv_model(cin: int, cout: int, side: int, batch: int, rng):
    from onnx import numpy_helper

    w = rng.normal(0, 0.05, (cout, cin, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Conv", ["a", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Identity", ["c"], ["y"])]
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, side, side])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def per_call(model, x: np.ndarray, seconds: float = 1.0) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), session_options("cpu"), providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x})
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        sess.run(None, {"x": x})
        n += 1
    return (time.perf_counter() - t) / n


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}")
    print("| in | out | side | batch | fp32 Conv (ms) | int8, weights +-64 (ms) | int8, weights +-127 (ms) | speed-up (+-64) |")
    print("|---|---|---|---|---|---|---|---|")
    for cin, cout, side, batch in SHAPES:
        x = rng.standard_normal((batch, cin, side, side)).astype(np.float32)
        fp32 = conv_model(cin, cout, side, batch, rng)
        times = [per_call(fp32, x)]
        for weight_max in (64, 127):
            q = conv_model(cin, cout, side, batch, rng)
            assert quantize_convs(q, {"a": (-4.0, 4.0, 1.0), "c": (-4.0, 4.0, 1.0)}, min_sqnr_db=0, weight_max=weight_max) == 1
            times.append(per_call(q, x))
        a, b, c = times
        print(f"| {cin} | {cout} | {side} | {batch} | {1e3 * a:.1f} | {1e3 * b:.1f} | {1e3 * c:.1f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
