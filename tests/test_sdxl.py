"""SDXL: the exported graphs against PyTorch, the conditioning against diffusers and A1111's rules,
and img2img, inpainting (4- and 9-channel) and txt2img against diffusers' SDXL pipelines.

The models are tiny random-weight SDXL pipelines (export/testmodels.py: two text encoders of
different widths with the real CLIP vocabulary, addition_embed_type "text_time"). diffusers runs
in PyTorch on the diffusers folder, sdrt on its export; both get the same initial and per-step
noise and the VAE posterior's mean (test_pipeline_parity's helpers), so images agree within 2/255.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_pipeline_parity import _compare, _diffusers_noise, _image, _mask, _scheduler_modules, _step_noise_source

from sdrt.runtime import load
from sdrt.runtime.errors import InputError

PROMPT = "a red circle on a white background"
NEGATIVE = "blurry"
W, H = 48, 32  # non-square: latents 16 x 24 with the tiny VAE's factor 2
XL_MODULES = {
    "StableDiffusionXLPipeline": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "StableDiffusionXLImg2ImgPipeline": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    "StableDiffusionXLInpaintPipeline": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
}
SAMPLERS = {
    "EulerDiscreteScheduler": ("EulerDiscreteScheduler", {}),
    "EulerAncestralDiscreteScheduler": ("EulerAncestralDiscreteScheduler", {}),
    "DPMSolverMultistepScheduler(use_karras_sigmas=True)": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIMScheduler": ("DDIMScheduler", {}),
    "UniPCMultistepScheduler": ("UniPCMultistepScheduler", {}),
}


# ------------------------------------------------------------------------------------- fixtures
class DiffusersPipes:
    """diffusers' SDXL pipelines on the test models, loaded once each; the scheduler is set per use."""

    def __init__(self, models):
        self.models = models
        self._pipes = {}

    def get(self, cls_name: str, kind: str, sampler: str):
        import diffusers

        if (cls_name, kind) not in self._pipes:
            pipe = getattr(diffusers, cls_name).from_pretrained(self.models.source(kind), add_watermarker=False)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[cls_name, kind] = (pipe, dict(pipe.scheduler.config))
        pipe, config = self._pipes[cls_name, kind]
        cls, opts = SAMPLERS[sampler]
        pipe.scheduler = getattr(diffusers, cls).from_config(config, **opts)
        return pipe

    def run(self, cls_name: str, kind: str, sampler: str, noise: np.ndarray, seed: int, **kw):
        pipe = self.get(cls_name, kind, sampler)
        with _diffusers_noise([XL_MODULES[cls_name]] + _scheduler_modules(SAMPLERS[sampler][0]), noise, _step_noise_source(seed)):
            return pipe(**kw).images[0]


@pytest.fixture(scope="module")
def dpipes(models):
    return DiffusersPipes(models)


@pytest.fixture(scope="module")
def xl(models):
    return load(models.exported("tiny-sdxl"), provider="cpu")


