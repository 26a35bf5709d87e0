"""Write a diffusers Stable Diffusion folder as an original-layout (CompVis / A1111) single file.

The key mapping is written here, in the direction diffusers -> original, independently of
sdrt.export.checkpoint (which maps the other way); tests check it against diffusers' own
single-file loader before relying on it.
"""

from __future__ import annotations

from pathlib import Path

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str) -> str:
    for d, o in _RESNET:
        if rest.startswith(d + "."):
            return o + rest[len(d):]
    raise KeyError(rest)


def unet_to_original(sd: dict, layers_per_block: int, attn_levels: list[bool]) -> dict:
    per = layers_per_block + 1
    out = {}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    n_up = len(attn_levels)
    for k, v in sd.items():
        p = k.split(".")
        if ".".join(p[:-1]) in top:
            name = top[".".join(p[:-1])] + "." + p[-1]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                name = f"input_blocks.{(b + 1) * per}.0.op." + ".".join(p[5:])
            else:
                i = 1 + b * per + int(p[3])
                rest = ".".join(p[4:])
                name = f"input_blocks.{i}.0." + _resnet(rest) if kind == "resnets" else f"input_blocks.{i}.1." + rest
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            if p[1] == "resnets":
                name = f"middle_block.{2 * int(p[2])}." + _resnet(rest)
            else:
                name = "middle_block.1." + rest
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            has_attn = attn_levels[n_up - 1 - b]
            if kind == "upsamplers":
                name = f"output_blocks.{b * per + layers_per_block}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
            else:
                i = b * per + int(p[3])
                rest = ".".join(p[4:])
                name = f"output_blocks.{i}.0." + _resnet(rest) if kind == "resnets" else f"output_blocks.{i}.1." + rest
        else:
            raise KeyError(k)
        out["model.diffusion_model." + name] = v
    return out


def vae_to_original(sd: dict, levels: int) -> dict:
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in sd.items():
        part, rest = k.split(".", 1)
        p = rest.split(".")
        if rest.startswith(("conv_in.", "conv_out.")) or part in ("quant_conv", "post_quant_conv"):
            name = k
        elif rest.startswith("conv_norm_out."):
            name = f"{part}.norm_out.{p[-1]}"
        elif p[0] in ("down_blocks", "up_blocks"):
            i = int(p[1]) if p[0] == "down_blocks" else levels - 1 - int(p[1])
            sub = "down" if p[0] == "down_blocks" else "up"
            if p[2] == "resnets":
                tail = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
                name = f"{part}.{sub}.{i}.block.{p[3]}.{tail}"
            else:
                name = f"{part}.{sub}.{i}.{'downsample' if sub == 'down' else 'upsample'}.conv.{p[-1]}"
        elif p[0] == "mid_block":
            if p[1] == "resnets":
                name = f"{part}.mid.block_{int(p[2]) + 1}." + ".".join(p[3:]).replace("conv_shortcut", "nin_shortcut")
            else:
                layer = ".".join(p[3:-1])
                name = f"{part}.mid.attn_1.{attn[layer]}.{p[-1]}"
                if v.ndim == 2:
                    v = v[:, :, None, None]  # the original stores them as 1x1 convolutions
        else:
            raise KeyError(k)
        out["first_stage_model." + name] = v
    return out


def clip_to_original(sd: dict) -> dict:
    return {"cond_stage_model.transformer." + k: v for k, v in sd.items() if not k.endswith("position_ids")}


