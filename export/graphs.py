"""PyTorch modules -> fp32 ONNX graphs, and the check that each graph computes what its module does."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdrt.runtime.modelfolder import CLIP_SKIP_OUTPUT



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


# Latent size of the example inputs. The UNet is traced at an odd latent size: diffusers then takes
# each upsampler's output size from its skip connection, so the graph runs at every latent size (an
# even example would bake in "double the size", and latents the UNet cannot halve evenly would fail).
_LATENT = 8
_UNET_LATENT = 9
EXAMPLE_PROMPT = "a red circle on a white background"


def text_encoder_spec(te, tokenizer) -> GraphSpec:
    ids = torch.tensor([tokenizer(EXAMPLE_PROMPT, padding="max_length", max_length=77).input_ids])
    return GraphSpec(
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
    )


def unet_spec(unet) -> GraphSpec:
    g = torch.Generator().manual_seed(0)
    return GraphSpec(
        "unet",
        UNetGraph(unet),
        {
            "sample": torch.randn(2, unet.config.in_channels, _UNET_LATENT, _UNET_LATENT, generator=g),
            "timestep": torch.tensor(500.25, dtype=torch.float32),
            "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
        },
        ("out_sample",),
        {
            "sample": {0: "batch", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "out_sample": {0: "batch", 2: "height", 3: "width"},
        },
    )


def vae_specs(vae) -> list[GraphSpec]:
    g = torch.Generator().manual_seed(1)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h = w = _LATENT
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
            {"latent_sample": torch.randn(1, vae.config.latent_channels, h, w, generator=g)},
            ("sample",),
            {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "height", 3: "width"}},
        ),
    ]


def graph_specs(pipe) -> list[GraphSpec]:
    """The four graphs of a diffusers Stable Diffusion pipeline, with small example inputs."""
    return [text_encoder_spec(pipe.text_encoder, pipe.tokenizer), unet_spec(pipe.unet), *vae_specs(pipe.vae)]


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


def prepare_module(spec: GraphSpec) -> None:
    """Put the module into the form it is traced in (plain attention, eager CLIP attention)."""
    inner = next(iter(spec.module.children()))
    _use_plain_attention(inner)
    if spec.name == "text_encoder":
        _force_eager_clip_attention(inner)


def reference_outputs(spec: GraphSpec) -> tuple[np.ndarray, ...]:
    """The module's outputs on the spec's example inputs (kept for the checks once it is freed)."""
    prepare_module(spec)
    with torch.no_grad():
        ref = spec.module(*spec.inputs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    return tuple(r.float().numpy().copy() for r in ref)


class _ParamCapture:
    """Catches the parameters the TorchScript exporter would write into the graph proto.

    torch.onnx.export(..., export_params=False) writes the graph with its parameters as graph
    inputs; the final parameter dict (after constant folding and de-duplication, under the names
    the graph uses) passes through torch._C._jit_pass_onnx_deduplicate_initializers, which this
    wraps. The parameters are then written as initializers into an external data file one at a
    time, instead of being copied into a protobuf message and serialized as a whole.
    """

    def __init__(self):
        self.params: dict[str, torch.Tensor] | None = None
        self._orig = getattr(torch._C, "_jit_pass_onnx_deduplicate_initializers", None)

    @property
    def available(self) -> bool:
        return self._orig is not None

    def __enter__(self):
        orig = self._orig

        def dedup(graph, params_dict, is_train):
            out = orig(graph, params_dict, is_train)
            self.params = dict(out)
            return out

        torch._C._jit_pass_onnx_deduplicate_initializers = dedup
        return self

    def __exit__(self, *exc):
        torch._C._jit_pass_onnx_deduplicate_initializers = self._orig
        return False


def _attach_params(path: Path, spec: GraphSpec, params: dict[str, torch.Tensor]) -> None:
    """Turn the parameter inputs of the graph at `path` into initializers stored in path's
    external data file (tensors of INLINE_BELOW bytes or more) or inline."""
    import onnx
    from onnx import helper

    from .onnxfile import INLINE_BELOW, load_graph

    model = load_graph(path)
    data = path.with_name(path.name + "_data")
    real = set(spec.inputs)
    kept, inits = [], []
    with open(data, "wb") as f:
        for inp in model.graph.input:
            if inp.name in real:
                kept.append(inp)
                continue
            if inp.name not in params:
                raise RuntimeError(f"{spec.name}: graph input {inp.name} is neither an input nor a parameter")
            t = params[inp.name].detach().cpu().contiguous()
            arr = t.numpy()
            proto = onnx.TensorProto()
            proto.name = inp.name
            proto.dims.extend(arr.shape)
            proto.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            if arr.nbytes >= INLINE_BELOW:
                offset = f.tell()
                f.write(memoryview(arr.reshape(-1)).cast("B"))
                for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    e = proto.external_data.add()
                    e.key, e.value = k, v
                proto.data_location = onnx.TensorProto.EXTERNAL
            else:
                proto.raw_data = arr.tobytes()
            inits.append(proto)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.graph.initializer.extend(inits)
    onnx.save(model, str(path))


def export_graph(spec: GraphSpec, path: Path, opset: int) -> Path:
    """Export `spec` as fp32 ONNX to `path`, its tensors of 1 KiB or more in `path`'s external
    data file (`model.onnx_data`): the layout the later passes read without loading the weights."""
    from .onnxfile import load_graph, write_graph

    path.parent.mkdir(parents=True, exist_ok=True)
    prepare_module(spec)
    capture = _ParamCapture()
    raw = path if capture.available else path.parent / "_raw" / path.name
    raw.parent.mkdir(exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        if capture.available:
            with capture:
                torch.onnx.export(spec.module, tuple(spec.inputs.values()), str(raw), export_params=False, **kwargs)
        else:
            torch.onnx.export(spec.module, tuple(spec.inputs.values()), str(raw), **kwargs)
    if capture.available:
        if capture.params is None:
            raise RuntimeError(f"{spec.name}: the exporter did not hand over the parameters")
        _attach_params(path, spec, capture.params)
        capture.params = None
    else:
        # The weights are in the proto, or one file per tensor past 2 GB: gather them.
        write_graph(load_graph(raw), raw.parent, path, external=True)
        shutil.rmtree(raw.parent)
    return path


def check_graph(name: str, path: Path, inputs: dict[str, torch.Tensor], outputs: tuple[str, ...],
                ref: tuple[np.ndarray, ...], rtol: float = 1e-4) -> float:
    """Run the ONNX graph with ONNX Runtime (CPU) on `inputs` and compare with the module's
    outputs `ref` (from reference_outputs).

    Returns the largest absolute difference over all outputs; raises if it exceeds
    rtol * max(1, largest |output|). The session is released before returning.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = sess.run(list(outputs), feeds)
    del sess
    worst, scale = 0.0, 1.0
    for out, a, b in zip(outputs, got, ref):
        if a.shape != b.shape:
            raise RuntimeError(f"{name}: output {out} has shape {a.shape} in ONNX, {b.shape} in PyTorch")
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
        scale = max(scale, float(np.max(np.abs(b))))
    if not np.isfinite(worst) or worst > rtol * scale:
        raise RuntimeError(
            f"{name}: the ONNX graph differs from the PyTorch module by {worst:.3g} "
            f"(tolerance {rtol * scale:.3g}); the export is wrong"
        )
    return worst
