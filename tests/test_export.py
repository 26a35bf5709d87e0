"""The export stage: graphs equal their PyTorch modules, fp16/cuda structure, atomicity, errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdrt.export import ExportError, export_model
from sdrt.runtime.modelfolder import INCOMPLETE_MARKER, ModelFolderError, read_model_folder

KINDS = ["tiny-sd1", "tiny-inpaint", "tiny-sd2-v"]


def _session(path: Path | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])


def _torch_modules(src: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae").eval()
    te = CLIPTextModel.from_pretrained(src, subfolder="text_encoder").eval()
    return unet, vae, te


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_graphs_match_pytorch(models, kind):
    """Each exported (fused, fp32, cpu) graph computes what diffusers/transformers compute, at
    shapes other than the ones used during export (dynamic batch, height, width)."""
    folder = models.exported(kind)
    manifest = json.loads((folder / "sdrt.json").read_text())
    print(f"\n{kind}: export self-check max abs diff {manifest['export_check_max_abs_diff']}")
    assert set(manifest["export_check_max_abs_diff"]) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert all(v <= 1e-4 for v in manifest["export_check_max_abs_diff"].values())

    unet, vae, te = _torch_modules(models.source(kind))
    g = torch.Generator().manual_seed(1)
    diffs = {}
    with torch.no_grad():
        ids = torch.randint(0, 49408, (3, 77), generator=g)
        out = te(ids, output_hidden_states=True)
        got = _session(folder / "text_encoder" / "model.onnx").run(None, {"input_ids": ids.numpy().astype(np.int32)})
        diffs["text_encoder"] = float(np.abs(got[0] - out.last_hidden_state.numpy()).max())
        final_ln = getattr(te, "text_model", te).final_layer_norm
        skip2 = final_ln(out.hidden_states[-2]).numpy()
        diffs["text_encoder clip skip 2"] = float(np.abs(got[2][:, 1] - skip2).max())

        c = unet.config.in_channels
        sample = torch.randn(3, c, 12, 20, generator=g)
        enc = torch.randn(3, 77 * 2, unet.config.cross_attention_dim, generator=g)  # two prompt chunks
        for t in (999.0, 432.7, 1.0):
            ref = unet(sample, torch.tensor(t), enc).sample.numpy()
            got = _session(folder / "unet" / "model.onnx").run(
                None, {"sample": sample.numpy(), "timestep": np.array(t, np.float32), "encoder_hidden_states": enc.numpy()}
            )[0]
            diffs[f"unet t={t}"] = float(np.abs(got - ref).max())
        # Latent sizes the UNet cannot halve evenly: upsamplers follow the skip connections.
        for h, w in ((11, 18), (7, 5), (1, 1)):
            odd = torch.randn(2, c, h, w, generator=g)
            ref = unet(odd, torch.tensor(500.0), enc[:2]).sample.numpy()
            got = _session(folder / "unet" / "model.onnx").run(
                None, {"sample": odd.numpy(), "timestep": np.array(500.0, np.float32), "encoder_hidden_states": enc[:2].numpy()}
            )[0]
            diffs[f"unet {h}x{w}"] = float(np.abs(got - ref).max())

        img = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
        ref = vae.encode(img).latent_dist.parameters.numpy()
        got = _session(folder / "vae_encoder" / "model.onnx").run(None, {"sample": img.numpy()})[0]
        diffs["vae_encoder"] = float(np.abs(got - ref).max())

        lat = torch.randn(2, 4, 10, 14, generator=g)
        ref = vae.decode(lat).sample.numpy()
        got = _session(folder / "vae_decoder" / "model.onnx").run(None, {"latent_sample": lat.numpy()})[0]
        diffs["vae_decoder"] = float(np.abs(got - ref).max())
    print(f"{kind}: ONNX Runtime vs PyTorch at new shapes: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= 1e-4


def test_manifest_describes_the_model(models):
    for kind, family, pred, channels in [
        ("tiny-sd1", "sd1", "epsilon", 4),
        ("tiny-inpaint", "sd1", "epsilon", 9),
        ("tiny-sd2-v", "sd2", "v_prediction", 4),
    ]:
        info = read_model_folder(models.exported(kind))
        assert (info.family, info.prediction_type, info.unet_in_channels) == (family, pred, channels)
        assert info.vae_scale_factor == 2  # two VAE blocks in the tiny models: read, not assumed to be 8
        assert info.vae_scaling_factor == pytest.approx(0.18215)
        assert info.target == "cpu" and set(info.precision.values()) == {"fp32"}
        tok = info.path / "tokenizer"
        assert (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()


def _tiny_unet_feeds(seed: int, side: int, t: float) -> dict:
    g = np.random.default_rng(seed)
    return {
        "sample": g.standard_normal((2, 4, side, side), dtype=np.float32),
        "timestep": np.array(t, np.float32),
        "encoder_hidden_states": g.standard_normal((2, 77, 32), dtype=np.float32),
    }


def test_int8_cpu_export(models):
    """--precision int8: the UNet's convolutions become static int8 (QDQ that ONNX Runtime fuses
    into QLinearConv) and its matrix products dynamic int8; the other graphs stay fp32, and the int8
    UNet stays close to the fp32 one."""
    folder = models.exported("tiny-sd1", target="cpu", precision="int8")
    info = read_model_folder(folder, verify="full")
    assert info.target == "cpu"
    assert info.precision == {"text_encoder": "fp32", "unet": "int8", "vae_encoder": "fp32", "vae_decoder": "fp32"}
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "model.onnx"]
    unet = folder / "unet" / "model.onnx"
    ops = Counter(n.op_type for n in onnx.load(str(unet)).graph.node)
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] >= 8 and ops["MultiHeadAttention"] >= 4
    convs = info.manifest["fused_operators"]["unet"]["QLinearConv"]
    assert convs >= 10 and ops["Conv"] == Counter(n.op_type for n in onnx.load(str(models.exported("tiny-sd1") / "unet" / "model.onnx")).graph.node)["Conv"]
    # ONNX Runtime turns every quantized convolution into a QLinearConv at load.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(folder.parent / "int8-unet-optimized.onnx")
    ort.InferenceSession(str(unet), so, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert fused["QLinearConv"] == convs
    # The int8 UNet against the fp32 one on 9 inputs (3 seeds x 3 noise levels): one input's error
    # jumps by a few percent when the input moves by 1e-6 (a dynamic quantization scale changes and
    # every value of its tensor rounds anew); the mean over 9 moves by a tenth of a percent.
    fp32 = _session(models.exported("tiny-sd1") / "unet" / "model.onnx")
    fused = _session(unet)
    # ONNX Runtime's reference arithmetic for the same graph: with graph optimizations off, each
    # quantized convolution runs as DequantizeLinear -> fp32 Conv -> QuantizeLinear, no integer kernel.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(unet), so, providers=["CPUExecutionProvider"])
    err, err_ref = [], []
    for seed in range(3):
        for t in (100.0, 500.0, 900.0):
            feeds = _tiny_unet_feeds(seed=seed, side=16, t=t)
            ref = fp32.run(None, feeds)[0]
            scale = np.abs(ref).mean()
            err.append(np.abs(fused.run(None, feeds)[0] - ref).mean() / scale)
            err_ref.append(np.abs(unfused.run(None, feeds)[0] - ref).mean() / scale)
    rel, rel_ref = float(np.mean(err)), float(np.mean(err_ref))
    print(f"int8 UNet vs fp32: mean abs difference {100 * rel:.2f}% of the mean output "
          f"({100 * rel_ref:.2f}% with ONNX Runtime's unfused QDQ arithmetic)")
    # QLinearConv rounds where the unfused graph does; a float rounding on the other side of a step
    # is as likely to shrink the error as to grow it, so the kernels add nothing on average.
    assert rel <= 1.1 * rel_ref
    # The quantization's own cost: 5.7% (4.7% with full-range weights) on this random-weight model,
    # whose untrained layers amplify small errors (a trained UNet: 1.5-4.5%, docs/benchmarks.md).
    assert 0 < rel < 0.1
    with pytest.raises(ExportError, match="int8"):
        export_model(models.source("tiny-sd1"), folder.parent / "nope", precision="int8", target="cuda")


def test_int8_from_an_sdrt_folder(models, tmp_path):
    """`sdrt export FP32_FOLDER OUT --precision int8` quantizes an existing fp32 cpu export: the same
    quantized operators and the same outputs as the int8 export from the diffusers folder; the
    source is untouched, and only fp32 cpu folders are accepted."""
    fp32 = models.exported("tiny-sd1")
    before = json.loads((fp32 / "sdrt.json").read_text())
    out = export_model(fp32, tmp_path / "int8", precision="int8")
    assert json.loads((fp32 / "sdrt.json").read_text()) == before
    info = read_model_folder(out, verify="full")
    direct = read_model_folder(models.exported("tiny-sd1", target="cpu", precision="int8"))
    assert info.precision == direct.precision
    assert info.manifest["fused_operators"] == direct.manifest["fused_operators"]
    for g in ("text_encoder", "vae_encoder", "vae_decoder"):
        assert info.manifest["files"][f"{g}/model.onnx"] == before["files"][f"{g}/model.onnx"]
    feeds = _tiny_unet_feeds(seed=3, side=8, t=300.0)
    a = _session(out / "unet" / "model.onnx").run(None, feeds)[0]
    b = _session(direct.path / "unet" / "model.onnx").run(None, feeds)[0]
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    with pytest.raises(ExportError, match="only be quantized"):
        export_model(fp32, tmp_path / "fp32-again", precision="fp32")
    with pytest.raises(ExportError, match="int8 is made from an fp32 cpu-target"):
        export_model(out, tmp_path / "twice", precision="int8")
    assert not (tmp_path / "twice").exists() and not list(tmp_path.glob(".twice*"))


def test_int8_from_an_sdrt_folder_needs_no_torch(models, tmp_path):
    """Quantizing an existing fp32 folder runs where PyTorch, diffusers and transformers cannot be
    imported (a runtime-only machine with onnx installed)."""
    code = (
        "import sys\n"
        "for m in ('torch', 'diffusers', 'transformers'): sys.modules[m] = None\n"
        "from sdrt.export import export_model\n"
        f"export_model({str(models.exported('tiny-sd1'))!r}, {str(tmp_path / 'q')!r}, precision='int8')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_model_folder(tmp_path / "q", verify="full").precision["unet"] == "int8"


def _conv_graph(w: np.ndarray, b: np.ndarray):
    """x -> Sigmoid -> Conv(w, b, pad 1) -> Tanh -> y: one convolution neither fed by a graph input
    nor producing a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Conv", ["s", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[1], 6, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("cin,cout", [(3, 5), (64, 32)])
