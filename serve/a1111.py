"""AUTOMATIC1111's HTTP API, as sdrt speaks it: request models with A1111's field names and
defaults (modules/api/models.py, built from StableDiffusionProcessing's arguments), their
translation into sdrt pipeline calls, and A1111's response shapes (images, parameters, info).

Fields A1111 accepts but ignores over its API (do_not_save_samples, image_cfg_scale for a model
that is not instruct-pix2pix, hr_* without enable_hr, ...) are accepted and ignored here too.
Fields that would change the result in a way sdrt does not implement (enable_hr, restore_faces,
styles, variation seeds, scripts, ...) are refused with a 422 naming the field, unless they hold
their neutral value (what webuiapi and other clients send by default). Fields A1111 does not
have are refused too (a misspelt field would otherwise be silently ignored).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from .config import ServeConfig

MAX_SEED = 2**32 - 1
VERSION = "sdrt"


class RequestError(Exception):
    """A request the caller can fix: HTTP status and one line naming the field."""

    def __init__(self, message: str, status: int = 422, kind: str = "ValidationError", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers


# ------------------------------------------------------------------------------ request models
class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = 50
    cfg_scale: Optional[float] = 7.0
    width: Optional[int] = 512
    height: Optional[int] = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict] = None
    force_task_id: Optional[str] = None
    script_name: Optional[str] = None
    script_args: Optional[list] = Field(default_factory=list)
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict] = Field(default_factory=dict)
    infotext: Optional[str] = None


class Txt2ImgRequest(_Request):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img fields)."""

    enable_hr: Optional[bool] = False
    denoising_strength: Optional[float] = 0.75
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""


