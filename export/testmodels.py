"""Stable Diffusion pipelines with random weights, built offline, for tests and benchmarks.

    python -m sdrt.export.testmodels OUT [--kind tiny-sd1|tiny-inpaint|tiny-sd2-v|mid|sd15|sd15-inpaint|
                                              tiny-sdxl|tiny-sdxl-inpaint|tiny-sdxl-refiner|sdxl|sdxl-inpaint] [--seed N]

Each kind is a diffusers folder (`StableDiffusionPipeline` or `StableDiffusionInpaintPipeline`
layout, `StableDiffusionXL*Pipeline` for the SDXL kinds) with deterministic random weights and
the real CLIP tokenizer vocabulary from `models/clip-tokenizer/`. The tiny kinds are small enough
to export and run in seconds; `sd15` has the SD 1.5 architecture and sizes, `sdxl` SDXL 1.0's
(speed and memory do not depend on weight values); `mid` sits between tiny and sd15, for memory
measurements.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "clip-tokenizer"

SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}


@dataclass(frozen=True)
class Kind:
    unet: dict
    vae: dict
    text: dict
    scheduler: str
    scheduler_config: dict
    pad_token: str = "<|endoftext|>"
    inpaint: bool = False
    exact_16bit: bool = False  # every weight exactly representable in fp16 and in bf16


_TINY_VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
)
_TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    vocab_size=49408,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    hidden_act="quick_gelu",
)
_TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
)

KINDS: dict[str, Kind] = {
    "tiny-sd1": Kind(_TINY_UNET, _TINY_VAE, _TINY_TEXT, "PNDMScheduler", SD15_SCHEDULER),
    "tiny-inpaint": Kind({**_TINY_UNET, "in_channels": 9}, _TINY_VAE, _TINY_TEXT, "PNDMScheduler", SD15_SCHEDULER, inpaint=True),
    # SD 2.x style: v-prediction, linear projections in the transformer blocks, per-block head dims,
    # GELU text encoder and "!" as the padding token.
    "tiny-sd2-v": Kind(
        {**_TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True},
        _TINY_VAE,
        {**_TINY_TEXT, "hidden_act": "gelu"},
        "DDIMScheduler",
        {**SD15_SCHEDULER, "prediction_type": "v_prediction"},
        pad_token="!",
    ),
    "sd15": Kind(
        dict(cross_attention_dim=768, sample_size=64),
        dict(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        ),
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_act="quick_gelu",
        ),
        "PNDMScheduler",
        SD15_SCHEDULER,
    ),
}
# Mid-sized (UNet 0.55 GB in fp32, a fifth of SD 1.5's node count): large enough that a copy of
# its weights shows in an export's peak memory, small enough to export in about a minute.
KINDS["mid"] = Kind(
    dict(
        sample_size=32,
        block_out_channels=(256, 512, 768),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=256,
        attention_head_dim=8,
    ),
    {**_TINY_VAE, "block_out_channels": [64, 128]},
    {**_TINY_TEXT, "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_hidden_layers": 4,
     "projection_dim": 256},
    "PNDMScheduler",
    SD15_SCHEDULER,
)
# Tiny models in the SD 1.x / 2.x families' conventions (attention heads: 8 per block for SD 1.x,
# one per 64 channels for SD 2.x and for the text encoders; SD 2.x: linear projections, GELU text
# encoder, "!" padding), so that the same weights written as a single-file checkpoint convert back
# with the configs sdrt ships for those families (tests/test_checkpoint.py). Their weights are exact
# in fp16 and bf16: a file stored in any of fp32, fp16 and bf16 holds the same model.
_CKPT_TEXT = {**_TINY_TEXT, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 1, "projection_dim": 64}
_CKPT_SD1_UNET = {**_TINY_UNET, "cross_attention_dim": 64, "attention_head_dim": 8}
_CKPT_SD2_UNET = {**_TINY_UNET, "block_out_channels": (64, 128), "cross_attention_dim": 64, "attention_head_dim": (1, 2),
                  "use_linear_projection": True}
_SD2_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "epsilon"}
_SD2_TEXT = {**_CKPT_TEXT, "hidden_act": "gelu"}
KINDS["ckpt-sd1"] = Kind(_CKPT_SD1_UNET, _TINY_VAE, _CKPT_TEXT, "PNDMScheduler", SD15_SCHEDULER, exact_16bit=True)
KINDS["ckpt-sd1-inpaint"] = Kind({**_CKPT_SD1_UNET, "in_channels": 9}, _TINY_VAE, _CKPT_TEXT, "PNDMScheduler",
                                 SD15_SCHEDULER, inpaint=True, exact_16bit=True)
KINDS["ckpt-sd2"] = Kind(_CKPT_SD2_UNET, _TINY_VAE, _SD2_TEXT, "DDIMScheduler", _SD2_SCHEDULER, pad_token="!",
                         exact_16bit=True)
KINDS["ckpt-sd2-inpaint"] = Kind({**_CKPT_SD2_UNET, "in_channels": 9}, _TINY_VAE, _SD2_TEXT, "DDIMScheduler",
                                 _SD2_SCHEDULER, pad_token="!", inpaint=True, exact_16bit=True)
KINDS["sd15-inpaint"] = Kind(
    {**KINDS["sd15"].unet, "in_channels": 9}, KINDS["sd15"].vae, KINDS["sd15"].text, "PNDMScheduler", SD15_SCHEDULER, inpaint=True
)


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter a deterministic value so the model does more than its default init.

    Default inits leave some layers at zero or one (norm scales, biases); random values there make
    tests sensitive to mistakes in every part of the graph.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def _round_to_16bit(module: torch.nn.Module) -> None:
    """Round every parameter to a value that fp16 and bf16 both hold exactly (bf16's 8 significant
    bits, zero below fp16's smallest normal number), so that a checkpoint of the model stored in
    fp32, fp16 or bf16 holds the same weights."""
    with torch.no_grad():
        for p in module.parameters():
            r = p.to(torch.bfloat16).to(torch.float32)
            r[r.abs() < 2.0**-14] = 0.0
            p.copy_(r)


def build_pipeline(kind: str = "tiny-sd1", seed: int = 0):
    """Return a diffusers pipeline of `kind` with deterministic random weights (fp32, CPU)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown test model kind {kind!r}; accepted: {', '.join(KINDS)}")
    k = KINDS[kind]
    unet = UNet2DConditionModel(**k.unet)
    vae = AutoencoderKL(**k.vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**k.text))
    for i, m in enumerate((unet, vae, text_encoder)):
        _init_weights(m, seed * 7919 + i)
        if k.exact_16bit:
            _round_to_16bit(m)
        m.eval()
    tokenizer = CLIPTokenizer(
        str(CLIP_TOKENIZER_DIR / "vocab.json"),
        str(CLIP_TOKENIZER_DIR / "merges.txt"),
        pad_token=k.pad_token,
        model_max_length=77,
    )
    scheduler_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[k.scheduler]
    scheduler = scheduler_cls.from_config(k.scheduler_config)
    cls = StableDiffusionInpaintPipeline if k.inpaint else StableDiffusionPipeline
    return cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _prefix_text_encoder_keys(path: Path) -> None:
    """Store the text encoder's weights under "text_model.", as real SD checkpoints do.

    transformers 5 saves CLIPTextModel without that prefix, which transformers 4 (used by other
    tools, e.g. optimum's exporter) silently fails to load; both read the prefixed names.
    """
    from safetensors.numpy import load_file, save_file

    weights = load_file(path)
    if not any(k.startswith("text_model.") for k in weights):
        save_file({f"text_model.{k}": v for k, v in weights.items()}, path, metadata={"format": "pt"})


