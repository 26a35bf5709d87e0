"""int8 graphs for the CPU provider (`sdrt export --precision int8`).

Two kinds of quantization, each where ONNX Runtime's CPU kernels gain from it:

- Convolutions: static int8 (QDQ format). Weights int8 per output channel, activations uint8 with
  one scale per tensor, calibrated by running the model folder's own fp32 graphs through sdrt's
  pipeline on fixed prompts. ONNX Runtime turns each DequantizeLinear -> Conv -> QuantizeLinear
  into a QLinearConv (NHWC, VNNI on CPUs that have it): 3.5-4x faster than the fp32 Conv on SD
  layer shapes, quantize/dequantize and layout transposes included.
- Matrix products (projections, feed-forward): dynamic int8 (MatMulInteger with a scale computed
  per call), which needs no calibration.

Weights of both kinds use 7 bits of the int8 range, [-64, 64] (WEIGHT_MAX), so that the products
are exact on every CPU. ONNX Runtime multiplies uint8 activations by int8 weights; x86-64 CPUs
without VNNI (AVX2, and AVX-512 before VNNI) do it with vpmaddubsw, which adds two neighbouring
products a1*w1 + a2*w2 into a signed 16-bit value and saturates it there. With a <= 255 and two
weights of one sign, that sum reaches 255 * 2 * |w|: 64770 for full-range weights (|w| <= 127),
past 32767, and 32640 for |w| <= 64, within it. VNNI, AMX and ARM's dot products accumulate in
32 bits and are exact with either range.

Convolutions that stay fp32: the first and last of the graph (fed by a graph input or producing a
graph output: cheap and the most sensitive), and those whose input or output would keep less than
MIN_SQNR_DB of signal-to-noise in uint8 (measured in calibration: range against root mean square).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdrt.runtime.sessions import Graph

from .onnxfile import load_graph, tensor_array, write_graph

# Fixed calibration prompts: varied subjects and styles, as a user would write them.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "portrait of an old man with a beard, studio lighting, highly detailed",
    "a red sports car parked in a city street at night, neon lights",
)
CALIBRATION_STEPS = 8
CALIBRATION_SEED = 1234

# Convolutions whose activations would be quantized below this signal-to-noise ratio stay fp32.
MIN_SQNR_DB = 36.0

# Largest int8 weight magnitude: 2 * 255 * WEIGHT_MAX <= 32767, so no pair of uint8 x int8 products
# can leave int16 (see the module docstring). 64 is ONNX Runtime's own reduced range for int8
# (quantize_dynamic(reduce_range=True) writes [-64, 64]); 127 is the full range.
WEIGHT_MAX = 64

# Op types that get dynamic int8 (MatMulInteger): constant-weight matrix products.
DYNAMIC_OP_TYPES = ("MatMul",)


def quantizable_convs(model) -> list:
    """The Conv nodes to quantize: constant 4-D weight (and bias), fed by no graph input, producing
    no graph output."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_io = {i.name for i in g.input} | {o.name for o in g.output}
    convs = []
    for n in g.node:
        if n.op_type != "Conv" or n.domain not in ("", "ai.onnx"):
            continue
        w = inits.get(n.input[1])
        if w is None or len(w.dims) != 4:
            continue
        if len(n.input) > 2 and n.input[2] and n.input[2] not in inits:
            continue
        if n.input[0] in graph_io or n.output[0] in graph_io:
            continue
        convs.append(n)
    return convs


def calibration_tensors(model) -> list[str]:
    """Activation tensors whose ranges the convolutions' quantization needs (inputs and outputs)."""
    names: list[str] = []
    for n in quantizable_convs(model):
        for t in (n.input[0], n.output[0]):
            if t not in names:
                names.append(t)
    return names


def write_calibration_graph(src: Path, dst: Path, tensors: Iterable[str]) -> None:
    """`src` with `tensors` as extra graph outputs, saved as `dst` in the same folder (it shares
    `src`'s external weight file, which is not read or copied)."""
    if src.parent != dst.parent:
        raise ValueError("the calibration graph must sit next to its source (shared external data)")
    model = onnx.load(str(src), load_external_data=False)
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(dst))