class Img2ImgRequest(_Request):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionProcessingImg2Img fields); a `mask` makes it inpainting."""

    init_images: Optional[list[str]] = None
    resize_mode: Optional[int] = 0
    denoising_strength: Optional[float] = 0.75
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    mask_blur: Optional[int] = None
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = 0
    inpaint_full_res: Optional[bool] = True
    inpaint_full_res_padding: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: Optional[bool] = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str


# What a field must hold unless sdrt implements it: field -> (is neutral, why it is refused).
def _off(v) -> bool:
    return not v or v in ("None", "none")


UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "enable_hr": (_off, "hires fix is not supported by sdrt"),
    "restore_faces": (_off, "face restoration is not supported by sdrt"),
    "tiling": (_off, "tiling is not supported by sdrt"),
    "styles": (_off, "prompt styles are not supported by sdrt; put the text in the prompt"),
    "subseed_strength": (lambda v: not v, "variation seeds are not supported by sdrt (accepted: 0)"),
    "seed_resize_from_h": (lambda v: v is None or v <= 0, "seed resize is not supported by sdrt (accepted: 0 or -1)"),
    "seed_resize_from_w": (lambda v: v is None or v <= 0, "seed resize is not supported by sdrt (accepted: 0 or -1)"),
    "script_name": (_off, "scripts are not supported by sdrt"),
    "alwayson_scripts": (_off, "scripts (ControlNet, ADetailer, ...) are not supported by sdrt (accepted: {})"),
    "save_images": (_off, "the service writes no files; images come back in the response (accepted: false)"),
    "refiner_checkpoint": (_off, "refiner models are not supported by sdrt"),
    "firstpass_image": (_off, "firstpass_image (hires fix) is not supported by sdrt"),
    "s_min_uncond": (lambda v: not v, "s_min_uncond (negative guidance minimum sigma) is not supported by sdrt (accepted: 0)"),
    "initial_noise_multiplier": (lambda v: v is None or v == 1, "initial_noise_multiplier is not supported by sdrt (accepted: 1)"),
    "latent_mask": (_off, "latent_mask is not supported by sdrt; send the mask as `mask`"),
    "infotext": (_off, "infotext requests are not supported by sdrt; send the fields themselves"),
}

# override_settings / POST /sdapi/v1/options keys sdrt knows.
OVERRIDE_KEYS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "samples_format", "eta_noise_seed_delta", "sd_vae")

RESIZE_MODES = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill", 3: "latent_upscale"}
FILL_MODES = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}


# ------------------------------------------------------------------------------ translation
@dataclass
class Call:
    """One pipeline call a request makes."""

    method: str  # "txt2img" | "img2img" | "inpaint"
    args: tuple
    kwargs: dict


@dataclass
class Plan:
    """What a request asks for, checked: the pipeline calls and what the response echoes."""

    endpoint: str
    model: str | None  # override_settings.sd_model_checkpoint, else the current model
    calls: list[Call]
    seed: int
    all_seeds: list[int]
    send_images: bool
    echo: dict[str, Any]
    request: Any
    key: tuple = ()  # requests with equal keys run their UNet calls as one batch
    images: int = 0
    steps: int = 0
    clip_skip: int = 1
    extra: dict = field(default_factory=dict)


def _check_int(name, value, lo, hi):
    if value is None or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _check_text(name, value, cfg: ServeConfig):
    if value is None:
        return ""
    if len(value) > cfg.max_prompt_chars:
        raise RequestError(f"{name} is {len(value)} characters long; at most {cfg.max_prompt_chars} are accepted")
    return value


def decode_image(text: str, name: str, cfg: ServeConfig):
    """A base64 (or data: URL) image, checked before it is decoded: its pixel count is read from
    the header, so a small file that would decompress to a huge image is refused unread."""
    from PIL import Image

    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{name}: expected a base64-encoded image (PNG, JPEG, WebP, ...), got an empty value")
    if text.startswith(("http://", "https://")):
        raise RequestError(f"{name}: image URLs are not fetched by sdrt; send the image as base64")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(f"{name}: a data URL must be data:image/...;base64,<data>")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: not valid base64; expected a base64-encoded image (PNG, JPEG, WebP, ...)") from None
    too_large = RequestError(f"{name}: the image is larger than the {cfg.max_image_pixels} pixels accepted", status=413,
                             kind="PayloadTooLarge")
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
    except Image.DecompressionBombError:
        raise too_large from None
    except Exception:
        raise RequestError(f"{name}: the data is not an image sdrt can read (PNG, JPEG, WebP, BMP, GIF, TIFF)") from None
    if w * h > cfg.max_image_pixels:
        raise RequestError(f"{name}: {w}x{h} is {w * h} pixels; at most {cfg.max_image_pixels} are accepted", status=413,
                           kind="PayloadTooLarge")
    try:
        img.load()
    except Exception:
        raise RequestError(f"{name}: the image data is truncated or corrupt") from None
    return img


def _refuse_unsupported(req: _Request) -> None:
    for name, (neutral, why) in UNSUPPORTED.items():
        if name in type(req).model_fields and not neutral(getattr(req, name)):
            raise RequestError(f"{name}: {why}; got {getattr(req, name)!r}")


def resolve_overrides(overrides: dict | None, options: dict) -> tuple[str | None, int]:
    """(model name or None, clip_skip) from override_settings over the server's options."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise RequestError(f"override_settings: {', '.join(unknown)} not supported by sdrt; accepted keys: {', '.join(OVERRIDE_KEYS)}")
    check_neutral_options(overrides, "override_settings")
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1))
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12:
        raise RequestError(f"override_settings.CLIP_stop_at_last_layers must be an integer from 1 to 12, got {clip_skip!r}")
    model = overrides.get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"override_settings.sd_model_checkpoint must be a model name (see /sdapi/v1/sd-models), got {model!r}")
    return model, clip_skip


def check_neutral_options(values: dict, where: str) -> None:
    """Options sdrt accepts only at the value that changes nothing."""
    fmt = values.get("samples_format")
    if fmt is not None and str(fmt).lower() != "png":
        raise RequestError(f"{where}.samples_format: sdrt returns PNG images (accepted: png), got {fmt!r}")
    ensd = values.get("eta_noise_seed_delta")
    if ensd not in (None, 0):
        raise RequestError(f"{where}.eta_noise_seed_delta is not supported by sdrt (accepted: 0), got {ensd!r}")
    vae = values.get("sd_vae")
    if vae not in (None, "Automatic", "None"):
        raise RequestError(f"{where}.sd_vae: sdrt uses the model folder's own VAE (accepted: Automatic), got {vae!r}")


