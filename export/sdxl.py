"""SDXL: what an SDXL diffusers folder adds to a Stable Diffusion one (PyTorch side only).

- two text encoders: `text_encoder` (CLIP ViT-L) and `text_encoder_2` (OpenCLIP ViT-bigG with a
  projection); a refiner has the second one alone. Each graph gives the hidden states of every
  layer, unnormalised, in optimum's layout (`hidden_states.0` = the embeddings ... `hidden_states.N`
  = the last layer), beside `last_hidden_state` and the pooled output (`pooler_output`, or
  `text_embeds` for the projected one): SDXL conditions on the penultimate layer, clip skip on
  earlier ones, and the UNet takes the second encoder's `text_embeds`;
- a UNet with two more inputs, `text_embeds` (the pooled text) and `time_ids` (SDXL's size and
  crop micro-conditioning, plus the aesthetic score for a refiner);
- a VAE that overflows in fp16 (its config says `force_upcast`): on the cuda target it stays fp32,
  unless another VAE made for fp16 is given (`--vae`, e.g. an "fp16-fix" VAE whose config says
  force_upcast false), as diffusers and ONNX Runtime's SDXL stack do.

The folder keeps optimum's SDXL layout (text_encoder_2/, tokenizer_2/), so either tool loads it.
"""

from __future__ import annotations

from pathlib import Path

PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
# Component -> the class model_index.json must name for it (text_encoder/tokenizer may be absent: a refiner).
COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "tokenizer_2": "CLIPTokenizer",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "CLIPTokenizer",
}
OPTIONAL = ("text_encoder", "tokenizer")


def is_sdxl(index: dict) -> bool:
    return index.get("_class_name") in PIPELINES