def build(out: str | Path, kind: str = "tiny-sd1", seed: int = 0) -> Path:
    """Build a pipeline of `kind` and save it as a diffusers folder at `out`."""
    out = Path(out)
    if kind in XL_KINDS:
        return build_sdxl(out, kind, seed)
    pipe = build_pipeline(kind, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    _prefix_text_encoder_keys(out / "text_encoder" / "model.safetensors")
    # Real SD folders carry the slow tokenizer's files too; older transformers need them.
    for f in ("vocab.json", "merges.txt"):
        shutil.copy2(CLIP_TOKENIZER_DIR / f, out / "tokenizer" / f)
    # Record where the folder came from, for people who find it later.
    (out / "sdrt-testmodel.json").write_text(json.dumps({"kind": kind, "seed": seed}) + "\n")
    return out


# ----------------------------------------------------------------------------------------- SDXL
# SDXL 1.0's scheduler_config.json (EulerDiscreteScheduler, "leading" timestep spacing).
SDXL_SCHEDULER = {
    **SD15_SCHEDULER,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class XLKind:
    unet: dict
    vae: dict
    text: dict | None  # CLIP ViT-L (text_encoder); None for a refiner, which has only the second encoder
    text_2: dict  # OpenCLIP ViT-bigG with projection (text_encoder_2)
    pipeline: str  # the diffusers pipeline class of model_index.json
    requires_aesthetics_score: bool = False
    force_zeros_for_empty_prompt: bool = True
    dtype: str = "float32"  # weights as saved (the architecture-sized kinds are stored in fp16: half the disk)
    exact_16bit: bool = False  # every weight exactly representable in fp16 and in bf16


# Tiny SDXL models, in the manner of diffusers' own SDXL pipeline tests, with the two text
# encoders of different widths (32 and 48) and projection sizes, so that mixing them up cannot
# go unnoticed. Their configs carry SDXL's token ids (eos 2: pooling at the highest token id).
_XL_TEXT = dict(_TINY_TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_XL_TEXT_2 = dict(_XL_TEXT, hidden_size=48, intermediate_size=53, num_hidden_layers=4, projection_dim=40, hidden_act="gelu")
_XL_TIME_DIM = 8
_TINY_XL_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=_XL_TIME_DIM,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * _XL_TIME_DIM + 40,  # six time ids + the pooled text
    cross_attention_dim=32 + 48,  # both encoders' hidden states side by side
    norm_num_groups=32,
)
_TINY_XL_VAE = dict(_TINY_VAE, scaling_factor=0.13025, force_upcast=True)
_SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    transformer_layers_per_block=(1, 2, 10),
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
    norm_num_groups=32,
)
_SDXL_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
_SDXL_TEXT = dict(KINDS["sd15"].text, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_SDXL_TEXT_2 = dict(_SDXL_TEXT, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    projection_dim=1280, hidden_act="gelu")
_CKPT_XL_TEXT = dict(_CKPT_TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_CKPT_XL_TEXT_2 = dict(_CKPT_XL_TEXT, hidden_size=128, intermediate_size=160, num_attention_heads=2, projection_dim=96,
                       hidden_act="gelu")
_CKPT_XL_UNET = {**_TINY_XL_UNET, "block_out_channels": (64, 128), "attention_head_dim": (1, 2),
                 "cross_attention_dim": 64 + 128, "projection_class_embeddings_input_dim": 6 * _XL_TIME_DIM + 96}

XL_KINDS: dict[str, XLKind] = {
    "tiny-sdxl": XLKind(_TINY_XL_UNET, _TINY_XL_VAE, _XL_TEXT, _XL_TEXT_2, "StableDiffusionXLPipeline"),
    "tiny-sdxl-inpaint": XLKind({**_TINY_XL_UNET, "in_channels": 9}, _TINY_XL_VAE, _XL_TEXT, _XL_TEXT_2,
                                "StableDiffusionXLInpaintPipeline"),
    # The refiner: the second text encoder alone, five time ids (sizes, crop and aesthetic score).
    "tiny-sdxl-refiner": XLKind(
        {**_TINY_XL_UNET, "cross_attention_dim": 48, "projection_class_embeddings_input_dim": 5 * _XL_TIME_DIM + 40},
        _TINY_XL_VAE, None, _XL_TEXT_2, "StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False),
    "sdxl": XLKind(_SDXL_UNET, _SDXL_VAE, _SDXL_TEXT, _SDXL_TEXT_2, "StableDiffusionXLPipeline", dtype="float16"),
    # Tiny SDXL models in SDXL's conventions (64 channels per attention head in the UNet and both
    # text encoders, GELU in the second), so that their weights written as a single-file checkpoint
    # convert back with the configs sdrt ships for SDXL; weights exact in fp16 and bf16. The second
    # encoder's projection is not square (96 of 128), so a transposed projection cannot pass.
    "ckpt-sdxl": XLKind(_CKPT_XL_UNET, _TINY_XL_VAE, _CKPT_XL_TEXT, _CKPT_XL_TEXT_2, "StableDiffusionXLPipeline",
                        exact_16bit=True),
    "ckpt-sdxl-inpaint": XLKind({**_CKPT_XL_UNET, "in_channels": 9}, _TINY_XL_VAE, _CKPT_XL_TEXT, _CKPT_XL_TEXT_2,
                                "StableDiffusionXLInpaintPipeline", exact_16bit=True),
    "ckpt-sdxl-refiner": XLKind(
        {**_CKPT_XL_UNET, "cross_attention_dim": 128, "projection_class_embeddings_input_dim": 5 * _XL_TIME_DIM + 96},
        _TINY_XL_VAE, None, _CKPT_XL_TEXT_2, "StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, exact_16bit=True),
    "sdxl-inpaint": XLKind({**_SDXL_UNET, "in_channels": 9}, _SDXL_VAE, _SDXL_TEXT, _SDXL_TEXT_2,
                           "StableDiffusionXLInpaintPipeline", dtype="float16"),
}


def build_sdxl(out: Path, kind: str, seed: int = 0) -> Path:
    """An SDXL diffusers folder, one model at a time (each is built, saved and freed before the
    next: the architecture-sized UNet alone is 10 GB in fp32)."""
    import gc

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import diffusers

    k = XL_KINDS[kind]
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, k.dtype)
    parts = [("unet", lambda: UNet2DConditionModel(**k.unet)), ("vae", lambda: AutoencoderKL(**k.vae)),
             ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**k.text_2)))]
    if k.text is not None:
        parts.append(("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**k.text))))
    for i, (name, make) in enumerate(parts):
        m = make()
        _init_weights(m, seed * 7919 + 100 + i)
        if k.exact_16bit:
            _round_to_16bit(m)
        (m if dtype == torch.float32 else m.to(dtype)).save_pretrained(out / name, safe_serialization=True)
        del m
        gc.collect()
        if name.startswith("text_encoder"):
            _prefix_text_encoder_keys(out / name / "model.safetensors")
    tokenizers = [("tokenizer_2", "!")] + ([("tokenizer", "<|endoftext|>")] if k.text is not None else [])
    for name, pad in tokenizers:  # SDXL's second tokenizer pads with "!" (id 0), as SD 2.x's does
        tok = CLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"),
                            pad_token=pad, model_max_length=77)
        tok.save_pretrained(out / name)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy2(CLIP_TOKENIZER_DIR / f, out / name / f)
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(out / "scheduler")
    none = [None, None]
    index = {
        "_class_name": k.pipeline,
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": k.force_zeros_for_empty_prompt,
        "feature_extractor": none,
        "image_encoder": none,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"] if k.text is not None else none,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if k.text is not None else none,
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if k.pipeline != "StableDiffusionXLPipeline":
        index["requires_aesthetics_score"] = k.requires_aesthetics_score
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "sdrt-testmodel.json").write_text(json.dumps({"kind": kind, "seed": seed}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--kind", default="tiny-sd1", choices=sorted(KINDS) + sorted(XL_KINDS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.out, a.kind, a.seed))


if __name__ == "__main__":
    main()