def a1111_sampler_name(name: str) -> str:
    """A sampler name in A1111's context, which matches its samplers' names and aliases in any
    case: A1111's sampler where it has one so named ("ddim" and "euler" are A1111's DDIM and
    Euler here, ComfyUI's elsewhere in sdrt), else the name as given (A1111's combined names,
    ComfyUI and diffusers names stay accepted)."""
    from sdrt.schedulers.names import A1111

    if isinstance(name, str):
        want = name.strip().lower()
        for spec in A1111:
            if want in (spec.name.lower(), *(a.lower() for a in spec.aliases)):
                return spec.name
    return name


def _sampler_kwargs(req: _Request, sampler: str) -> dict:
    """eta, s_churn, s_tmin, s_tmax, s_noise as A1111 passes them: only to a sampler that takes them,
    and only when they differ from the neutral value (A1111 ignores them otherwise)."""
    from sdrt.schedulers import sampler_options

    try:
        takes = set(sampler_options(sampler))
    except Exception:
        return {}  # an unknown name: the pipeline's dry run reports it with the valid names
    out = {}
    neutral = {"eta": None, "s_churn": 0, "s_tmin": 0, "s_tmax": 0, "s_noise": 1}
    for k, n in neutral.items():
        v = getattr(req, k)
        if v is not None and v != n and k in takes:
            out[k] = float(v)
    return out