def test_quantize_convs_matches_integer_arithmetic(cin, cout):
    """The QDQ rewrite computes, once fused into QLinearConv, what uint8 activations x int8
    per-channel weights in [-64, 64] + int32 bias give in exact arithmetic (PyTorch in float64 on
    the integers), to within one output quantization step, on whatever CPU runs it; and it stays
    within the worst-case error that quantizing activations, weights and bias allows."""
    from sdrt.export.quantize import calibration_tensors, quantize_convs

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.5, cout).astype(np.float32)
    x = rng.normal(0, 2, (1, cin, 6, 7)).astype(np.float32)
    model = _conv_graph(w, b)
    assert calibration_tensors(model) == ["s", "c"]
    s = 1 / (1 + np.exp(-x.astype(np.float64)))

    def conv(a, k, bias=None):
        t = torch.from_numpy
        return torch.nn.functional.conv2d(t(a), t(k), None if bias is None else t(bias), padding=1).numpy()

    c = conv(s, w.astype(np.float64), b.astype(np.float64))
    ranges = {"s": (float(s.min()), float(s.max()), 1.0), "c": (float(c.min()), float(c.max()), 1.0)}
    assert quantize_convs(model, ranges, min_sqnr_db=0) == 1
    got = _session(model.SerializeToString()).run(None, {"x": x})[0].astype(np.float64)

    # Reference: quantize s (uint8, zero point), w (int8 per output channel, |w| <= 64), b (int32 at s_x * s_w).
    def u8(lo, hi):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = np.float32((hi - lo) / 255)
        return float(scale), int(np.clip(np.round(-lo / scale), 0, 255))

    sx, zx = u8(*ranges["s"][:2])
    sc, zc = u8(*ranges["c"][:2])
    xq = np.clip(np.round(s / sx) + zx, 0, 255) - zx
    sw = (np.abs(w).reshape(cout, -1).max(1) / 64).astype(np.float32).astype(np.float64)
    wq = np.round(w / sw[:, None, None, None])
    assert np.abs(wq).max() == 64
    bq = np.round(b / (sx * sw))
    acc = conv(xq, wq, bq)
    cq = np.clip(np.round(acc * (sx * sw)[None, :, None, None] / sc) + zc, 0, 255)
    ref = np.tanh((cq - zc) * sc)
    # ONNX Runtime requantizes in float32: a value at a rounding boundary may land one step away
    # (tanh' <= 1, so at most sc on the output); a saturated int16 sum would move it further.
    assert np.abs(got - ref).max() <= sc + 1e-6
    # Worst case against the fp32 convolution: |x dw| + |w dx| + |dx dw| summed over each window,
    # plus the bias' rounding, plus half a step for the output's rounding and the step above.
    dx, dw = sx / 2, sw / 2
    ones = np.ones_like(s)
    bound = (conv(ones * dx, np.abs(w.astype(np.float64))) + conv(np.abs(s), np.ones_like(w, np.float64) * dw[:, None, None, None])
             + conv(ones * dx, np.ones_like(w, np.float64) * dw[:, None, None, None]) + (sx * sw / 2)[None, :, None, None])
    assert (np.abs(got - np.tanh(c)) <= bound + 1.5 * sc + 1e-6).all()


