"""The export keeps its weights on disk: same graphs as the in-memory path, bounded peak memory.

The reference ("before") is the export done the plain way, written here from the libraries'
public entry points: the whole model in memory, torch.onnx.export serializing the weights into
the proto, ONNX Runtime's optimizer and float16 converter on the fully loaded graph, onnx.save,
and ONNX Runtime's quantize_dynamic on a fully loaded graph. sdrt's export must give the same
graphs: the same nodes, bit-identical initializers, the same outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

KINDS = ["tiny-sd1", "tiny-inpaint", "tiny-sd2-v"]
CONFIGS = [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16"), ("cpu", "int8")]


def _modules(src: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    class Pipe:
        pass

    p = Pipe()
    p.unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    p.vae = AutoencoderKL.from_pretrained(src, subfolder="vae").eval()
    p.text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder").eval()
    p.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    return p


def _reference_graphs(src: Path, out: Path, target: str, precision: str, family: str) -> dict[str, Path]:
    """Fused graphs made the in-memory way (torch's own serialization, optimize_model on the loaded
    graph, onnx.save), with sdrt's fusion options and rewrites."""
    from onnxruntime.transformers.optimizer import optimize_model

    from sdrt.export import DEFAULT_FP32_OPS
    from sdrt.export.graphs import graph_specs, prepare_module
    from sdrt.export.optimize import (
        MODEL_TYPES,
        _keep_vae_attention_biases,
        attention_to_mha,
        fusion_options,
        quiet_logs,
        timestep_nodes,
    )

    torch.set_grad_enabled(False)
    _keep_vae_attention_biases()
    graph_precision = "fp32" if precision == "int8" else precision
    paths = {}
    for spec in graph_specs(_modules(src)):
        prepare_module(spec)
        raw = out / "raw" / spec.name / "model.onnx"
        raw.parent.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(spec.module, tuple(spec.inputs.values()), str(raw), input_names=list(spec.inputs),
                              output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes, opset_version=17,
                              do_constant_folding=True, dynamo=False)
        with quiet_logs():
            m = optimize_model(str(raw), model_type=MODEL_TYPES[spec.name], num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=fusion_options(spec.name, target, graph_precision),
                               use_gpu=target == "cuda")
            if graph_precision == "fp16":
                m.convert_float_to_float16(keep_io_types=[i.name for i in m.model.graph.input if i.name == "timestep"],
                                           op_block_list=list(DEFAULT_FP32_OPS.get((family, spec.name), ())),
                                           node_block_list=timestep_nodes(m.model.graph))
        if target == "cpu":
            attention_to_mha(m.model)
        m.prune_graph()
        m.topological_sort()
        present = {o.domain for o in m.model.opset_import}
        for d in sorted({n.domain for n in m.model.graph.node if n.domain} - present):
            m.model.opset_import.append(onnx.helper.make_opsetid(d, 1))
        paths[spec.name] = out / spec.name / "model.onnx"
        paths[spec.name].parent.mkdir(parents=True)
        onnx.save(m.model, str(paths[spec.name]))
    return paths