def present(index: dict, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and bool(entry) and entry[-1] is not None


def check_index(src: Path, index: dict, error) -> None:
    """The components an SDXL folder must have, each of the class sdrt exports; `error` builds the exception."""
    for comp, want in COMPONENTS.items():
        if not present(index, comp):
            if comp in OPTIONAL and not present(index, "text_encoder") and not present(index, "tokenizer"):
                continue  # a refiner: the second text encoder alone
            raise error(f"{src}: model_index.json lists no {comp}")
        if not (src / comp).is_dir():
            raise error(f"{src}: the {comp}/ folder is missing")
        if not str(index[comp][-1]).startswith(want):
            raise error(f"{src}: {comp} is a {index[comp][-1]}; sdrt exports a {want} there (unsupported architecture)")


def text_encoders(index: dict) -> tuple[str, ...]:
    """The text encoder graphs of the folder, in the order their hidden states are concatenated."""
    return tuple(n for n in ("text_encoder", "text_encoder_2") if present(index, n))


def load_text_encoder(src: Path, name: str):
    """text_encoder (CLIPTextModel) or text_encoder_2 (CLIPTextModelWithProjection), fp32."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return cls.from_pretrained(src, subfolder=name, local_files_only=True, torch_dtype=torch.float32).eval()


def load_tokenizers(src: Path, index: dict) -> dict:
    """Text encoder graph name -> its CLIP tokenizer (tokenizer/ or tokenizer_2/)."""
    from transformers import CLIPTokenizer

    return {n: CLIPTokenizer.from_pretrained(src, subfolder=tokenizer_folder(n), local_files_only=True)
            for n in text_encoders(index)}


def tokenizer_folder(text_encoder: str) -> str:
    return text_encoder.replace("text_encoder", "tokenizer")


def check_unet(src: Path, unet_config, error) -> None:
    if unet_config.get("addition_embed_type") != "text_time":
        raise error(f"{src}: an SDXL pipeline whose UNet has addition_embed_type {unet_config.get('addition_embed_type')!r}; "
                    "sdrt exports SDXL UNets ('text_time')")
    if unet_config.get("time_cond_proj_dim"):
        raise error(f"{src}: the UNet takes a guidance embedding (LCM-distilled); sdrt exports plain SDXL UNets")


def check_vae(src: Path, vae_config, error) -> None:
    if vae_config.get("latents_mean") is not None or vae_config.get("latents_std") is not None:
        raise error(f"{src}: the VAE normalises its latents with latents_mean/latents_std; sdrt accepts VAEs scaled "
                    "by scaling_factor alone (SDXL's)")


def time_ids(index: dict) -> int:
    """Numbers in the UNet's time_ids: original size, crop and target size (6), or for a refiner
    original size, crop and aesthetic score (5)."""
    return 5 if index.get("requires_aesthetics_score") else 6


def vae_in_fp16(vae_config) -> bool:
    """Whether the VAE may run in fp16: diffusers' own test, its config's force_upcast."""
    return not vae_config.get("force_upcast", True)


def manifest_fields(index: dict, text_configs: dict[str, dict]) -> dict:
    """What sdrt.json records beyond an SD folder's fields; text_configs: graph -> its config dict."""
    names = text_encoders(index)
    return {
        "text_encoders": list(names),
        "text_hidden_size": sum(int(text_configs[n]["hidden_size"]) for n in names),
        "text_layers": [int(text_configs[n]["num_hidden_layers"]) for n in names],
        "sdxl": {
            "time_ids": time_ids(index),
            "pooled_size": int(text_configs["text_encoder_2"]["projection_dim"]),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
            "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
        },
    }


def index_entries(index: dict) -> dict:
    """model_index.json of the exported folder: the graphs in optimum's naming."""
    out = {k: v for k, v in index.items() if k != "vae"}
    for k in ("unet", "vae_encoder", "vae_decoder", *text_encoders(index)):
        out[k] = ["sdrt", "OnnxGraph"]
    return out


# ------------------------------------------------------------------------------------ graphs
def _hidden_state_names(te) -> tuple[str, ...]:
    return tuple(f"hidden_states.{i}" for i in range(int(te.config.num_hidden_layers) + 1))


def text_encoder_graph(te, name: str):
    """The module traced for an SDXL text encoder: pooled output and every layer's hidden states."""
    import torch

    projected = name == "text_encoder_2"

    class TextEncoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = te

        def forward(self, input_ids):
            out = self.text_encoder(input_ids.long(), output_hidden_states=True, return_dict=True)
            head = (out.text_embeds, out.last_hidden_state) if projected else (out.last_hidden_state, out.pooler_output)
            return (*head, *out.hidden_states)

    heads = ("text_embeds", "last_hidden_state") if projected else ("last_hidden_state", "pooler_output")
    return TextEncoderGraph(), heads + _hidden_state_names(te)


def unet_graph(unet):
    import torch

    class UNetGraph(torch.nn.Module):
        """UNet: sample, timestep (scalar), encoder_hidden_states, text_embeds, time_ids -> out_sample."""

        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            cond = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]

    return UNetGraph()


def text_encoder_spec(te, tokenizer, name: str):
    import torch

    from .graphs import EXAMPLE_PROMPT, GraphSpec

    module, outputs = text_encoder_graph(te, name)
    ids = torch.tensor([tokenizer(EXAMPLE_PROMPT, padding="max_length", max_length=77).input_ids])
    axes = {o: {0: "batch"} for o in outputs}
    return GraphSpec(name, module, {"input_ids": ids.to(torch.int32)}, outputs, {"input_ids": {0: "batch"}, **axes})


def unet_spec(unet, n_time_ids: int):
    """The UNet at an odd latent size (see graphs.unet_spec), with SDXL's two extra inputs."""
    import torch

    from .graphs import _UNET_LATENT as latent, GraphSpec

    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    pooled = int(cfg.projection_class_embeddings_input_dim) - n_time_ids * int(cfg.addition_time_embed_dim)
    sizes = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0][:n_time_ids]] * 2)
    if n_time_ids == 5:
        sizes[:, 4] = torch.tensor([6.0, 2.5])  # a refiner's aesthetic score
    return GraphSpec(
        "unet",
        unet_graph(unet),
        {
            "sample": torch.randn(2, cfg.in_channels, latent, latent, generator=g),
            "timestep": torch.tensor(500.25, dtype=torch.float32),
            "encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": sizes,
        },
        ("out_sample",),
        {
            "sample": {0: "batch", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "text_embeds": {0: "batch"},
            "time_ids": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"},
        },
    )