def open_clip_to_original(sd: dict, layers: int, seed: int = 0, pre: str = "cond_stage_model.model.",
                          projection: torch.Tensor | None = None) -> dict:
    """OpenCLIP layout. SD 2.x uses the penultimate layer, so one more (unused) block and a random
    projection are written; with `projection` (SDXL's, as a Linear weight), its blocks are all
    used and the projection is stored as OpenCLIP's (width, projection) matrix."""
    g = torch.Generator().manual_seed(seed)
    if projection is not None:
        layers -= 1  # the last real block takes the place of the unused one below
    t = "text_model."
    out = {pre + "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
           pre + "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
           pre + "ln_final.weight": sd[t + "final_layer_norm.weight"],
           pre + "ln_final.bias": sd[t + "final_layer_norm.bias"]}
    hidden = out[pre + "ln_final.weight"].shape[0]
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers + 1):
        src = f"{t}encoder.layers.{i}."
        dst = f"{pre}transformer.resblocks.{i}."
        if i == layers and projection is None:  # the unused last block: random values
            like = {k[len(f"{t}encoder.layers.0."):]: v for k, v in sd.items() if k.startswith(f"{t}encoder.layers.0.")}
            layer = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in like.items()}
        else:
            layer = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([layer[f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
        for k, v in layer.items():
            if "_proj." in k and not k.startswith("self_attn.out_proj"):
                continue
            stem, kind = k.rsplit(".", 1)
            out[dst + names[stem] + "." + kind] = v
    out[pre + "text_projection"] = torch.randn(hidden, hidden, generator=g) if projection is None else projection.T
    out[pre + "logit_scale"] = torch.tensor(4.6)
    return out


def sdxl_original_state_dict(folder: Path) -> dict:
    """An SDXL diffusers folder's weights under the names of SDXL's single files (fp32): CLIP ViT-L
    under conditioner.embedders.0.transformer., OpenCLIP under conditioner.embedders.1.model. (a
    refiner's under conditioner.embedders.0.model.)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    attn = [t.startswith("CrossAttn") for t in unet.config.down_block_types]
    sd = unet_to_original(unet.state_dict(), unet.config.layers_per_block, attn)
    sd.update(vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)))
    refiner = not (folder / "text_encoder").is_dir()
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    text2 = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
             for k, v in te2.state_dict().items()}
    pre2 = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    sd.update(open_clip_to_original(text2, te2.config.num_hidden_layers, pre=pre2,
                                    projection=text2["text_projection.weight"]))
    if not refiner:
        te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        sd.update({"conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
                   for k, v in te.state_dict().items() if not k.endswith("position_ids")})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def original_state_dict(folder: Path, open_clip: bool) -> dict:
    """The diffusers folder's weights under the original single-file names (fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    attn = [t.startswith("CrossAttn") for t in unet.config.down_block_types]
    sd = unet_to_original(unet.state_dict(), unet.config.layers_per_block, attn)
    sd.update(vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)))
    # (transformers 5.6+ names CLIPTextModel's weights without the "text_model." of real checkpoints)
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in te.state_dict().items()}
    sd.update(open_clip_to_original(text, te.config.num_hidden_layers) if open_clip else clip_to_original(text))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_checkpoint(folder: Path, path: Path, open_clip: bool, dtype=torch.float32, extra: dict | None = None,
                     wrap: bool = False) -> Path:
    """Write the folder's weights as a single file (see save)."""
    return save({**original_state_dict(folder, open_clip), **(extra or {})}, path, dtype, wrap)

def training_extras(sd: dict, seed: int = 1) -> dict:
    """What a full (unpruned) training checkpoint holds beside the weights: the UNet's EMA copy
    (LitEma's names: the parameter's name after "model." without dots), the LDM noise-schedule
    buffers and the text encoder's position ids."""
    g = torch.Generator().manual_seed(seed)
    out = {"model_ema." + k[len("model."):].replace(".", ""): torch.randn(v.shape, generator=g)
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    out.update({"betas": betas.float(), "alphas_cumprod": alphas.float(),
                "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas[:-1].float()]),
                "sqrt_alphas_cumprod": alphas.sqrt().float(), "logvar": torch.zeros(1000)})
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def without_text_model_prefix(sd: dict) -> dict:
    """SD 1.x files written by older tools name the CLIP weights without "text_model."."""
    p = "cond_stage_model.transformer.text_model."
    return {("cond_stage_model.transformer." + k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}


def save(sd: dict, path: Path, dtype=torch.float32, wrap: bool = False) -> Path:
    """Write a state dict as .safetensors or .ckpt (torch.save; `wrap` puts it under "state_dict",
    as training checkpoints do), floating-point tensors in `dtype`."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1} if wrap else sd, str(path))
    return path