def _reference_int8_unet(fp32_unet: Path, ranges: dict, out: Path) -> Path:
    """The int8 UNet made the in-memory way from a fused fp32 UNet and calibration ranges."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sdrt.export.quantize import DYNAMIC_OP_TYPES, quantize_convs

    model = onnx.load(str(fp32_unet))
    quantize_convs(model, ranges)
    staged = out / "static.onnx"
    onnx.save(model, str(staged))
    dst = out / "int8.onnx"
    quantize_dynamic(str(staged), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                     per_channel=False, extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst


def _feeds(model, rng) -> dict[str, np.ndarray]:
    sizes = {"batch": 2, "height": 6, "width": 10, "sequence": 77}
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or sizes[d.dim_param] for d in i.type.tensor_type.shape.dim]
        t = i.type.tensor_type.elem_type
        if t == onnx.TensorProto.INT32:
            feeds[i.name] = rng.integers(0, 49408, dims).astype(np.int32)
        elif i.name == "timestep":
            feeds[i.name] = np.array(411.5, np.float32)
        else:
            feeds[i.name] = rng.standard_normal(dims).astype(onnx.helper.tensor_dtype_to_np_dtype(t))
    return feeds


def _assert_same_graph(ref_path: Path, got_path: Path, run: bool) -> None:
    ref, got = onnx.load(str(ref_path)), onnx.load(str(got_path))
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in ref.graph.node]
    assert list(got.graph.input) == list(ref.graph.input) and list(got.graph.output) == list(ref.graph.output)
    r = {t.name: onnx.numpy_helper.to_array(t) for t in ref.graph.initializer}
    g = {t.name: onnx.numpy_helper.to_array(t) for t in got.graph.initializer}
    assert list(g) == list(r)
    for k in r:
        assert g[k].dtype == r[k].dtype and g[k].shape == r[k].shape and np.array_equal(g[k], r[k], equal_nan=True), k
    if run:  # graphs the CPU provider can run: the same outputs on the same inputs
        feeds = _feeds(ref, np.random.default_rng(0))
        a = ort.InferenceSession(str(ref_path), providers=["CPUExecutionProvider"]).run(None, feeds)
        b = ort.InferenceSession(str(got_path), providers=["CPUExecutionProvider"]).run(None, feeds)
        for x, y in zip(a, b):
            assert np.abs(x.astype(np.float64) - y).max() <= 1e-6


def _fused_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("target,precision", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_export_equals_in_memory_reference(models, tmp_path, kind, target, precision):
    """Weights kept on disk (traced into external data, fused and converted tensor by tensor)
    give exactly the graphs the in-memory path gives, for every target and precision."""
    folder = models.exported(kind, target=target, precision=precision)
    manifest = json.loads((folder / "sdrt.json").read_text())
    ref = _reference_graphs(models.source(kind), tmp_path / "ref", target, precision, manifest["family"])
    for name, path in ref.items():
        got = folder / name / "model.onnx"
        if precision == "int8" and name == "unet":
            continue
        _assert_same_graph(path, got, run=target == "cpu")
        assert sorted(p.name for p in got.parent.iterdir()) == ["config.json", "model.onnx"]
        # The fused-operator counts the manifest records are those of the reference graph.
        ops = _fused_counts(path)
        assert manifest["fused_operators"][name] == {k: ops[k] for k in manifest["fused_operators"][name]}
        assert manifest["fused_operators"][name].get("MultiHeadAttention", 0) + ops["Attention"] >= (name == "unet")
    if precision == "int8":
        from sdrt.export.quantize import calibrate, calibration_tensors, write_calibration_graph

        # Calibrate the reference's fp32 UNet in a copy of the fp32 folder (the same graphs).
        fp32 = models.exported(kind)
        work = tmp_path / "fp32"
        import shutil

        shutil.copytree(fp32, work)
        unet = work / "unet" / "model.onnx"
        tensors = calibration_tensors(onnx.load(str(unet), load_external_data=False))
        write_calibration_graph(unet, unet.with_name("calibration.onnx"), tensors)
        ranges = calibrate(work, {"unet": (unet.with_name("calibration.onnx"), tensors)}, log=lambda m: None)["unet"]
        int8 = _reference_int8_unet(ref["unet"], ranges, tmp_path)
        _assert_same_graph(int8, folder / "unet" / "model.onnx", run=True)
        ops = _fused_counts(int8)
        counts = manifest["fused_operators"]["unet"]
        assert counts["MatMulInteger"] == ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] > 0
        g = onnx.load(str(int8), load_external_data=False).graph
        dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
        assert counts["QLinearConv"] == sum(n.op_type == "Conv" and n.input[1] in dq for n in g.node) > 0


# Runs a program given as argv[1] and reports its peak RSS. It runs as a small intermediate process
# because Linux starts a child's peak RSS at its parent's when the child execs (the memory the
# forked copy mapped counts), so a child started straight from the test process would report at
# least the test process's size.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print('PEAK_RSS_KB', usage.ru_maxrss, os.waitstatus_to_exitcode(status), flush=True)\n"
)


def _peak_rss_of_child(code: str) -> tuple[int, str]:
    """Run `code` in a fresh Python; return (its peak RSS in bytes, its output). The peak comes from
    os.wait4 for that one process (see _LAUNCHER), so no other process of the test session counts."""
    r = subprocess.run([sys.executable, "-c", _LAUNCHER, code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=3600)
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("PEAK_RSS_KB ")]
    assert r.returncode == 0 and last, r.stdout[-3000:]
    _, kb, rc = last[-1].split()
    assert rc == "0", r.stdout[-3000:]
    return int(kb) * (1 if sys.platform == "darwin" else 1024), r.stdout


def _fp32_weight_bytes(folder: Path) -> int:
    """fp32 bytes of a diffusers model folder's weights, from safetensors' own reader."""
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            total += sum(int(np.prod(st.get_slice(k).get_shape(), dtype=np.int64)) for k in st.keys())
    return 4 * total


def _export_code(src: Path, out: Path, **kw) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return f"from sdrt.export import export_model\nexport_model({str(src)!r}, {str(out)!r}, {args})\n"


@pytest.mark.parametrize("target,precision", [("cpu", "fp32"), ("cuda", "fp16"), ("cpu", "int8")])
def test_export_peak_memory(models, tmp_path, target, precision):
    """The export holds at most one copy of the largest model's weights (a PyTorch module being
    traced, or one ONNX Runtime session checking one graph) plus transients: on the mid-sized model
    (UNet 0.55 GB) its peak RSS stays within the tiny model's (interpreter, libraries, arenas)
    plus 1.5x the UNet's fp32 weight bytes. The in-memory path held the traced graph, the
    optimizer's copies of it and the PyTorch pipeline together (5-6x). int8 calibration runs all
    the fp32 graphs at once, so there the bound is 1.5x all the weights.

    The memory estimate `sdrt export` checks before it starts covers the measured peak, without
    being more than twice it."""
    from sdrt.export import _folder_weight_bytes
    from sdrt.export.memory import estimate_peak_bytes, onnx_folder_weight_bytes

    peaks, weights = {}, {}
    for kind in ("tiny-sd1", "mid"):
        src = models.source(kind)
        weights[kind] = {c: _fp32_weight_bytes(src / c) for c in ("text_encoder", "unet", "vae")}
        assert weights[kind] == {c: _folder_weight_bytes(src / c) for c in weights[kind]}
        if precision == "int8":  # from an fp32 folder: quantization alone, without PyTorch
            src = models.exported(kind)
        peaks[kind], out = _peak_rss_of_child(_export_code(src, tmp_path / kind, target=target, precision=precision))
        assert "peak memory" in out
    w = weights["mid"]["unet"] if precision != "int8" else sum(weights["mid"].values())
    mib = {k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}
    print(f"\n{target}/{precision}: peak RSS {mib}; mid weights {w / 2**20:.0f} MiB; "
          f"mid - tiny = {(peaks['mid'] - peaks['tiny-sd1']) / w:.2f}x the weights")
    assert peaks["mid"] <= peaks["tiny-sd1"] + 1.5 * w
    for kind in peaks:
        # (The export estimates from the files it reads: the fp32 folder's graphs for int8.)
        est_weights = onnx_folder_weight_bytes(models.exported(kind)) if precision == "int8" else weights[kind]
        est = estimate_peak_bytes(est_weights, precision, with_torch=precision != "int8")
        assert peaks[kind] <= est <= 2 * peaks[kind], (kind, est, peaks[kind])
