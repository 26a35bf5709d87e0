"""SDXL single-file checkpoints (the layout of Stability AI's releases, A1111, ComfyUI, Civitai).

    model.diffusion_model.*                           UNet (LDM names; label_emb = SDXL's added embedding)
    first_stage_model.*                               VAE (as in SD 1.x/2.x)
    conditioner.embedders.0.transformer.text_model.*  CLIP ViT-L (Hugging Face names)      -> text_encoder
    conditioner.embedders.1.model.*                   OpenCLIP ViT-bigG with its projection -> text_encoder_2
    conditioner.embedders.0.model.*                   a refiner's only text encoder (OpenCLIP ViT-bigG)

Sizes come from the tensors (levels, transformer blocks per level, widths, layers, the added
embedding's time-id width); what tensors cannot tell comes from models/checkpoint-configs/sdxl
(64 channels per attention head, activations, SDXL's schedule and VAE scale). The model goes
through the same export as an SDXL diffusers folder (export/sdxl.py).
"""

from __future__ import annotations

from pathlib import Path

from . import sdxl
from .checkpoint import (
    UNET, VAE, Detected, FileSource, TensorFile, _error, _template, build_module, check_complete, clip_config,
    clip_key_map, detect, open_clip_config, open_clip_key_map, scheduler_config, tokenizer_for, unet_config,
    vae_config,
)

CLIP_L = "conditioner.embedders.0.transformer."
OPEN_CLIP = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP = "conditioner.embedders.0.model."


def recognise_sdxl(tf: TensorFile) -> str:
    """"sdxl" (both text encoders) or "sdxl-refiner" (the OpenCLIP one alone) for a UNet with SDXL's
    added embedding; anything else with that UNet is refused."""
    keys = tf.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(VAE):
        raise _error(f"{tf.path.name} holds an SDXL UNet without a VAE (a UNet-only file); accepted: a full SDXL "
                     "checkpoint (UNet, VAE and text encoders)")
    if has(OPEN_CLIP + "transformer.resblocks.") and has(CLIP_L + "text_model."):
        return "sdxl"
    if has(REFINER_OPEN_CLIP + "transformer.resblocks."):
        return "sdxl-refiner"
    raise _error(f"{tf.path.name} holds an SDXL UNet without SDXL's text encoders (neither CLIP under {CLIP_L!r} "
                 f"with OpenCLIP under {OPEN_CLIP!r}, nor a refiner's OpenCLIP under {REFINER_OPEN_CLIP!r})")


class SDXLCheckpointSource(FileSource):
    """An SDXL single file as an export source (the interface of export.SDXLSource)."""

    sdxl = True

    def __init__(self, path: Path, prediction_type: str | None = None, log=print, tensors: TensorFile | None = None):
        self.path = self.src = Path(path)
        self.tf = tf = tensors if tensors is not None else TensorFile(self.path)
        self.detected = det = detect(tf, prediction_type)
        self.name = self.path.name
        refiner = det.family == "sdxl-refiner"
        self._open_clip = REFINER_OPEN_CLIP if refiner else OPEN_CLIP
        if self._open_clip + "text_projection" not in tf:
            raise _error(f"{self.name}: the OpenCLIP text encoder lacks its projection ({self._open_clip}text_projection); "
                         "the file is incomplete")
        self._text = {"text_encoder_2": open_clip_config(tf, self._open_clip, _template("sdxl", "text_encoder_2"),
                                                         skip_last=False)}
        if not refiner:
            self._text["text_encoder"] = clip_config(tf, CLIP_L, _template("sdxl", "text_encoder"))
        self.index = _index(det)
        self.COMPONENTS = (*sdxl.text_encoders(self.index), "unet", "vae")
        self.unet_config = _unet_config(tf, det, self._text["text_encoder_2"]["projection_dim"],
                                        sdxl.time_ids(self.index))
        self.vae_config = vae_config(tf, VAE, det.configs)
        # SDXL's first tokenizer pads with <|endoftext|> (SD 1.x's), the second with "!" (SD 2.x's).
        self.tokenizers = {n: tokenizer_for("sd2" if n == "text_encoder_2" else "sd1") for n in self.COMPONENTS
                           if n.startswith("text_encoder")}
        self.scheduler_config = scheduler_config(det)
        sdxl.check_unet(self.name, self.unet_config, _error)
        check_complete(self)
        text = "OpenCLIP ViT-bigG text encoder" if refiner else "CLIP ViT-L and OpenCLIP ViT-bigG text encoders"
        ema = "; its EMA weights (model_ema.*) are not used, as in A1111" if det.has_ema else ""
        log(f"  {self.name}: {det.label}{' inpainting' if det.in_channels == 9 else ''}, {det.in_channels}-channel "
            f"UNet, {det.prediction_type} ({det.how}), {text}{ema}")

    def _text_module(self, component: str):
        m = build_module(component, self._text[component])
        if component == "text_encoder_2":
            layers = self._text[component]["num_hidden_layers"]
            return m, open_clip_key_map(self.tf, layers, self._open_clip), "OpenCLIP text encoder"
        return m, clip_key_map(self.tf, CLIP_L), "CLIP text encoder"


def _unet_config(tf: TensorFile, det: Detected, pooled: int, time_ids: int) -> dict:
    """The UNet's config; the added embedding takes the pooled text and `time_ids` numbers, each
    embedded in addition_time_embed_dim sinusoids."""
    cfg = unet_config(tf, det)
    width = int(tf.shape(UNET + "label_emb.0.0.weight")[1])
    if width <= pooled or (width - pooled) % time_ids:
        raise _error(f"{tf.path.name}: the UNet's added embedding takes {width} numbers, which is not the pooled text "
                     f"({pooled}) plus {time_ids} time ids of one width; not an SDXL {'refiner ' if time_ids == 5 else ''}UNet")
    cfg.update(addition_time_embed_dim=(width - pooled) // time_ids, projection_class_embeddings_input_dim=width)
    return cfg


def _index(det: Detected) -> dict:
    """The diffusers model_index.json of the file's pipeline (a refiner: the second encoder alone,
    aesthetic-score conditioning, no forced zeros for an empty prompt)."""
    refiner = det.family == "sdxl-refiner"
    none = [None, None]
    pipeline = ("StableDiffusionXLImg2ImgPipeline" if refiner else
                "StableDiffusionXLInpaintPipeline" if det.in_channels == 9 else "StableDiffusionXLPipeline")
    index = {
        "_class_name": pipeline,
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": none if refiner else ["transformers", "CLIPTextModel"],
        "tokenizer": none if refiner else ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": none,
        "image_encoder": none,
    }
    if pipeline != "StableDiffusionXLPipeline":
        index["requires_aesthetics_score"] = refiner
    return index