def plan_request(req: _Request, endpoint: str, cfg: ServeConfig, options: dict) -> Plan:
    """Check a txt2img / img2img request and turn it into pipeline calls (no model runs here)."""
    _refuse_unsupported(req)
    prompt = _check_text("prompt", req.prompt, cfg)
    negative = _check_text("negative_prompt", req.negative_prompt, cfg)
    steps = _check_int("steps", req.steps, 1, cfg.max_steps)
    batch_size = _check_int("batch_size", req.batch_size, 1, cfg.max_images)
    n_iter = _check_int("n_iter", req.n_iter, 1, cfg.max_images)
    width = _check_int("width", req.width, 8, cfg.max_width)
    height = _check_int("height", req.height, 8, cfg.max_height)
    if req.cfg_scale is None or not 0 <= req.cfg_scale <= 100:
        raise RequestError(f"cfg_scale must be a number from 0 to 100, got {req.cfg_scale!r}")
    seed = req.seed if req.seed is not None else -1
    if seed == -1:
        seed = random.randrange(MAX_SEED)
    if not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed must be -1 (random) or an integer from 0 to {MAX_SEED}, got {seed}")
    sampler = a1111_sampler_name(req.sampler_name or req.sampler_index or "Euler")
    model, clip_skip = resolve_overrides(req.override_settings, options)
    common = dict(prompt=prompt, negative_prompt=negative, steps=steps, guidance=float(req.cfg_scale), sampler=sampler,
                  schedule=req.scheduler, clip_skip=clip_skip, **_sampler_kwargs(req, sampler))

    calls: list[Call] = []
    all_seeds: list[int] = []
    echo = req.model_dump()
    if endpoint == "txt2img":
        common.update(width=width, height=height)
        for k in range(n_iter):
            s = (seed + k * batch_size) & MAX_SEED
            calls.append(Call("txt2img", (), dict(common, seed=s, batch_size=batch_size)))
            all_seeds += [(s + j) & MAX_SEED for j in range(batch_size)]
        strength = None
        key_mode = ("txt2img",)
    else:
        strength = req.denoising_strength
        if strength is None or not 0 <= strength <= 1:
            raise RequestError(f"denoising_strength must be a number from 0 to 1, got {strength!r}")
        if req.resize_mode not in RESIZE_MODES:
            raise RequestError(f"resize_mode must be one of 0 (just resize), 1 (crop and resize), 2 (resize and fill), "
                               f"3 (just resize, latent upscale), got {req.resize_mode!r}")
        if not req.init_images:
            raise RequestError("init_images: img2img needs at least one base64-encoded image")
        n_img = len(req.init_images)
        if n_img > 1 and n_img > batch_size:
            raise RequestError(f"init_images: {n_img} images but batch_size is {batch_size}; give one image, "
                               f"or at most batch_size images (one per image of the batch, as A1111)")
        if n_img * n_iter > cfg.max_images or batch_size * n_iter > cfg.max_images:
            raise RequestError(f"this request makes {max(n_img, batch_size) * n_iter} images; at most {cfg.max_images} "
                               "per request are accepted (batch_size x n_iter)")
        images = [decode_image(t, f"init_images[{i}]", cfg) for i, t in enumerate(req.init_images)]
        common.update(width=width, height=height, strength=float(strength), resize_mode=RESIZE_MODES[req.resize_mode])
        method = "img2img"
        mask = None
        if req.mask:
            mask = decode_image(req.mask, "mask", cfg)
            method = "inpaint"
            blur_x, blur_y = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
            for n, v in (("mask_blur_x", blur_x), ("mask_blur_y", blur_y)):
                _check_int(n, v, 0, 256)
            _check_int("inpaint_full_res_padding", req.inpaint_full_res_padding, 0, 4096)
            if req.inpainting_fill not in FILL_MODES:
                raise RequestError(f"inpainting_fill must be one of 0 (fill), 1 (original), 2 (latent noise), "
                                   f"3 (latent nothing), got {req.inpainting_fill!r}")
            if req.inpainting_mask_invert not in (0, 1):
                raise RequestError(f"inpainting_mask_invert must be 0 (inpaint masked) or 1 (inpaint not masked), "
                                   f"got {req.inpainting_mask_invert!r}")
            common.update(mask_blur_x=blur_x, mask_blur_y=blur_y, invert_mask=bool(req.inpainting_mask_invert),
                          mask_round=bool(req.mask_round), fill=FILL_MODES[req.inpainting_fill],
                          only_masked=bool(req.inpaint_full_res), padding=req.inpaint_full_res_padding)
        for k in range(n_iter):
            base = (seed + k * batch_size) & MAX_SEED
            if n_img == 1:
                args = (images[0],) if mask is None else (images[0], mask)
                calls.append(Call(method, args, dict(common, seed=base, batch_size=batch_size)))
                all_seeds += [(base + j) & MAX_SEED for j in range(batch_size)]
            else:  # one image per batch entry, each with its own seed
                for j, img in enumerate(images):
                    s = (base + j) & MAX_SEED
                    args = (img,) if mask is None else (img, mask)
                    calls.append(Call(method, args, dict(common, seed=s, batch_size=1)))
                    all_seeds.append(s)
        if not req.include_init_images:
            echo["init_images"] = None
            echo["mask"] = None
        key_mode = (method, strength, common["resize_mode"])
    if len(all_seeds) > cfg.max_images:
        raise RequestError(f"this request makes {len(all_seeds)} images; at most {cfg.max_images} per request are "
                           "accepted (batch_size x n_iter)")
    key = (model, width, height, steps, sampler, req.scheduler, float(req.cfg_scale), *key_mode)
    return Plan(endpoint=endpoint, model=model, calls=calls, seed=seed, all_seeds=all_seeds,
                send_images=req.send_images is not False, echo=echo, request=req, key=key,
                images=len(all_seeds), steps=steps, clip_skip=clip_skip)


