"""From a request to the arrays the loop needs, and back to images: A1111's img2img/inpaint
"init" sequence (resize, mask blur, invert, only-masked crop, fill, overlay) and diffusers'
equivalents, chosen by the sampler's family. Pure NumPy/PIL; no model runs here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter

from . import images as im
from .errors import InputError
from .modelfolder import ModelInfo

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale")
FILL_MODES = ("fill", "original", "latent_noise", "latent_nothing")
MAX_BATCH = 64
# The largest width or height a request works at (and the largest txt2img image). Stable Diffusion
# is trained at 512 to 1024 pixels; far beyond this no machine has the memory.
MAX_SIDE = 8192
# admit(width, height, batch_size, input_pixels=0, encode_size=None): raises when a request of that
# size does not fit in memory; the job functions call it before decoding or resizing any image.
Admit = Callable[..., None]


@dataclass
class Job:
    """Everything about one request that does not depend on the models."""

    batch_size: int
    width: int  # size the VAE sees
    height: int
    out_width: int  # size of the returned images
    out_height: int
    pixels: np.ndarray | None = None  # (1 or B, 3, H, W) in [-1, 1]
    latent_size: tuple[int, int] | None = None  # latent_upscale: (h, w) the latents are resized to
    # Inpainting
    latent_keep: np.ndarray | None = None  # (1 or B, 1, h, w): 1 where the original is kept
    latent_repaint: np.ndarray | None = None  # the same, 1 where it is repainted (A1111's nmask = latmask)
    latent_fill: str | None = None  # "latent_noise" | "latent_nothing"
    fill_keep: np.ndarray | None = None  # (1, 1, h, w): 1 where latent_fill keeps the original
    masked_pixels: np.ndarray | None = None  # 9-channel models: image with the hole greyed, [-1, 1]
    conditioning_mask: np.ndarray | None = None  # 9-channel models: (1, 1, h, w), 1 = repaint
    blend: str = "a1111"  # per-step latent blending: a1111 | comfyui | diffusers
    resampler: str = "a1111"  # images.RESAMPLERS: A1111's Pillow 9.5 arithmetic, or the installed Pillow (diffusers)
    overlay: Any = None  # PIL RGBA of the original outside the mask, or None
    paste_box: tuple[int, int, int, int] | None = None  # only-masked: where the output goes
    parameters: dict[str, Any] = field(default_factory=dict)


def _resampler(family: str | None) -> str:
    """diffusers resizes with the installed Pillow; A1111 (and sdrt for ComfyUI names) with Pillow 9.5's arithmetic."""
    return "pillow" if family == "diffusers" else "a1111"


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_batch(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= MAX_BATCH:
        raise InputError(f"batch_size must be an integer from 1 to {MAX_BATCH}, got {batch_size!r}")


def _size_arg(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or not 0 <= value <= MAX_SIDE):
        raise InputError(f"{name} must be a whole number of pixels from 0 to {MAX_SIDE} (0 keeps the aspect ratio), "
                         f"got {value!r}")


def _work_size(size: tuple[int, int], width, height, f: int, what: str) -> tuple[int, int]:
    """target_size, refused when the image's own size (no width/height given) is beyond MAX_SIDE."""
    w, h = im.target_size(size, width, height, f)
    if w > MAX_SIDE or h > MAX_SIDE:
        raise InputError(f"{what} is {size[0]}x{size[1]}, so the request would work at {w}x{h}; sdrt works at up to "
                         f"{MAX_SIDE} pixels a side: give a smaller width and height (-W/-H)")
    return w, h


def txt2img_job(info: ModelInfo, width: int, height: int, batch_size: int, admit: Admit | None = None) -> Job:
    _check_batch(batch_size)
    for n, v in (("width", width), ("height", height)):
        _size_arg(n, v)
        if not v:
            raise InputError(f"{n} must be at least {info.vae_scale_factor} pixels for txt2img, got {v!r}")
    w, h = im.target_size((width, height), width, height, info.vae_scale_factor)
    if admit is not None:
        admit(w, h, batch_size)
    return Job(batch_size, w, h, w, h, parameters={})


def img2img_job(info: ModelInfo, image, *, width, height, resize_mode: str, batch_size: int,
                family: str | None = None, admit: Admit | None = None) -> Job:
    _check_batch(batch_size)
    _check_choice("resize_mode", resize_mode, RESIZE_MODES)
    _size_arg("width", width)
    _size_arg("height", height)
    f = info.vae_scale_factor
    opened = im.open_image(image, "image")  # the header: size known, nothing decoded yet
    size = im.oriented_size(opened)
    w, h = _work_size(size, width, height, f, "the image")
    encode = _work_size(size, None, None, f, "the image") if resize_mode == "latent_upscale" else None
    if admit is not None:
        admit(w, h, batch_size, input_pixels=size[0] * size[1], encode_size=encode)
    img = im.load_image(opened, "image")
    if resize_mode == "latent_upscale":
        # A1111 mode 3: encode the image at its own size, then resize the latents.
        ew, eh = encode
        pixels = im.to_array(im.resize_image(img, ew, eh, "just_resize", _resampler(family)))
        job = Job(batch_size, ew, eh, w, h, pixels=pixels, latent_size=(h // f, w // f))
    else:
        pixels = im.to_array(im.resize_image(img, w, h, resize_mode, _resampler(family)))
        job = Job(batch_size, w, h, w, h, pixels=pixels)
    job.parameters = {"resize_mode": resize_mode}
    job.resampler = _resampler(family)
    if job.latent_size is not None:
        job.width, job.height = w, h  # the loop works at the resized latent size
    return job


def inpaint_job(
    info: ModelInfo,
    image,
    mask,
    *,
    width,
    height,
    resize_mode: str,
    batch_size: int,
    mask_blur_x: int,
    mask_blur_y: int,
    invert_mask: bool,
    mask_round: bool,
    fill: str,
    only_masked: bool,
    padding: int,
    overlay: bool,
    family: str | None,
    admit: Admit | None = None,
) -> Job:
    """A1111's inpainting preparation (processing.py StableDiffusionProcessingImg2Img.init), or
    diffusers' StableDiffusionInpaintPipeline's when the sampler is a diffusers scheduler name."""
    _check_batch(batch_size)
    _check_choice("resize_mode", resize_mode, RESIZE_MODES[:3])
    _check_choice("fill", fill, FILL_MODES)
    _size_arg("width", width)
    _size_arg("height", height)
    for n, v in (("mask_blur_x", mask_blur_x), ("mask_blur_y", mask_blur_y), ("padding", padding)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0 <= v <= 512:
            raise InputError(f"{n} must be a number from 0 to 512, got {v!r}")
    diffusers = family == "diffusers"
    f = info.vae_scale_factor

    opened = im.open_image(image, "image")  # headers only: sizes known, nothing decoded yet
    opened_mask = im.open_image(mask, "mask", allow_bool=True)
    size, mask_size = im.oriented_size(opened), im.oriented_size(opened_mask)
    work = _work_size(size, width, height, f, "the image")
    im.check_mask_size(mask_size, size)
    if admit is not None:
        admit(*work, batch_size, input_pixels=size[0] * size[1] + mask_size[0] * mask_size[1])
    img = im.load_image(opened, "image")
    m = im.load_mask(opened_mask, "mask", round=mask_round)
    rs = _resampler(family)
    m = im.match_mask(m, img, resampler=rs)  # same aspect ratio -> resized to the image; otherwise an InputError
    if invert_mask:
        m = im.invert(m)
    if not diffusers:
        m = im.blur_mask(m, mask_blur_x, mask_blur_y)
    elif mask_blur_x or mask_blur_y:
        if mask_blur_x != mask_blur_y:
            raise InputError(f"mask_blur_x and mask_blur_y must be equal with a diffusers sampler (diffusers' "
                             f"mask_processor.blur has one radius), got {mask_blur_x} and {mask_blur_y}")
        m = m.filter(ImageFilter.GaussianBlur(mask_blur_x))  # diffusers' VaeImageProcessor.blur
    w, h = work

    paste_box = None
    crop = im.crop_region(m, padding) if only_masked else None
    if only_masked and crop is None and not diffusers:
        # A1111: a blank mask leaves no region to work on; it drops the mask and runs img2img on
        # the whole image (no fill, no latent mask, no overlay)
        job = Job(batch_size, w, h, w, h, pixels=im.to_array(im.resize_image(img, w, h, resize_mode, rs)), resampler=rs)
        extra = _inpaint_infotext(mask_blur_x, mask_blur_y, invert_mask, fill, False, padding)
        job.parameters = {"resize_mode": resize_mode, "mask_blur_x": mask_blur_x, "mask_blur_y": mask_blur_y,
                          "invert_mask": invert_mask, "mask_round": mask_round, "fill": fill, "only_masked": only_masked,
                          "padding": padding, "overlay": overlay, "blank_mask": True,
                          "infotext_extra": {k: v for k, v in extra.items() if k != "Masked content"}}
        return job
    if crop is not None:
        # Only masked: work on the region around the mask at the requested size, paste it back.
        x1, y1, x2, y2 = im.expand_crop_region(crop, w, h, img.width, img.height)
        paste_box = (x1, y1, x2, y2)
        mask_for_overlay = m
        work_mask = im.resize_image(m.crop(paste_box), w, h, "resize_and_fill", rs)
        work_img = im.resize_image(img.crop(paste_box), w, h, "resize_and_fill", rs)
        out_w, out_h = img.width, img.height
        overlay_base = img
    else:
        work_mask = im.resize_image(m, w, h, resize_mode, rs)
        work_img = im.resize_image(img, w, h, resize_mode, rs)
        out_w, out_h = w, h
        mask_for_overlay = work_mask if diffusers else im.double_mask(work_mask)
        overlay_base = work_img

    if fill != "original":  # A1111 fills the hole's pixels for the latent fills too
        work_img = im.fill_masked(work_img, work_mask)
    pixels = im.to_array(work_img)
    hl, wl = h // f, w // f
    if diffusers:
        latmask = im.latent_mask_diffusers(work_mask, hl, wl)
    else:
        latmask = im.latent_mask(work_mask, hl, wl, round=mask_round)
    keep = (1.0 - latmask).astype(np.float32)  # A1111: mask = 1 - latmask, nmask = latmask

    job = Job(batch_size, w, h, out_w, out_h, pixels=pixels, blend=family if family in ("comfyui", "diffusers") else "a1111",
              resampler=rs)
    if fill in ("latent_noise", "latent_nothing"):
        job.latent_fill, job.fill_keep = fill, keep
    # diffusers blends latents only for 4-channel UNets; A1111 and ComfyUI do it for both kinds.
    if not (diffusers and info.is_inpainting_model):
        job.latent_keep, job.latent_repaint = keep, latmask.astype(np.float32)
    if info.is_inpainting_model:
        binary = im.binary_mask_array(work_mask, round=mask_round)  # (1, 1, H, W) float, 1 = repaint
        job.masked_pixels = (pixels * (1.0 - binary)).astype(np.float32)
        job.conditioning_mask = (
            latmask if diffusers else im.nearest_resize(binary, hl, wl)
        ).astype(np.float32)
    if overlay:
        job.overlay = im.make_overlay(overlay_base, mask_for_overlay)
    elif paste_box is not None:
        # No overlay: the generated region still goes back into the original, not onto black.
        box = Image.new("L", img.size, 0)
        box.paste(255, paste_box)
        job.overlay = im.make_overlay(img, box)
    job.paste_box = paste_box
    job.parameters = {
        "resize_mode": resize_mode,
        "mask_blur_x": mask_blur_x,
        "mask_blur_y": mask_blur_y,
        "invert_mask": invert_mask,
        "mask_round": mask_round,
        "fill": fill,
        "only_masked": only_masked,
        "padding": padding,
        "overlay": overlay,
        "infotext_extra": _inpaint_infotext(mask_blur_x, mask_blur_y, invert_mask, fill, only_masked, padding),
    }
    return job


def _inpaint_infotext(bx, by, invert, fill, only_masked, padding) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if bx == by:
        extra["Mask blur"] = bx
    else:
        extra["Mask blur x"] = bx
        extra["Mask blur y"] = by
    if invert:
        extra["Mask mode"] = "Inpaint not masked"
    extra["Masked content"] = {"fill": "fill", "original": "original", "latent_noise": "latent noise", "latent_nothing": "latent nothing"}[fill]
    if only_masked:
        extra["Inpaint area"] = "Only masked"
        extra["Masked area padding"] = padding
    return extra


def apply_latent_fill(init: np.ndarray, fill: str, keep: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A1111's latent noise / latent nothing: replace the masked latents before sampling. The
    noise is the initial noise: A1111 draws randn(seeds) again from the same seeds."""
    if fill == "latent_noise":
        return (init * keep + noise * (1.0 - keep)).astype(np.float32)
    return (init * keep).astype(np.float32)


class LatentBlender:
    """Keeps the unmasked part of the latents on the original during sampling.

    a1111: the x0 prediction is blended with the clean init latents at every model call, and
    the result once more at the end (CFGDenoiser + the final blend in processing.py); for its
    timestep samplers (DDIM, PLMS, UniPC) the model's input is blended instead (`model_input`).
    comfyui: the model input is blended with the noised init and its output with the clean init
    (KSamplerX0Inpaint).
    diffusers: after each step, the latents are blended with the init noised to the next
    step's level (StableDiffusionInpaintPipeline, 4-channel UNets).
    """

    def __init__(self, style: str, keep: np.ndarray, init: np.ndarray, noise: np.ndarray, plan, steps_total: int,
                 repaint: np.ndarray | None = None):
        self.style = style
        self.keep = keep
        self.repaint = (1.0 - keep).astype(np.float32) if repaint is None else repaint
        self.init = init
        self.noise = noise
        self.plan = plan
        self.steps_total = steps_total
        # What the reference's clean init is in the sampler's space at its final sigma (VP
        # schedulers that end above sigma 0 decode x / sqrt(1 + s^2)).
        self.final_scale = 1.0 / float(plan.finish(np.ones(1))[0])

    def model_input(self, x, sigma):
        """A1111's timestep samplers (DDIM, PLMS, UniPC; mask_before_denoising): the model sees the
        VP latent blended with the clean init, x / sqrt(1 + sigma^2) * nmask + init * mask, here in
        k-space."""
        return x * self.repaint + self.init * (self.keep * np.float32(np.sqrt(1.0 + sigma * sigma)))

    @property
    def blends_input(self) -> bool:
        return self.style == "a1111" and bool(getattr(self.plan, "mask_before_denoising", False))

    def wrap(self, denoise):
        if self.style == "a1111" and self.blends_input:
            return denoise
        if self.style == "a1111":
            def blended(x, sigma):
                return denoise(x, sigma) * self.repaint + self.init * self.keep

            return blended
        if self.style == "comfyui":
            def blended(x, sigma):
                x_in = x * self.repaint + (self.init + self.noise * sigma) * self.keep
                return denoise(x_in, sigma) * self.repaint + self.init * self.keep

            return blended
        return denoise

    def after_step(self, i, x, sigma, sigma_next, denoised):
        if self.style != "diffusers":
            return None
        last = i == self.steps_total - 1
        target = self.init * self.final_scale if last else self.init + self.noise * sigma_next
        return x * self.repaint + target * self.keep

    def after_substep(self, i, x, sigma, sigma_next, denoised):
        """diffusers blends the intermediate latent of two-stage schedulers too."""
        if self.style != "diffusers":
            return None
        return x * self.repaint + (self.init + self.noise * sigma_next) * self.keep

    def finish(self, latents):
        if self.style == "a1111":
            return latents * self.repaint + self.init * self.keep
        return latents


def latent_blender(job: Job, plan, init: np.ndarray | None, noise: np.ndarray):
    if job.latent_keep is None or init is None:
        return None
    return LatentBlender(job.blend, job.latent_keep, init, noise, plan, max(1, len(plan.sigmas) - 1), job.latent_repaint)


def finish_images(job: Job, pixels: np.ndarray, rounding: str = "round") -> list:
    """Decoded (B,3,H,W) in [-1,1] -> PIL images, pasted back and overlaid as the job says.
    rounding: "floor" (A1111's and ComfyUI's truncating cast) or "round" (diffusers)."""
    out = []
    for img in im.from_array(pixels, rounding=rounding):
        if job.overlay is not None or job.paste_box is not None:
            img = im.apply_overlay(img, job.overlay, job.paste_box, (job.out_width, job.out_height), job.resampler)
        out.append(img)
    return out


def available_memory(provider: str) -> int | None:
    """Bytes the request may use: free RAM on the CPU (None when unknown or on CUDA)."""
    if provider != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# The memory model below: a process's peak resident memory is its base (interpreter and
# libraries), the graphs' weights (ONNX Runtime copies them out of the files), and the largest of
# the stages' working memory (the sessions share one arena: the graphs run one after another).
# The constants were measured (peak RSS of a child process, tests/test_memory.py) on the
# embedded model and the test models from 64x64 to 512x512 and checked against the SD 1.5
# benchmark figures (docs/benchmarks.md): the estimate is within 2x of the measured peak.
BASE_BYTES = 100 << 20
UNET_TOP = 14  # UNet working memory in units of one top-level activation (batch x channels x h x w fp32)
VAE_DECODER_TOP = 9  # VAE decoder, in units of one full-resolution activation (channels[0] x H x W fp32)
VAE_ENCODER_TOP = 6
VAE_ATTENTION_COPIES = 1.25  # a materialised (tokens x tokens) score matrix and part of its softmax
TEXT_TOKENS = 77
SD_UNET = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
SD_VAE = {"block_out_channels": [128, 256, 512, 512]}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one request needs, by part (see estimate_memory)."""

    base: int
    weights: int
    load: int  # transient while the largest graph with inline weights loads
    stages: dict[str, int]  # working memory of each graph for this request
    host: int  # images and arrays held by sdrt itself

    @property
    def peak_stage(self) -> tuple[str, int]:
        return max(self.stages.items(), key=lambda kv: kv[1])

    @property
    def total(self) -> int:
        """The process's peak: base + weights + the largest stage (or the load transient)."""
        return self.base + self.weights + max(self.peak_stage[1] + self.host, self.load)


def _materialises_attention(info: ModelInfo, graph: str) -> bool:
    """Whether the graph's self-attention holds whole (tokens x tokens) score matrices.

    ONNX Runtime's CPU `Attention` kernel does; its `MultiHeadAttention` kernel has a flash path
    that does not (the cpu target rewrites self-attention to it). A folder without fusion records
    (another exporter's) runs the plain MatMul + Softmax, which does."""
    fused = (info.manifest or {}).get("fused_operators")
    counts = fused.get(graph) if isinstance(fused, dict) else None
    if not isinstance(counts, dict):
        return True
    return bool(counts.get("Attention")) or not counts.get("MultiHeadAttention")


def _int_list(value, default: list[int]) -> list[int]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v > 0 for v in value):
        return [int(v) for v in value]
    return default


def _unet_bytes(info: ModelInfo, hl: int, wl: int, n: int) -> int:
    cfg = info.configs.get("unet") or SD_UNET
    blocks = _int_list(cfg.get("block_out_channels"), SD_UNET["block_out_channels"])
    types = cfg.get("down_block_types") or SD_UNET["down_block_types"]
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8  # diffusers' naming
    materialised = _materialises_attention(info, "unet")
    top = n * blocks[0] * hl * wl * 4
    attention = 0
    for level, channels in enumerate(blocks):
        if level >= len(types) or "CrossAttn" not in str(types[level]):
            continue
        tokens = math.ceil(hl / 2**level) * math.ceil(wl / 2**level)
        h = heads[level] if isinstance(heads, (list, tuple)) and level < len(heads) else heads
        h = int(h) if isinstance(h, int) and h > 0 else 8
        scores = n * h * tokens * TEXT_TOKENS * 4 * 2  # cross-attention scores and probabilities
        if materialised:
            scores += n * h * tokens * tokens * 4 * 2
        attention = max(attention, scores)
    return UNET_TOP * top + attention


def _vae_bytes(info: ModelInfo, graph: str, width: int, height: int, per_top: int) -> int:
    cfg = info.configs.get("vae") or SD_VAE
    blocks = _int_list(cfg.get("block_out_channels"), SD_VAE["block_out_channels"])
    top = blocks[0] * width * height * 4
    tokens = (width // info.vae_scale_factor) * (height // info.vae_scale_factor)
    materialised = cfg.get("mid_block_add_attention", True) and _materialises_attention(info, graph)
    attention = int(VAE_ATTENTION_COPIES * tokens * tokens * 4) if materialised else 0
    return per_top * top + attention


def estimate_memory(info: ModelInfo, width: int, height: int, batch_size: int, cfg: bool, *,
                    input_pixels: int = 0, encode_size: tuple[int, int] | None = None,
                    encodes: bool = True) -> MemoryEstimate:
    """The memory one request needs (CPU provider), from the model's architecture (its configs),
    the size of its graphs and the request's size: see MemoryEstimate."""
    f = info.vae_scale_factor
    hl, wl = height // f, width // f
    ew, eh = encode_size or (width, height)
    graphs = (*info.text_encoders, "unet", "vae_encoder", "vae_decoder")
    weights = sum(info.graph_bytes(g) for g in graphs)
    inline = max((info.graph_files[g].stat().st_size for g in graphs
                  if g in info.graph_files and info.graph_files[g].exists()), default=0)
    stages = {
        "unet": _unet_bytes(info, hl, wl, (2 if cfg else 1) * batch_size),
        "vae_decoder": _vae_bytes(info, "vae_decoder", width, height, VAE_DECODER_TOP),
    }
    if encodes:
        stages["vae_encoder"] = _vae_bytes(info, "vae_encoder", ew, eh, VAE_ENCODER_TOP)
    host = 16 * input_pixels + width * height * (48 + 16 * batch_size)
    return MemoryEstimate(BASE_BYTES, weights, inline, stages, host)


def check_memory(info: ModelInfo, width: int, height: int, batch_size: int, *, cfg: bool, provider: str,
                 input_pixels: int = 0, encode_size: tuple[int, int] | None = None, resident: int = 0,
                 encodes: bool = True) -> None:
    """Refuse a request that needs more memory than is available now. `resident`: bytes of the
    graphs this process has loaded already (they are not needed again)."""
    avail = available_memory(provider)
    if avail is None:
        return
    e = estimate_memory(info, width, height, batch_size, cfg, input_pixels=input_pixels, encode_size=encode_size,
                        encodes=encodes)
    need = e.total - e.base - min(resident, e.weights)
    if need > avail:
        stage, stage_bytes = e.peak_stage
        raise InputError(
            f"a {width}x{height} request with batch_size {batch_size} needs about {need / 2**30:.1f} GiB of memory "
            f"({stage.replace('_', ' ')} {stage_bytes / 2**30:.1f} GiB, weights to load "
            f"{max(0, e.weights - resident) / 2**30:.1f} GiB), more than the {avail / 2**30:.1f} GiB available; "
            "use a smaller size or batch"
        )