class RangeObserver:
    """Running min, max and root mean square of named tensors over calibration calls."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.lo = {n: np.inf for n in names}
        self.hi = {n: -np.inf for n in names}
        self.sq = dict.fromkeys(names, 0.0)
        self.count = dict.fromkeys(names, 0)
        self.calls = 0

    def update(self, arrays: Iterable[np.ndarray]) -> None:
        for name, a in zip(self.names, arrays, strict=True):
            self.lo[name] = min(self.lo[name], float(a.min()))
            self.hi[name] = max(self.hi[name], float(a.max()))
            flat = a.reshape(-1).astype(np.float32, copy=False)
            self.sq[name] += float(np.dot(flat, flat))
            self.count[name] += flat.size
        self.calls += 1

    def ranges(self) -> dict[str, tuple[float, float, float]]:
        """{tensor: (min, max, rms)} of the tensors observed with finite values."""
        return {n: (self.lo[n], self.hi[n], (self.sq[n] / self.count[n]) ** 0.5) for n in self.names
                if np.isfinite(self.lo[n]) and np.isfinite(self.hi[n]) and self.count[n] and np.isfinite(self.sq[n])}


def calibrate(folder: Path, graphs: dict[str, tuple[Path, list[str]]],
              log: Callable[[str], None] = print) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Activation ranges of each graph in `graphs` ({name: (calibration graph, tensors)}), observed
    while sdrt's pipeline generates CALIBRATION_PROMPTS with the fp32 model folder at `folder`, at
    the model's native size up to 256x256 (ranges barely depend on it, the calibration time does)."""
    import time

    from sdrt.runtime.modelfolder import read_model_folder
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline(read_model_folder(folder, verify="none", partial=True), "cpu")
    size = min(256, pipe.info.sample_size * pipe.info.vae_scale_factor)
    count = sum(len(tensors) for _, tensors in graphs.values())
    log(f"  calibrating {count} activations on {len(CALIBRATION_PROMPTS)} prompts at {size}x{size}")
    observers = {}
    for name, (path, tensors) in graphs.items():
        observers[name] = RangeObserver(tensors)
        pipe.graphs[name] = _ObservedGraph(name, path, pipe.provider, pipe.graphs[name].threads, observers[name])
    pipe.load_graphs()
    t = time.time()
    for i, prompt in enumerate(CALIBRATION_PROMPTS):
        # txt2img from pure noise visits every noise level img2img and inpainting can start from.
        pipe.txt2img(prompt, steps=CALIBRATION_STEPS, guidance=7.5, sampler="Euler", seed=CALIBRATION_SEED + i,
                     width=size, height=size, output="np")
        log(f"  calibration: prompt {i + 1}/{len(CALIBRATION_PROMPTS)} ({time.time() - t:.0f}s)")
    del pipe
    return {name: obs.ranges() for name, obs in observers.items()}


class _ObservedGraph(Graph):
    """A graph whose session also returns observed tensors; run() hands back only the real outputs."""

    def __init__(self, name: str, path: Path, provider: str, threads: int | None, observer: RangeObserver):
        super().__init__(name, path, provider, threads)
        self.observer = observer

    def run(self, feeds, outputs=None, keep=()):
        res = super().run(feeds, keep=keep)
        n_real = len(res) - len(self.observer.names)
        self.observer.update(res[n_real:])
        if outputs:
            return [res[self.output_names.index(o)] for o in outputs]
        return res[:n_real]


def sqnr_db(lo: float, hi: float, rms: float) -> float:
    """Signal-to-quantization-noise ratio of a tensor quantized to uint8 over [lo, hi] (uniform noise)."""
    step = (max(hi, 0.0) - min(lo, 0.0)) / 255.0
    if step <= 0.0 or rms <= 0.0:
        return float("inf") if step <= 0.0 else 0.0
    return float(20.0 * np.log10(rms / (step / np.sqrt(12.0))))


