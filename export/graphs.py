"""PyTorch modules -> fp32 ONNX graphs, and the check that each graph computes what its module does."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdrt.runtime.modelfolder import CLIP_SKIP_OUTPUT

from .onnxfile import TWO_GB, save_onnx


class TextEncoderGraph(torch.nn.Module):
    """CLIP text encoder: input_ids -> last_hidden_state, pooler_output, hidden_states_normed.

    hidden_states_normed[:, k-1] = final_layer_norm(hidden_states[-k]): A1111's "clip skip" k
    (k = 1 is last_hidden_state itself), so the runtime can skip layers without PyTorch.
    """

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.long(), output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        layers = [out.last_hidden_state] + [norm(hs[-k]) for k in range(2, len(hs))]
        return out.last_hidden_state, out.pooler_output, torch.stack(layers, dim=1)


class UNetGraph(torch.nn.Module):
    """UNet: sample, timestep (scalar), encoder_hidden_states -> out_sample."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """VAE encoder: sample in [-1, 1] -> latent_parameters = mean ++ logvar (unscaled, unclamped)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


class VaeDecoderGraph(torch.nn.Module):
    """VAE decoder: latent_sample (already divided by the scaling factor) -> sample in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]  # example inputs, in order
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


def graph_specs(pipe) -> list[GraphSpec]:
    """The four graphs of a diffusers Stable Diffusion pipeline, with small example inputs."""
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    # The UNet is traced at an odd latent size: diffusers then takes each upsampler's output size
    # from its skip connection, so the graph runs at every latent size (an even example would bake
    # in "double the size", and latents the UNet cannot halve evenly would fail).
    uh = uw = 9
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([pipe.tokenizer("a red circle on a white background", padding="max_length", max_length=77).input_ids])
    return [
        GraphSpec(
            "text_encoder",
            TextEncoderGraph(te),
            {"input_ids": ids.to(torch.int32)},
            ("last_hidden_state", "pooler_output", CLIP_SKIP_OUTPUT),
            {
                "input_ids": {0: "batch"},
                "last_hidden_state": {0: "batch"},
                "pooler_output": {0: "batch"},
                CLIP_SKIP_OUTPUT: {0: "batch"},
            },
        ),
        GraphSpec(
            "unet",
            UNetGraph(unet),
            {
                "sample": torch.randn(2, unet.config.in_channels, uh, uw, generator=g),
                "timestep": torch.tensor(500.25, dtype=torch.float32),
                "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
            },
            ("out_sample",),
            {
                "sample": {0: "batch", 2: "height", 3: "width"},
                "encoder_hidden_states": {0: "batch", 1: "sequence"},
                "out_sample": {0: "batch", 2: "height", 3: "width"},
            },
        ),
        *vae_specs(vae),
    ]


def vae_specs(vae) -> list[GraphSpec]:
    """The VAE's encoder and decoder graphs, with small example inputs."""
    g = torch.Generator().manual_seed(1)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h = w = 8
    latent_c = vae.config.latent_channels
    return [
        GraphSpec(
            "vae_encoder",
            VaeEncoderGraph(vae),
            {"sample": torch.rand(1, 3, h * factor, w * factor, generator=g) * 2 - 1},
            ("latent_parameters",),
            {"sample": {0: "batch", 2: "height", 3: "width"}, "latent_parameters": {0: "batch", 2: "height", 3: "width"}},
        ),
        GraphSpec(
            "vae_decoder",
            VaeDecoderGraph(vae),
            {"latent_sample": torch.randn(1, latent_c, h, w, generator=g)},
            ("sample",),
            {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "height", 3: "width"}},
        ),
    ]


def _use_plain_attention(module: torch.nn.Module) -> None:
    """Trace attention as MatMul/Softmax/MatMul: the pattern ONNX Runtime's fusions recognise."""
    from diffusers.models.attention_processor import AttnProcessor

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor())


def _force_eager_clip_attention(te) -> None:
    cfg = getattr(te, "config", None)
    if cfg is not None and hasattr(cfg, "_attn_implementation"):
        try:
            cfg._attn_implementation = "eager"
        except Exception:
            pass


def export_graph(spec: GraphSpec, path: Path, opset: int) -> Path:
    """Export `spec` as fp32 ONNX to `path` (one file, or model.onnx + model.onnx_data over 2 GB)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    inner = next(iter(spec.module.children()))
    _use_plain_attention(inner)
    if spec.name.startswith("text_encoder"):
        _force_eager_clip_attention(inner)
    size = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    raw = path.parent / "_raw" / path.name if size >= TWO_GB else path
    raw.parent.mkdir(exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module,
            tuple(spec.inputs.values()),
            str(raw),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    if raw != path:
        # The TorchScript exporter writes one file per tensor past 2 GB: gather them into one.
        model = onnx.load(str(raw), load_external_data=True)
        shutil.rmtree(raw.parent)
        save_onnx(model, path)
    return path


def check_graph(spec: GraphSpec, path: Path, rtol: float = 1e-4) -> float:
    """Run the ONNX graph with ONNX Runtime (CPU) and the module with PyTorch on the spec's inputs.

    Returns the largest absolute difference over all outputs; raises if it exceeds
    rtol * max(1, largest |output|).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in spec.inputs.items()}
    got = sess.run(list(spec.outputs), feeds)
    with torch.no_grad():
        ref = spec.module(*spec.inputs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    worst, scale = 0.0, 1.0
    for name, a, b in zip(spec.outputs, got, ref):
        b = b.float().numpy()
        if a.shape != b.shape:
            raise RuntimeError(f"{spec.name}: output {name} has shape {a.shape} in ONNX, {b.shape} in PyTorch")
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
        scale = max(scale, float(np.max(np.abs(b))))
    if not np.isfinite(worst) or worst > rtol * scale:
        raise RuntimeError(
            f"{spec.name}: the ONNX graph differs from the PyTorch module by {worst:.3g} "
            f"(tolerance {rtol * scale:.3g}); the export is wrong"
        )
    return worst
