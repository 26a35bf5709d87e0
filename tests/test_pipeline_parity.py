"""sdrt's img2img and inpainting against diffusers' pipelines on the same tiny models, same noise.

The diffusers pipelines run in PyTorch on the diffusers folder; sdrt runs the exported ONNX
graphs. Both get the same initial noise and the same per-step noise; the VAE posterior is its
mean on both sides (sdrt: sample_posterior=False; diffusers: patched), so the outputs must agree
to within 2/255.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime import load

PROMPT = "a red circle on a white background"
NEGATIVE = "blurry"
SIZE = 32  # pixels; the tiny VAE has factor 2 -> 16x16 latents

# diffusers scheduler name as sdrt accepts it -> (diffusers class, from_config options)
SAMPLERS = {
    "EulerDiscreteScheduler": ("EulerDiscreteScheduler", {}),
    "EulerAncestralDiscreteScheduler": ("EulerAncestralDiscreteScheduler", {}),
    "DPMSolverMultistepScheduler(use_karras_sigmas=True)": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIMScheduler": ("DDIMScheduler", {}),
    "UniPCMultistepScheduler": ("UniPCMultistepScheduler", {}),
}
STRENGTHS = [0.3, 0.75, 1.0]


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1).astype(np.float32)
    img += rng.normal(0, 20, img.shape)
    circle = (xx - 12) ** 2 + (yy - 18) ** 2 < 64
    img[circle] = [30, 60, 220]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[6:22, 10:28] = 255
    return Image.fromarray(m)


@contextlib.contextmanager
def _diffusers_noise(module_names, initial: np.ndarray, step_noise):
    """Make diffusers' randn_tensor return `initial` first, then successive step noises; and make
    the VAE posterior return its mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    calls = {"n": 0}

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        calls["n"] += 1
        if calls["n"] == 1:
            arr = initial
        else:
            arr = step_noise(tuple(shape))
        assert tuple(arr.shape) == tuple(shape), (arr.shape, shape)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype or torch.float32)

    with contextlib.ExitStack() as stack:
        for name in module_names:
            stack.enter_context(mock.patch(f"{name}.randn_tensor", randn_tensor))
        stack.enter_context(mock.patch.object(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean))
        yield


def _step_noise_source(seed: int):
    """The per-step noise sdrt draws for image 0: NumPy Generator(seed), in order."""
    rng = np.random.default_rng(seed)
    return lambda shape: rng.standard_normal(shape[1:], dtype=np.float32)[None]


def _scheduler_modules(cls_name: str) -> list[str]:
    import diffusers

    import importlib

    mod = getattr(diffusers, cls_name).__module__
    return [mod] if hasattr(importlib.import_module(mod), "randn_tensor") else []