def _uint8_params(lo: float, hi: float, *_) -> tuple[np.float32, np.uint8]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def quantize_convs(model, ranges: dict[str, tuple[float, float, float]], min_sqnr_db: float = MIN_SQNR_DB,
                   weight_max: int = WEIGHT_MAX) -> int:
    """Rewrite the graph's quantizable convolutions in QDQ form, in place; returns the count.

    ranges: {tensor: (min, max, rms)} from calibration. A convolution whose input or output would
    be quantized below `min_sqnr_db` stays fp32 (in SD UNets: the skip-connection and resampling
    convolutions on the residual stream, whose few large values make one uint8 scale coarse).

    Weight: int8 in [-weight_max, weight_max], symmetric, one scale per output channel (64, the
    default, keeps every CPU's arithmetic exact; 127 only where products accumulate in 32 bits).
    Bias: int32 at scale x_scale * w_scale.
    Each activation tensor (a conv's input or output) gets one QuantizeLinear -> DequantizeLinear
    pair after its producer. A conv's output is read by every consumer through that pair (ONNX
    Runtime fuses DQ -> Conv -> Q only when Q is the conv's sole consumer); a conv input made by
    another node keeps its fp32 value for its other consumers.
    """
    if not 0 < weight_max <= 127:
        raise ValueError(f"weight_max must be in 1..127, got {weight_max}")
    g = model.graph

    def fits(t: str) -> bool:
        return t in ranges and sqnr_db(*ranges[t]) >= min_sqnr_db

    convs = [n for n in quantizable_convs(model) if fits(n.input[0]) and fits(n.output[0])]
    if not convs:
        return 0
    inits = {i.name: i for i in g.initializer}
    conv_outputs = {n.output[0] for n in convs}
    activations: dict[str, str] = {}  # tensor -> its dequantized name
    new_inits = []
    after: dict[str, list] = {}  # producer output -> Q/DQ nodes to place after it
    before: dict[str, list] = {}  # conv output -> weight/bias DQ nodes to place before the conv

    def qdq(t: str) -> str:
        if t in activations:
            return activations[t]
        scale, zero = _uint8_params(*ranges[t])
        s, z = f"{t}/q_scale", f"{t}/q_zero"
        new_inits.extend([numpy_helper.from_array(np.array(scale), s), numpy_helper.from_array(np.array(zero), z)])
        src = f"{t}/fp32" if t in conv_outputs else t
        q, dq = f"{t}/q", f"{t}/dq" if t not in conv_outputs else t
        after.setdefault(src, []).extend([
            helper.make_node("QuantizeLinear", [src, s, z], [q], name=f"{t}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{t}/DequantizeLinear"),
        ])
        activations[t] = dq
        return dq

    for n in convs:
        x, y = n.input[0], n.output[0]
        x_dq = qdq(x)
        qdq(y)
        n.output[0] = f"{y}/fp32"
        w_init = inits[n.input[1]]
        w = numpy_helper.to_array(w_init).astype(np.float32)
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        w_scale = np.where(amax > 0, amax / weight_max, 1.0).astype(np.float32)
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -weight_max, weight_max).astype(np.int8)
        base = n.name or y
        wn = f"{base}/w"
        new_inits += [numpy_helper.from_array(wq, f"{wn}_int8"), numpy_helper.from_array(w_scale, f"{wn}_scale"),
                      numpy_helper.from_array(np.zeros_like(w_scale, np.int8), f"{wn}_zero")]
        nodes_before = [helper.make_node("DequantizeLinear", [f"{wn}_int8", f"{wn}_scale", f"{wn}_zero"], [wn],
                                         name=f"{base}/DequantizeLinear_w", axis=0)]
        inputs = [x_dq, wn]
        if len(n.input) > 2 and n.input[2]:
            b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
            x_scale = float(_uint8_params(*ranges[x])[0])
            b_scale = (x_scale * w_scale.astype(np.float64)).astype(np.float32)
            bq = np.clip(np.round(b / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
            bn = f"{base}/b"
            new_inits += [numpy_helper.from_array(bq, f"{bn}_int32"), numpy_helper.from_array(b_scale, f"{bn}_scale"),
                          numpy_helper.from_array(np.zeros(bq.shape, np.int32), f"{bn}_zero")]
            nodes_before.append(helper.make_node("DequantizeLinear", [f"{bn}_int32", f"{bn}_scale", f"{bn}_zero"], [bn],
                                                 name=f"{base}/DequantizeLinear_b", axis=0))
            inputs.append(bn)
        before[n.output[0]] = nodes_before
        del n.input[:]
        n.input.extend(inputs)

    # Rebuild the node list: weight DQs before their conv, activation Q/DQ after their producer.
    nodes = []
    for n in g.node:
        nodes.extend(before.get(n.output[0], []) if n.output else [])
        nodes.append(n)
        for o in n.output:
            nodes.extend(after.get(o, []))
    del g.node[:]
    g.node.extend(nodes)
    # Drop the fp32 weights and biases no node reads any more.
    read = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in read]
    del g.initializer[:]
    g.initializer.extend(keep + [i for i in new_inits if i.name in read])
    return len(convs)


@contextlib.contextmanager
def _weights_read_from(folder: Path):
    """onnx.numpy_helper.to_array reads external tensors from `folder` (graphs loaded with
    load_graph keep their weights there)."""
    from onnx import numpy_helper

    to_array = numpy_helper.to_array
    numpy_helper.to_array = lambda tensor, base_dir="": to_array(tensor, base_dir or str(folder))
    try:
        yield
    finally:
        numpy_helper.to_array = to_array


@contextlib.contextmanager
def _quantizer_on_disk(folder: Path):
    """Run ONNX Runtime's quantize_dynamic on a graph in `folder` without loading its weights.

    Its loaders read the graph without external data and run the same ONNX shape inference in
    memory (they write a copy of the graph with its weights to disk and read it back), each
    weight it quantizes is read from its file, and its result is written tensor by tensor."""
    import importlib

    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    def infer(model):
        model = onnx.shape_inference.infer_shapes(model)
        add_infer_metadata(model)
        return model

    def save_streaming(self, output_path, use_external_data_format=False):
        self.topological_sort()
        for init in self.model.graph.initializer:
            self._check_init(init, "end")
        write_graph(self.model, folder, Path(output_path))

    # (onnxruntime.quantization.quantize is also a function's name in its package: import by name.)
    ort_quantize, base_quantizer, onnx_quantizer = (
        importlib.import_module(f"onnxruntime.quantization.{m}") for m in ("quantize", "base_quantizer", "onnx_quantizer"))
    patches = [(ort_quantize, "load_model_with_shape_infer", lambda path: infer(load_graph(Path(path))))]
    patches += [(m, "save_and_reload_model_with_shape_infer", infer) for m in (ort_quantize, base_quantizer, onnx_quantizer)]
    patches += [(ONNXModel, "save_model_to_file", save_streaming)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        with _weights_read_from(folder):
            yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


def quantize_dynamic_matmuls(src: Path, dst: Path, weight_max: int = WEIGHT_MAX) -> int:
    """Dynamic int8 quantization of the constant-weight MatMuls of `src` into `dst` (in the same
    folder); returns the count.

    Weights symmetric per tensor, in [-64, 64] (ONNX Runtime's reduced range) or [-127, 127]."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_max not in (64, 127):
        raise ValueError(f"dynamic int8 weights span [-64, 64] or [-127, 127]; got weight_max {weight_max}")
    with _quantizer_on_disk(src.parent):
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(DYNAMIC_OP_TYPES),
            per_channel=False,
            reduce_range=weight_max == 64,
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    model = onnx.load(str(dst), load_external_data=False)
    return sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node)


def largest_int8_weight(path: Path) -> int:
    """The largest magnitude among the int8 initializers of the graph at `path` (0 when it has
    none), read one tensor at a time."""
    model = load_graph(path)
    m = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            a = tensor_array(init, path.parent)
            if a.size:
                m = max(m, int(np.abs(a.astype(np.int16)).max()))
    return m


def _remove_graph(path: Path) -> None:
    for p in path.parent.glob(path.name + "*"):
        p.unlink()


def quantize_unet(folder: Path, log: Callable[[str], None] = print, weight_max: int = WEIGHT_MAX) -> dict:
    """Replace the fused fp32 UNet of the (complete, fp32) model folder `folder` by its int8 graph.

    Calibrates the convolutions' activations with the folder's own graphs, rewrites the
    convolutions in QDQ form, then quantizes the matrix products dynamically, all with int8
    weights in [-weight_max, weight_max] (64 or 127). Returns the counts of quantized operators
    and the largest int8 weight the written graph holds:
    {"fused_operators": {"QLinearConv": n, "MatMulInteger": m}, "int8_weight_max": w}.
    """
    import gc
    import time

    from .optimize import quiet_logs

    t = time.time()
    unet = folder / "unet" / "model.onnx"
    tensors = calibration_tensors(onnx.load(str(unet), load_external_data=False))
    probe = unet.with_name("calibration.onnx")
    write_calibration_graph(unet, probe, tensors)
    try:
        ranges = calibrate(folder, {"unet": (probe, tensors)}, log)["unet"]
    finally:
        probe.unlink(missing_ok=True)
    # The weights stay on disk: quantize_convs reads each convolution's weight from its file.
    model = load_graph(unet)
    with _weights_read_from(unet.parent):
        convs = quantize_convs(model, ranges, weight_max=weight_max)
    staged = unet.with_name("static.onnx")
    write_graph(model, unet.parent, staged, external=True)
    del model
    gc.collect()
    _remove_graph(unet)
    try:
        with quiet_logs():
            matmuls = quantize_dynamic_matmuls(staged, unet, weight_max=weight_max)
    finally:
        _remove_graph(staged)
    # What the written graph holds, read back: the manifest records it and `sdrt info` reads it.
    largest = largest_int8_weight(unet)
    if largest > weight_max:
        raise RuntimeError(f"the int8 UNet holds weights up to {largest}, past the {weight_max} it was quantized to")
    counts = {"QLinearConv": convs, "MatMulInteger": matmuls}
    log(f"  unet: int8/cpu graph written in {time.time() - t:.1f}s (quantized: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; int8 weights within +-{largest})")
    return {"fused_operators": counts, "int8_weight_max": largest}