def _noise(seed: int, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, h // 2, w // 2)).astype(np.float32)


def _xl_image(seed: int = 0) -> Image.Image:
    return _image(seed).resize((W, H), Image.BICUBIC)


def _xl_mask() -> Image.Image:
    m = np.zeros((H, W), np.uint8)
    m[6:22, 14:40] = 255
    return Image.fromarray(m)


# -------------------------------------------------------------------------------------- parity
STRENGTHS = [0.3, 0.75, 1.0]


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_matches_diffusers(xl, dpipes, sampler, strength):
    noise, seed = _noise(7), 1234
    ours = xl.img2img(_xl_image(), PROMPT, NEGATIVE, strength=strength, steps=8, guidance=7.5, sampler=sampler, seed=seed,
                      noise=noise, sample_posterior=False).images[0]
    theirs = dpipes.run("StableDiffusionXLImg2ImgPipeline", "tiny-sdxl", sampler, noise, seed, prompt=PROMPT,
                        image=_xl_image(), negative_prompt=NEGATIVE, strength=strength, num_inference_steps=8,
                        guidance_scale=7.5)
    assert _compare(f"SDXL img2img {sampler} strength {strength}", ours, theirs) <= 2


@pytest.mark.parametrize("kind", ["tiny-sdxl", "tiny-sdxl-inpaint"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("sampler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler(use_karras_sigmas=True)",
                                     "DDIMScheduler"])
def test_inpaint_matches_diffusers(models, dpipes, kind, sampler, strength):
    pipe = load(models.exported(kind), provider="cpu")
    noise, seed = _noise(3), 99
    ours = pipe.inpaint(_xl_image(1), _xl_mask(), PROMPT, NEGATIVE, strength=strength, steps=8, guidance=7.5,
                        sampler=sampler, seed=seed, noise=noise, sample_posterior=False, mask_blur=0, overlay=False,
                        fill="original").images[0]
    theirs = dpipes.run("StableDiffusionXLInpaintPipeline", kind, sampler, noise, seed, prompt=PROMPT, image=_xl_image(1),
                        mask_image=_xl_mask(), negative_prompt=NEGATIVE, strength=strength, num_inference_steps=8,
                        guidance_scale=7.5, height=H, width=W)
    assert _compare(f"SDXL inpaint {kind} {sampler} strength {strength}", ours, theirs) <= 2


@pytest.mark.parametrize("sampler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
                                     "UniPCMultistepScheduler"])
def test_txt2img_matches_diffusers(xl, dpipes, sampler):
    w, h = 40, 56
    noise, seed = _noise(5, w, h), 17
    ours = xl.txt2img(PROMPT, NEGATIVE, steps=8, guidance=6.0, sampler=sampler, seed=seed, width=w, height=h,
                      noise=noise).images[0]
    theirs = dpipes.run("StableDiffusionXLPipeline", "tiny-sdxl", sampler, noise, seed, prompt=PROMPT,
                        negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=6.0, height=h, width=w)
    assert _compare(f"SDXL txt2img {sampler}", ours, theirs) <= 2


@pytest.mark.parametrize("kind", ["tiny-sdxl", "tiny-sdxl-inpaint"])
def test_only_masked_matches_padding_mask_crop(models, dpipes, kind):
    """only_masked (A1111's "Only masked") against diffusers' SDXL padding_mask_crop: the crop, the
    resize-and-fill, the paste-back with overlay; the work size (the time ids' size) is W x H."""
    pipe = load(models.exported(kind), provider="cpu")
    sampler, seed = "EulerDiscreteScheduler", 5
    big = _image().resize((72, 56))
    m = np.zeros((56, 72), np.uint8)
    m[20:34, 30:44] = 255
    mask = Image.fromarray(m)
    noise = _noise(11)
    ours = pipe.inpaint(big, mask, PROMPT, strength=0.75, steps=8, sampler=sampler, seed=seed, noise=noise,
                        sample_posterior=False, mask_blur=0, only_masked=True, padding=4, overlay=True, width=W,
                        height=H).images[0]
    theirs = dpipes.run("StableDiffusionXLInpaintPipeline", kind, sampler, noise, seed, prompt=PROMPT, image=big,
                        mask_image=mask, strength=0.75, num_inference_steps=8, guidance_scale=7.5, height=H, width=W,
                        padding_mask_crop=4)
    assert ours.size == big.size == theirs.size
    assert _compare(f"SDXL only_masked/padding_mask_crop {kind}", ours, theirs) <= 2


def test_micro_conditioning_matches_diffusers_and_matters(xl, dpipes):
    """original_size, crops_coords_top_left, target_size and the negative ones reach the UNet as
    diffusers' img2img pipeline passes them; and they change the image (so the parity tests,
    which use the defaults, would notice a wrong size or order in the time ids)."""
    sampler, noise, seed = "EulerDiscreteScheduler", _noise(21), 8
    opts = dict(original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(256, 320),
                negative_original_size=(128, 96), negative_target_size=(64, 80))
    common = dict(strength=0.8, steps=8, guidance=7.5, sampler=sampler, seed=seed, noise=noise, sample_posterior=False)
    ours = xl.img2img(_xl_image(2), PROMPT, NEGATIVE, **common, **opts).images[0]
    plain = xl.img2img(_xl_image(2), PROMPT, NEGATIVE, **common).images[0]
    theirs = dpipes.run("StableDiffusionXLImg2ImgPipeline", "tiny-sdxl", sampler, noise, seed, prompt=PROMPT,
                        image=_xl_image(2), negative_prompt=NEGATIVE, strength=0.8, num_inference_steps=8,
                        guidance_scale=7.5, **opts)
    assert _compare("SDXL img2img micro-conditioning", ours, theirs) <= 2
    assert _compare("micro-conditioning vs default", ours, plain) > 2


def test_refiner_img2img_matches_diffusers(models, dpipes):
    """A refiner (second text encoder alone, aesthetic-score time ids, no zeros for an empty negative)."""
    pipe = load(models.exported("tiny-sdxl-refiner"), provider="cpu")
    assert pipe.info.text_encoders == ("text_encoder_2",) and pipe.info.xl.requires_aesthetics_score
    sampler, noise, seed = "DPMSolverMultistepScheduler(use_karras_sigmas=True)", _noise(4), 31
    for negative, scores in (("", {}), (NEGATIVE, {"aesthetic_score": 7.0, "negative_aesthetic_score": 1.5})):
        ours = pipe.img2img(_xl_image(3), PROMPT, negative, strength=0.6, steps=8, guidance=7.5, sampler=sampler, seed=seed,
                            noise=noise, sample_posterior=False, **scores).images[0]
        theirs = dpipes.run("StableDiffusionXLImg2ImgPipeline", "tiny-sdxl-refiner", sampler, noise, seed, prompt=PROMPT,
                            image=_xl_image(3), negative_prompt=negative or None, strength=0.6, num_inference_steps=8,
                            guidance_scale=7.5, **scores)
        assert _compare(f"SDXL refiner img2img negative {negative!r} {scores}", ours, theirs) <= 2