def _diffusers_pipe(cls, src, sampler: str):
    import diffusers

    cls_name, opts = SAMPLERS[sampler]
    pipe = cls.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **opts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(name, ours: Image.Image, theirs: Image.Image) -> float:
    a = np.asarray(ours, dtype=np.int16)
    b = np.asarray(theirs, dtype=np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = int(np.abs(a - b).max())
    print(f"{name}: max abs pixel difference {d}/255")
    return d


@pytest.fixture(scope="module")
def sd1(models):
    return load(models.exported("tiny-sd1"), provider="cpu"), models.source("tiny-sd1")


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_matches_diffusers(sd1, sampler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, src = sd1
    steps, seed = 8, 1234
    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    ours = pipe.img2img(
        _image(), PROMPT, NEGATIVE, strength=strength, steps=steps, guidance=7.5, sampler=sampler, seed=seed,
        noise=noise, sample_posterior=False,
    ).images[0]
    dp = _diffusers_pipe(StableDiffusionImg2ImgPipeline, src, sampler)
    mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"] + _scheduler_modules(SAMPLERS[sampler][0])
    with _diffusers_noise(mods, noise, _step_noise_source(seed)):
        theirs = dp(PROMPT, image=_image(), negative_prompt=NEGATIVE, strength=strength, num_inference_steps=steps, guidance_scale=7.5).images[0]
    assert _compare(f"img2img {sampler} strength {strength}", ours, theirs) <= 2


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_inpaint_matches_diffusers(models, kind, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = load(models.exported(kind), provider="cpu")
    steps, seed = 8, 99
    noise = np.random.default_rng(3).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    ours = pipe.inpaint(
        _image(), _mask(), PROMPT, NEGATIVE, strength=strength, steps=steps, guidance=7.5, sampler=sampler, seed=seed,
        noise=noise, sample_posterior=False, mask_blur=0, overlay=False, fill="original",
    ).images[0]
    dp = _diffusers_pipe(StableDiffusionInpaintPipeline, models.source(kind), sampler)
    mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"] + _scheduler_modules(SAMPLERS[sampler][0])
    with _diffusers_noise(mods, noise, _step_noise_source(seed)):
        theirs = dp(
            PROMPT, image=_image(), mask_image=_mask(), negative_prompt=NEGATIVE, strength=strength, num_inference_steps=steps,
            guidance_scale=7.5, height=SIZE, width=SIZE,
        ).images[0]
    assert _compare(f"inpaint {kind} {sampler} strength {strength}", ours, theirs) <= 2


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
def test_only_masked_matches_padding_mask_crop(models, kind):
    """sdrt's only_masked (A1111's "Inpaint area: Only masked") against diffusers' padding_mask_crop:
    the same crop region, the same resize-and-fill, the same paste-back with overlay."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = load(models.exported(kind), provider="cpu")
    sampler, steps, seed = "EulerDiscreteScheduler", 8, 5
    big = _image().resize((48, 40))
    m = np.zeros((40, 48), np.uint8)
    m[12:22, 20:30] = 255
    mask = Image.fromarray(m)
    noise = np.random.default_rng(11).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    ours = pipe.inpaint(
        big, mask, PROMPT, strength=0.75, steps=steps, sampler=sampler, seed=seed, noise=noise, sample_posterior=False,
        mask_blur=0, only_masked=True, padding=4, overlay=True, width=SIZE, height=SIZE,
    ).images[0]
    dp = _diffusers_pipe(StableDiffusionInpaintPipeline, models.source(kind), sampler)
    mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"] + _scheduler_modules(SAMPLERS[sampler][0])
    with _diffusers_noise(mods, noise, _step_noise_source(seed)):
        theirs = dp(
            PROMPT, image=big, mask_image=mask, strength=0.75, num_inference_steps=steps, guidance_scale=7.5,
            height=SIZE, width=SIZE, padding_mask_crop=4,
        ).images[0]
    assert ours.size == big.size == theirs.size
    assert _compare(f"only_masked/padding_mask_crop {kind}", ours, theirs) <= 2


def test_overlay_keeps_pixels_outside_mask(sd1):
    pipe, _ = sd1
    img, mask = _image(), _mask()
    for sampler in ("Euler a", "EulerDiscreteScheduler", "dpmpp_2m"):
        r = pipe.inpaint(img, mask, PROMPT, strength=0.9, steps=6, sampler=sampler, seed=3, mask_blur=0, overlay=True)
        out = np.asarray(r.images[0])
        outside = np.asarray(mask) == 0
        assert np.array_equal(out[outside], np.asarray(img)[outside]), sampler
        assert not np.array_equal(out[~outside], np.asarray(img)[~outside]), sampler


def test_strength_zero_is_the_vae_round_trip(sd1):
    pipe, src = sd1
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    # diffusers' rule: int(10 * 0) = 0 steps (A1111 names run one step at strength 0)
    r = pipe.img2img(_image(), PROMPT, strength=0.0, steps=10, seed=0, sample_posterior=False,
                     sampler="EulerDiscreteScheduler")
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae").eval()
    proc = VaeImageProcessor(vae_scale_factor=2)
    with torch.no_grad():
        x = proc.preprocess(_image())
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    theirs = proc.postprocess(rec, output_type="pil")[0]
    assert r.timings["unet_calls"] == 0
    assert _compare("strength 0 round trip", r.images[0], theirs) <= 2


# Every diffusers class sdrt accepts, at full strength (where img2img starts from pure noise at
# the first timestep) on the 12-step schedule.
ALL_CLASSES = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
               "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
               "DPMSolverMultistepScheduler", "DDIMScheduler", "PNDMScheduler", "UniPCMultistepScheduler",
               "LCMScheduler"]
# DPMSolverSDEScheduler draws its noise from torchsde's Brownian tree, which cannot be handed to
# sdrt here: its strength-1.0 run is compared with injected noise in test_schedulers_diffusers.py.


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_img2img_strength_one_every_class(sd1, cls):
    from diffusers import StableDiffusionImg2ImgPipeline

    SAMPLERS.setdefault(cls, (cls, {}))
    pipe, src = sd1
    steps, seed = 12, 4321
    noise = np.random.default_rng(8).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    ours = pipe.img2img(_image(2), PROMPT, NEGATIVE, strength=1.0, steps=steps, guidance=7.5, sampler=cls, seed=seed,
                        noise=noise, sample_posterior=False).images[0]
    dp = _diffusers_pipe(StableDiffusionImg2ImgPipeline, src, cls)
    mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"] + _scheduler_modules(cls)
    with _diffusers_noise(mods, noise, _step_noise_source(seed)):
        theirs = dp(PROMPT, image=_image(2), negative_prompt=NEGATIVE, strength=1.0, num_inference_steps=steps,
                    guidance_scale=7.5).images[0]
    assert _compare(f"img2img {cls} strength 1.0", ours, theirs) <= 2


V_SAMPLERS = ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler(use_karras_sigmas=True)", "DDIMScheduler"]


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("sampler", V_SAMPLERS)
def test_img2img_v_prediction_matches_diffusers(models, sampler, strength):
    """An SD 2.x-style model (v-prediction, "!" padding, linear transformer projections)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = load(models.exported("tiny-sd2-v"), provider="cpu")
    assert pipe.info.prediction_type == "v_prediction"
    steps, seed = 10, 77
    noise = np.random.default_rng(9).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    ours = pipe.img2img(_image(3), PROMPT, NEGATIVE, strength=strength, steps=steps, guidance=7.5, sampler=sampler,
                        seed=seed, noise=noise, sample_posterior=False).images[0]
    dp = _diffusers_pipe(StableDiffusionImg2ImgPipeline, models.source("tiny-sd2-v"), sampler)
    assert dp.scheduler.config.prediction_type == "v_prediction"
    mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"] + _scheduler_modules(SAMPLERS[sampler][0])
    with _diffusers_noise(mods, noise, _step_noise_source(seed)):
        theirs = dp(PROMPT, image=_image(3), negative_prompt=NEGATIVE, strength=strength, num_inference_steps=steps,
                    guidance_scale=7.5).images[0]
    assert _compare(f"v-prediction img2img {sampler} strength {strength}", ours, theirs) <= 2


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
@pytest.mark.parametrize("blur", [2, 4])
def test_inpaint_mask_blur_matches_diffusers(models, kind, blur):
    """mask_blur with a diffusers sampler is diffusers' own mask blur: the mask the pipeline gets
    is mask_processor.blur(mask, blur_factor)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = load(models.exported(kind), provider="cpu")
    sampler, steps, seed = "EulerDiscreteScheduler", 8, 21
    noise = np.random.default_rng(12).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    mask = Image.fromarray(np.pad(np.full((9, 13), 255, np.uint8), ((8, 15), (11, 8))))  # edges off the 2x2 grid
    ours = pipe.inpaint(_image(4), mask, PROMPT, NEGATIVE, strength=0.75, steps=steps, guidance=7.5, sampler=sampler,
                        seed=seed, noise=noise, sample_posterior=False, mask_blur=blur, overlay=False,
                        fill="original").images[0]
    unblurred = pipe.inpaint(_image(4), mask, PROMPT, NEGATIVE, strength=0.75, steps=steps, guidance=7.5,
                             sampler=sampler, seed=seed, noise=noise, sample_posterior=False, overlay=False,
                             fill="original").images[0]
    dp = _diffusers_pipe(StableDiffusionInpaintPipeline, models.source(kind), sampler)
    mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"] + _scheduler_modules(sampler)
    with _diffusers_noise(mods, noise, _step_noise_source(seed)):
        theirs = dp(PROMPT, image=_image(4), mask_image=dp.mask_processor.blur(mask, blur_factor=blur),
                    negative_prompt=NEGATIVE, strength=0.75, num_inference_steps=steps, guidance_scale=7.5,
                    height=SIZE, width=SIZE).images[0]
    assert _compare(f"inpaint {kind} mask_blur {blur}", ours, theirs) <= 2
    assert _compare("blurred vs unblurred mask", ours, unblurred) > 2  # the blur changes the result