def _int16_pair_extremes(q: np.ndarray) -> tuple[int, int]:
    """The largest and the smallest value a1*w1 + a2*w2 reaches, over uint8 a1, a2 and any two
    weights w1, w2 of `q` (the sum vpmaddubsw forms in 16 bits on x86-64 without VNNI)."""
    v = np.sort(q.astype(np.int64).ravel())
    pos = np.clip(v[-2:], 0, None).sum()  # the two largest, counted when positive
    neg = np.clip(v[:2], None, 0).sum()  # the two smallest, counted when negative
    return int(255 * pos), int(255 * neg)


def test_int8_weights_cannot_saturate_16_bit_sums(models, tmp_path):
    """Every int8 weight of the int8 UNet (convolutions' and matrix products') is small enough that
    no two of them, times uint8 activations, leave int16: the products are exact on every CPU,
    VNNI or not. The manifest records the largest weight. Full-range weights (127) would not hold."""
    folder = models.exported("tiny-sd1", target="cpu", precision="int8")
    model = onnx.load(str(folder / "unet" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights += [n.input[1] for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    tensors = [onnx.numpy_helper.to_array(inits[name]) for name in weights if name in inits
               and inits[name].data_type == onnx.TensorProto.INT8]
    assert len(tensors) >= 20
    largest = 0
    for q in tensors:
        hi, lo = _int16_pair_extremes(q)
        assert -(2**15) <= lo and hi <= 2**15 - 1, (hi, lo)
        largest = max(largest, int(np.abs(q.astype(np.int64)).max()))
    assert read_model_folder(folder).manifest["int8_weight_max"] == largest == 64
    # The same check on a full-range quantization fails: it is not a check that always passes.
    full = export_model(models.exported("tiny-sd1"), tmp_path / "full", precision="int8", int8_weight_max=127,
                        log=lambda _: None)
    m = onnx.load(str(full / "unet" / "model.onnx"))
    assert read_model_folder(full).manifest["int8_weight_max"] == 127
    assert max(_int16_pair_extremes(onnx.numpy_helper.to_array(i))[0] for i in m.graph.initializer
               if i.data_type == onnx.TensorProto.INT8) > 2**15 - 1


def test_quantize_convs_keeps_coarse_tensors_fp32():
    """A convolution whose activation range would leave too little signal-to-noise in uint8 (a few
    huge values, small rms) stays fp32; the graph is unchanged then."""
    from sdrt.export.quantize import quantize_convs, sqnr_db

    rng = np.random.default_rng(1)
    model = _conv_graph(rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32), np.zeros(4, np.float32))
    before = model.SerializeToString()
    ranges = {"s": (0.0, 1.0, 0.5), "c": (-200.0, 200.0, 0.5)}
    assert sqnr_db(*ranges["c"]) < 36 < sqnr_db(*ranges["s"])
    assert quantize_convs(model, ranges) == 0
    assert model.SerializeToString() == before
    # 255 steps over [0, 1] with rms 0.5: 20 log10(0.5 / (1 / 255 / sqrt(12))) = 52.9 dB
    assert sqnr_db(0.0, 1.0, 0.5) == pytest.approx(20 * np.log10(0.5 * 255 * np.sqrt(12)))


def test_range_observer():
    from sdrt.export.quantize import RangeObserver

    obs = RangeObserver(["a", "b"])
    obs.update([np.array([1.0, -2.0], np.float32), np.array([3.0], np.float32)])
    obs.update([np.array([0.5, 4.0], np.float32), np.array([-1.0, 1.0], np.float32)])
    r = obs.ranges()
    assert r["a"][:2] == (-2.0, 4.0) and r["b"][:2] == (-1.0, 3.0)
    assert r["a"][2] == pytest.approx(np.sqrt((1 + 4 + 0.25 + 16) / 4))
    assert r["b"][2] == pytest.approx(np.sqrt(11 / 3))


def test_fp32_vae_decoder_beside_fp16(models, tmp_path):
    """--fp32-vae-decoder writes an fp32 decoder next to the fp16 one; the loader lists it."""
    from sdrt.runtime.modelfolder import FP32_VAE_DECODER

    out = export_model(models.source("tiny-sd1"), tmp_path / "m", target="cuda", precision="fp16", fp32_vae_decoder=True,
                       log=lambda m: None)
    info = read_model_folder(out, verify="full")
    assert info.precision["vae_decoder"] == "fp16" and info.precision[FP32_VAE_DECODER] == "fp32"
    assert info.graph_files[FP32_VAE_DECODER] == out / FP32_VAE_DECODER / "model.onnx"
    types = Counter(t.data_type for t in onnx.load(str(info.graph_files[FP32_VAE_DECODER])).graph.initializer)
    assert types[onnx.TensorProto.FLOAT] > 10 and types[onnx.TensorProto.FLOAT16] == 0
    with pytest.raises(ExportError, match="--fp32-vae-decoder goes with --precision fp16"):
        export_model(models.source("tiny-sd1"), tmp_path / "n", fp32_vae_decoder=True)


def test_fp16_cuda_export_structure(models):
    """The CUDA fp16 graphs need the CUDA provider to run; on the CPU, check their structure."""
    folder = models.exported("tiny-sd1", target="cuda", precision="fp16")
    info = read_model_folder(folder)
    assert info.target == "cuda" and set(info.precision.values()) == {"fp16"}
    fused = {}
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        m = onnx.load(str(folder / name / "model.onnx"))
        onnx.checker.check_model(m)
        ops = Counter(n.op_type for n in m.graph.node)
        fused[name] = ops
        init_types = Counter(t.data_type for t in m.graph.initializer)
        n_fp16 = sum(t.dims and np.prod(t.dims) or 0 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        n_fp32 = sum(t.dims and np.prod(t.dims) or 0 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        print(f"{name}: {dict(init_types)} fp16 weights {n_fp16}, fp32 weights {n_fp32}")
        assert n_fp16 > 20 * n_fp32, f"{name}: weights are not fp16"
        # fp32 initializers that remain are GroupNorm gamma/beta (kept by the converter) or the
        # timestep projection; nothing large.
        for t in m.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                assert np.prod(t.dims) <= 4096, t.name
    unet_ops = fused["unet"]
    print("unet fused ops:", {k: v for k, v in unet_ops.items() if k in ("MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "SkipLayerNormalization")})
    assert unet_ops["MultiHeadAttention"] >= 4  # self + cross attention in both transformer blocks
    assert unet_ops["GroupNorm"] + unet_ops["SkipGroupNorm"] >= 10
    assert unet_ops["NhwcConv"] >= 10 and unet_ops["BiasSplitGelu"] >= 2
    assert unet_ops["Softmax"] == 0  # every attention is fused
    assert fused["vae_decoder"]["Attention"] + fused["vae_decoder"]["MultiHeadAttention"] >= 1
    assert fused["text_encoder"]["SkipLayerNormalization"] >= 2
    unet = onnx.load(str(folder / "unet" / "model.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}
    assert types["sample"] == onnx.TensorProto.FLOAT16
    assert types["timestep"] == onnx.TensorProto.FLOAT  # the timestep embedding stays fp32
    # Loading it for the CPU provider is refused with a message, not an ORT error.
    from sdrt.runtime.sessions import ProviderError, resolve_provider

    with pytest.raises(ProviderError, match="CUDA"):
        resolve_provider("cpu", info)


def test_vae_attention_fusion_keeps_biases(models, tmp_path):
    """ONNX Runtime's VAE attention fusion drops the q/k/v biases; sdrt's export restores them.
    Without that, the fused VAE differs from the PyTorch VAE (the export self-check catches it)."""
    folder = models.exported("tiny-sd1")
    m = onnx.load(str(folder / "vae_decoder" / "model.onnx"))
    # The cpu target runs the fused attention as MatMul + bias Add + Split + MultiHeadAttention.
    assert not [n for n in m.graph.node if n.op_type == "Attention"]
    assert [n for n in m.graph.node if n.op_type == "MultiHeadAttention"], "the VAE attention was not fused"
    add = [n for n in m.graph.node if n.name.endswith("/Add_qkv_bias")]
    assert add, "the q/k/v bias is not added"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    assert np.abs(inits[add[0].input[1]]).max() > 0


@pytest.mark.parametrize("bias,heads", [(True, 1), (False, 4)])
def test_attention_to_mha_is_exact(bias, heads):
    """The cpu target's rewrite of ONNX Runtime's fused self-attention (`Attention`, which
    materialises the S x S probabilities on the CPU) into MatMul + Split + MultiHeadAttention
    (flash attention on the CPU) computes the same function, with or without a q/k/v bias."""
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.export.optimize import attention_to_mha

    g = np.random.default_rng(0)
    d = 16
    inits = [numpy_helper.from_array(g.standard_normal((d, 3 * d)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(g.standard_normal(3 * d).astype(np.float32) * bias, "b")]
    graph = helper.make_graph(
        [helper.make_node("Attention", ["x", "w", "b"], ["y"], name="att", domain="com.microsoft", num_heads=heads)],
        "att", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = g.standard_normal((2, 37, d)).astype(np.float32)
    ref = _session(model.SerializeToString()).run(None, {"x": x})[0]
    assert attention_to_mha(model) == 1
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops == Counter({"MatMul": 1, "Split": 1, "MultiHeadAttention": 1, **({"Add": 1} if bias else {})})
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_session(model.SerializeToString()).run(None, {"x": x})[0], ref, atol=1e-5)


def test_corrupted_file_is_reported_by_name(models, copy_folder):
    folder = copy_folder(models.exported("tiny-sd1"))
    read_model_folder(folder, verify="full")
    unet = folder / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=r"unet/model\.onnx.*sha256"):
        read_model_folder(folder)
    # Truncated file: size check, named.
    vae = folder / "vae_decoder" / "model.onnx"
    vae.write_bytes(vae.read_bytes()[:1000])
    with pytest.raises(ModelFolderError, match=r"vae_decoder/model\.onnx has 1000 bytes"):
        read_model_folder(folder, verify="size")
    (folder / "text_encoder" / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"text_encoder/model\.onnx is missing"):
        read_model_folder(folder, verify="size")


def test_verification_cache_rehashes_changed_files(models, copy_folder):
    """verify='auto' skips hashing an unchanged file, but a rewritten file (new mtime) is hashed."""
    folder = copy_folder(models.exported("tiny-sd1"))
    read_model_folder(folder)  # hashes and remembers
    read_model_folder(folder)  # from the cache
    p = folder / "unet" / "model.onnx"
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    before = p.stat().st_mtime_ns
    p.write_bytes(bytes(data))
    # A rewrite within the file system's timestamp granularity keeps the old mtime: give it a new one.
    os.utime(p, ns=(before + 10**9, before + 10**9))
    with pytest.raises(ModelFolderError, match="unet/model.onnx"):
        read_model_folder(folder)


def test_interrupted_export_leaves_nothing_loadable(models, tmp_path):
    src = models.source("tiny-sd1")
    out = tmp_path / "out"
    code = (
        "import sys; from sdrt.export import export_model; "
        f"export_model({str(src)!r}, {str(out)!r}, log=lambda m: print(m, flush=True))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # Wait until the export has written its first graph, then kill it.
        for line in proc.stdout:
            if "text_encoder" in line and "written" in line:
                break
        else:
            pytest.fail("export finished or failed before it could be interrupted")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert partial, "the temporary folder should be where the export was killed"
    assert (partial[0] / INCOMPLETE_MARKER).exists()
    with pytest.raises(ModelFolderError, match="interrupted"):
        read_model_folder(partial[0])
    # The next export into the same place cleans the leftovers up and succeeds.
    export_model(src, out, log=lambda m: None)
    assert read_model_folder(out).family == "sd1"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_export_errors(models, tmp_path):
    src = models.source("tiny-sd1")
    with pytest.raises(ExportError, match="does not exist"):
        export_model(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="model_index.json is missing"):
        export_model(tmp_path / "empty", tmp_path / "o")
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ExportError, match="model_index.json lists no unet"):
        export_model(xl, tmp_path / "o")
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLControlNetPipeline"}))
    with pytest.raises(ExportError, match="StableDiffusionXLControlNetPipeline pipeline; sdrt exports .*StableDiffusionXLPipeline"):
        export_model(xl, tmp_path / "o")
    # A UNet of another architecture.
    odd = tmp_path / "odd"
    import shutil

    shutil.copytree(src, odd)
    idx = json.loads((odd / "model_index.json").read_text())
    idx["unet"] = ["diffusers", "UNet2DModel"]
    (odd / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(ExportError, match="unsupported architecture"):
        export_model(odd, tmp_path / "o")
    with pytest.raises(ExportError, match="precision"):
        export_model(src, tmp_path / "o", precision="bf16")
    with pytest.raises(ExportError, match="--target cuda"):
        export_model(src, tmp_path / "o", precision="fp16", target="cpu")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export_model(src, existing)
    assert (existing / "keep.txt").read_text() == "mine"


def test_full_disk_is_a_clear_error(models, tmp_path, monkeypatch):
    import sdrt.export.graphs as graphs

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(graphs.torch.onnx, "export", full)
    with pytest.raises(ExportError, match="no space left"):
        export_model(models.source("tiny-sd1"), tmp_path / "o", log=lambda m: None)
    assert not any(tmp_path.iterdir()), "the temporary folder must be removed"


def test_overwrite_replaces_atomically(models, tmp_path):
    src = models.source("tiny-sd1")
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_model(src, out, overwrite=True, log=lambda m: None)
    assert not (out / "old.txt").exists() and read_model_folder(out).family == "sd1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_runtime_import_does_not_need_torch():
    """sdrt.runtime, sdrt.schedulers and the CLI entry import with torch made unimportable."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sdrt.runtime, sdrt.schedulers, sdrt.cli\n"
        "import sdrt.runtime.modelfolder, sdrt.runtime.sessions\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def _mha_input_types(folder):
    """For each MultiHeadAttention node of the UNet: the element types its data inputs arrive in."""
    m = onnx.load(str(folder / "unet" / "model.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    types = []
    for n in m.graph.node:
        if n.op_type == "MultiHeadAttention":
            for i in n.input[:3]:
                p = producer.get(i)
                if i and p is not None and p.op_type == "Cast":
                    types.append(next(a.i for a in p.attribute if a.name == "to"))
                elif i:
                    types.append("fp16 producer")
    return types


def test_sd2_fp16_unet_keeps_attention_fp32(models, tmp_path):
    """SD 2.x UNets overflow in fp16 attention (black images); their fp16 export keeps
    MultiHeadAttention in fp32 by default (inputs cast to float), SD 1.x keeps it fp16, and an
    explicit fp32_ops list overrides the default."""
    sd2 = models.exported("tiny-sd2-v", target="cuda", precision="fp16")
    sd1 = models.exported("tiny-sd1", target="cuda", precision="fp16")
    assert read_model_folder(sd2).manifest["fp32_ops"] == {"unet": ["MultiHeadAttention"]}
    assert read_model_folder(sd1).manifest["fp32_ops"] == {}
    t2, t1 = _mha_input_types(sd2), _mha_input_types(sd1)
    assert t2 and set(t2) == {onnx.TensorProto.FLOAT}
    assert t1 and onnx.TensorProto.FLOAT not in t1
    none = export_model(models.source("tiny-sd2-v"), tmp_path / "none", target="cuda", precision="fp16", fp32_ops=(),
                        check=False, log=lambda m: None)
    assert read_model_folder(none).manifest["fp32_ops"] == {}
    assert onnx.TensorProto.FLOAT not in _mha_input_types(none)