# ------------------------------------------------------------------------------- responses
def encode_png(image, infotext: str | None) -> str:
    """Base64 PNG with the infotext in its "parameters" text chunk, as A1111's encode_pil_to_base64."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response(plan: Plan, results: list, model_info) -> dict:
    """A1111's TextToImageResponse / ImageToImageResponse: images, parameters (the request, as
    received), info (Processed.js() as a JSON string)."""
    images, infotexts = [], []
    params0 = results[0].parameters if results else {}
    for r in results:
        infotexts += r.infotexts
        if plan.send_images:
            images += [encode_png(im, t) for im, t in zip(r.images, r.infotexts)]
    req = plan.request
    n = len(plan.all_seeds)
    prompt = params0.get("prompt", req.prompt)
    negative = params0.get("negative_prompt", req.negative_prompt or "")
    subseed = req.subseed if req.subseed is not None and req.subseed >= 0 else plan.seed
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * n,
        "seed": plan.seed,
        "all_seeds": plan.all_seeds,
        "subseed": subseed,
        "all_subseeds": [(subseed + i) & MAX_SEED for i in range(n)],
        "subseed_strength": req.subseed_strength or 0,
        "width": params0.get("width", req.width),
        "height": params0.get("height", req.height),
        "sampler_name": params0.get("sampler", req.sampler_name),
        "cfg_scale": req.cfg_scale,
        "steps": plan.steps,
        "batch_size": req.batch_size,
        "restore_faces": bool(req.restore_faces),
        "face_restoration_model": None,
        "sd_model_name": model_info.model_name,
        "sd_model_hash": model_info.short_hash or None,
        "sd_vae_name": (model_info.vae or {}).get("name"),
        "sd_vae_hash": (model_info.vae or {}).get("short_hash"),
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": req.denoising_strength,
        "extra_generation_params": {**params0.get("infotext_extra", {}), "Schedule type": params0.get("schedule")},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": req.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": plan.clip_skip,
        "is_using_inpainting_conditioning": bool(model_info.is_inpainting_model and plan.endpoint == "img2img"),
        "version": VERSION,
    }
    return {"images": images, "parameters": plan.echo, "info": json.dumps(info, ensure_ascii=False)}


def png_info(req: PngInfoRequest, cfg: ServeConfig) -> dict:
    """A1111's PNGInfoResponse: info (the parameters text), items (the image's other text
    chunks), parameters (the text parsed as A1111's parse_generation_parameters: Prompt,
    Negative prompt, each key, sizes split into Size-1 and Size-2)."""
    import re

    from sdrt.runtime.infotext import parse_infotext

    img = decode_image(req.image.strip(), "image", cfg)
    items = {k: v for k, v in (img.info or {}).items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop("parameters", None) or ""
    parameters: dict[str, Any] = {}
    if text:
        prompt, negative, params = parse_infotext(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative}
        for k, v in params.items():
            m = re.fullmatch(r"^(\d+)x(\d+)$", v)
            if m:
                parameters[f"{k}-1"], parameters[f"{k}-2"] = m.group(1), m.group(2)
            else:
                parameters[k] = v
    return {"info": text, "items": items, "parameters": parameters}


# ------------------------------------------------------------------------------- listings
# A1111's scheduler table (modules/sd_schedulers.py): name -> (label, aliases, default_rho, need_inner_model).
_SCHEDULER_EXTRA = {
    "uniform": (None, True), "karras": (7.0, False), "polyexponential": (1.0, False), "sgm_uniform": (None, True),
    "normal": (None, True), "ddim": (None, True),
}


def samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem list (the A1111 names sdrt runs)."""
    from sdrt.schedulers.names import A1111

    out = []
    for s in A1111:
        opts = {} if s.schedule in (None, "uniform") else {"scheduler": s.schedule}
        if s.sampler in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral") or s.brownian:
            opts["uses_ensd"] = "True"
        out.append({"name": s.name, "aliases": list(s.aliases), "options": opts})
    return out


def schedulers() -> list[dict]:
    """GET /sdapi/v1/schedulers: A1111's SchedulerItem list."""
    from sdrt.schedulers.names import A1111_SCHEDULES

    out = []
    for name, (label, aliases) in A1111_SCHEDULES.items():
        rho, inner = _SCHEDULER_EXTRA.get(name, (None, False))
        out.append({"name": name, "label": label, "aliases": list(aliases) or None, "default_rho": rho,
                    "need_inner_model": inner})
    return out
