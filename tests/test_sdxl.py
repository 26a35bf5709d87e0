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


# -------------------------------------------------------------------------------- conditioning
def _close(name, ours, theirs, atol=1e-4):
    theirs = theirs.detach().float().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    d = float(np.abs(ours - theirs).max())
    assert d <= atol, f"{name}: max abs difference {d:.3g}"
    return d


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_conditioning_matches_diffusers_encode_prompt(xl, dpipes, clip_skip):
    """diffusers names: both encoders' hidden_states[-(clip_skip + 1)] side by side for the prompt
    (diffusers' clip_skip = sdrt's - 1), hidden_states[-2] for the negative prompt whatever the
    clip skip (diffusers' encode_prompt), the second encoder's text_embeds as the pooled text."""
    dp = dpipes.get("StableDiffusionXLPipeline", "tiny-sdxl", "EulerDiscreteScheduler")
    with torch.no_grad():
        pe, ne, pp, npp = dp.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                           negative_prompt=NEGATIVE, clip_skip=None if clip_skip == 1 else clip_skip - 1)
    _, c, u = xl.xl_conditioning(PROMPT, NEGATIVE, clip_skip, family="diffusers")(0)
    _close("prompt embeds", c["encoder_hidden_states"], pe)
    _close("negative embeds", u["encoder_hidden_states"], ne)
    _close("pooled", c["text_embeds"], pp)
    _close("negative pooled", u["text_embeds"], npp)
    assert c["encoder_hidden_states"].shape[-1] == 32 + 48  # both encoders, in order


def test_empty_negative_prompt_by_family_and_model(xl, models, dpipes):
    """An empty negative prompt: zeros for SDXL base with diffusers names (force_zeros_for_empty_prompt,
    diffusers' negative_prompt=None) and always with A1111 names; the refiner (flag off) encodes ""
    with diffusers names, as diffusers does, and still gets zeros with A1111 names, as A1111 does."""
    for family in ("diffusers", "a1111"):
        _, c, u = xl.xl_conditioning(PROMPT, "", family=family)(0)
        assert not u["encoder_hidden_states"].any() and not u["text_embeds"].any(), family
        assert c["encoder_hidden_states"].any()
    refiner = load(models.exported("tiny-sdxl-refiner"), provider="cpu")
    dp = dpipes.get("StableDiffusionXLImg2ImgPipeline", "tiny-sdxl-refiner", "EulerDiscreteScheduler")
    with torch.no_grad():
        _, ne, _, npp = dp.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                         negative_prompt=None)
    assert ne.abs().max() > 0
    _, _, u = refiner.xl_conditioning(PROMPT, "", family="diffusers")(0)
    _close("refiner empty negative", u["encoder_hidden_states"], ne)
    _close("refiner empty negative pooled", u["text_embeds"], npp)
    _, _, u = refiner.xl_conditioning(PROMPT, "", family="a1111")(0)
    assert not u["encoder_hidden_states"].any() and not u["text_embeds"].any()


def _a1111_reference(dp, pieces: list[list[tuple[str, float]]]):
    """A1111's SDXL conditioning of a prompt given as chunks of (text, weight) pieces, re-derived
    from its code (sd_hijack_clip, sd_hijack_open_clip, sgm's GeneralConditioner): each chunk is
    BOS + the pieces' tokens + EOS padding (the OpenCLIP side pads with id 0 after the first EOS),
    each encoder's hidden_states[-2] (CLIP-L's layer_idx, OpenCLIP's "penultimate"), weights
    multiplied in and each encoder's mean restored, the encoders joined on the feature axis, the
    chunks on the sequence axis; the pooled text is the OpenCLIP encoder's of the first chunk."""
    out, pooled = [], None
    for chunk in pieces:
        ids, weights = [49406], [1.0]
        for text, w in chunk:
            t = dp.tokenizer(text, add_special_tokens=False).input_ids
            ids += t
            weights += [w] * len(t)
        ids += [49407] * (77 - len(ids))
        weights += [1.0] * (77 - len(weights))
        ids_g = ids[: ids.index(49407) + 1] + [0] * (76 - ids.index(49407))
        w = torch.tensor(weights)[None, :, None]
        zs = []
        with torch.no_grad():
            for te, tids in ((dp.text_encoder, ids), (dp.text_encoder_2, ids_g)):
                o = te(torch.tensor([tids]), output_hidden_states=True)
                z = o.hidden_states[-2]
                zw = z * w
                zs.append(zw * (z.mean() / zw.mean()))
                if te is dp.text_encoder_2 and pooled is None:
                    pooled = o.text_embeds
        out.append(torch.cat(zs, dim=-1))
    return torch.cat(out, dim=1), pooled


def test_a1111_conditioning_matches_its_rules(xl, dpipes):
    """A1111 names: emphasis on each encoder, BREAK chunks, pooled of the first chunk, clip skip
    without effect (A1111's default settings), zeros for an empty negative prompt."""
    dp = dpipes.get("StableDiffusionXLPipeline", "tiny-sdxl", "EulerDiscreteScheduler")
    prompt = "a (red:1.5) circle on a [white] background BREAK (sharp) edges"
    ref, ref_pooled = _a1111_reference(dp, [[("a ", 1.0), ("red", 1.5), (" circle on a ", 1.0), ("white", 1 / 1.1),
                                             (" background", 1.0)], [("sharp", 1.1), (" edges", 1.0)]])
    neg, neg_pooled = _a1111_reference(dp, [[("blurry", 1.0)]])
    for clip_skip in (1, 2):
        _, c, u = xl.xl_conditioning(prompt, NEGATIVE, clip_skip, family="a1111")(0)
        _close("A1111 cond", c["encoder_hidden_states"], ref)
        _close("A1111 pooled", c["text_embeds"], ref_pooled)
        _close("A1111 uncond (repeated to the prompt's two chunks)", u["encoder_hidden_states"], torch.cat([neg, neg], 1))
        _close("A1111 uncond pooled", u["text_embeds"], neg_pooled)


def _unet_time_ids(pipe, monkeypatch):
    """Record the time_ids every UNet call of an sdrt pipeline gets."""
    seen = []
    graph = pipe.graphs["unet"]
    run = graph.run

    def recording(feeds, outputs=None, keep=()):
        seen.append(np.array(feeds["time_ids"]))
        return run(feeds, outputs, keep)

    monkeypatch.setattr(graph, "run", recording)
    return seen


def _diffusers_time_ids(dp):
    seen = []
    forward = dp.unet.forward

    def recording(*a, added_cond_kwargs=None, **k):
        seen.append(added_cond_kwargs["time_ids"].numpy().copy())
        return forward(*a, added_cond_kwargs=added_cond_kwargs, **k)

    dp.unet.forward = recording
    return seen, lambda: setattr(dp.unet, "forward", forward)


TIME_ID_CASES = [
    ("txt2img", "tiny-sdxl", {}),
    ("txt2img", "tiny-sdxl", dict(negative_original_size=(64, 32), negative_target_size=(80, 96),
                                  negative_crops_coords_top_left=(4, 2), crops_coords_top_left=(8, 6))),
    ("txt2img", "tiny-sdxl", dict(negative_original_size=(64, 32), original_size=(300, 200))),  # one negative size: unused
    ("img2img", "tiny-sdxl", dict(negative_original_size=(64, 32), negative_crops_coords_top_left=(4, 2),
                                  target_size=(100, 120))),  # the negative crop: unused
    ("inpaint", "tiny-sdxl-inpaint", dict(original_size=(512, 256), negative_target_size=(40, 48))),
    ("img2img", "tiny-sdxl-refiner", dict(negative_crops_coords_top_left=(4, 2), aesthetic_score=5.5,
                                          negative_original_size=(70, 90))),
]


@pytest.mark.parametrize("mode,kind,opts", TIME_ID_CASES)
def test_time_ids_reach_the_unet_as_in_diffusers(models, dpipes, monkeypatch, mode, kind, opts):
    """The time ids of every UNet call (negative rows first), as each diffusers SDXL pipeline passes
    them, including the options it ignores (a lone negative size in txt2img, the negative crop in
    base img2img/inpainting)."""
    pipe = load(models.exported(kind), provider="cpu")
    ours = _unet_time_ids(pipe, monkeypatch)
    cls = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
           "inpaint": "StableDiffusionXLInpaintPipeline"}[mode]
    dp = dpipes.get(cls, kind, "EulerDiscreteScheduler")
    theirs, restore = _diffusers_time_ids(dp)
    common = dict(steps=2, sampler="EulerDiscreteScheduler", seed=0, **opts)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, **opts)
    try:
        if mode == "txt2img":
            pipe.txt2img(PROMPT, NEGATIVE, width=W, height=H, **common)
            dp(height=H, width=W, **kw)
        elif mode == "img2img":
            pipe.img2img(_xl_image(), PROMPT, NEGATIVE, strength=1.0, **common)
            dp(image=_xl_image(), strength=1.0, **kw)
        else:
            pipe.inpaint(_xl_image(), _xl_mask(), PROMPT, NEGATIVE, strength=1.0, **common)
            dp(image=_xl_image(), mask_image=_xl_mask(), strength=1.0, height=H, width=W, **kw)
    finally:
        restore()
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_a1111_time_ids_are_the_work_size(models, monkeypatch, mode):
    """A1111 (sd_models_xl.get_learned_conditioning): original and target size are the size worked
    at (height, width), the crop its sdxl_crop_top/left settings (0, 0), for both sides."""
    pipe = load(models.exported("tiny-sdxl"), provider="cpu")
    ours = _unet_time_ids(pipe, monkeypatch)
    if mode == "txt2img":
        pipe.txt2img(PROMPT, NEGATIVE, width=W, height=H, steps=2, sampler="Euler", seed=0)
    elif mode == "img2img":
        pipe.img2img(_image(), PROMPT, NEGATIVE, width=W, height=H, steps=2, sampler="Euler", seed=0)
    else:  # only masked: the work size is the requested one, not the image's
        pipe.inpaint(_image().resize((96, 80)), _mask().resize((96, 80)), PROMPT, NEGATIVE, width=W, height=H, steps=2,
                     sampler="Euler", seed=0, only_masked=True)
    assert ours and all(np.array_equal(t, [[H, W, 0, 0, H, W]] * 2) for t in ours)


# ------------------------------------------------------------------------- A1111's loop on SDXL
def _a1111_img2img_reference(dp, image, prompt, negative, steps, strength, cfg, noise, func, schedule):
    """A1111's img2img on an SDXL model, re-derived: its conditioning (_a1111_reference; zeros for
    an empty negative; time ids (h, w, 0, 0, h, w)), k-diffusion's CompVisDenoiser (the model's
    float32 alphas_cumprod, fractional timesteps), CFGDenoiser's combination, sample_img2img's
    sigmas[steps - t_enc - 1:] and xi = x + noise * sigma, the VAE mean, A1111's truncating 8-bit cast."""
    from kdiffusion_ref import load_kdiffusion

    sampling, external = load_kdiffusion()
    cond, pooled = _a1111_reference(dp, [[(prompt, 1.0)]])
    if negative:
        uncond, u_pooled = _a1111_reference(dp, [[(negative, 1.0)]])
    else:
        uncond, u_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
    h, w = image.height, image.width
    ids = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=torch.float32)
    unet = dp.unet

    def inner(x_in, t):
        added = {"text_embeds": torch.cat([pooled, u_pooled]), "time_ids": ids}
        return unet(x_in, t, encoder_hidden_states=torch.cat([cond, uncond]), added_cond_kwargs=added).sample

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    mw = external.DiscreteEpsDDPMDenoiser(inner, torch.cumprod(1 - betas, 0).float(), quantize=False)

    def cfg_denoiser(x, sigma):
        out = mw(torch.cat([x, x]), torch.cat([sigma[None]] * 2).reshape(2))
        c, u = out.chunk(2)
        return u + (c - u) * cfg

    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)[None]
        init = dp.vae.encode(pixels).latent_dist.mean * dp.vae.config.scaling_factor
        if schedule == "karras":
            sigmas = sampling.get_sigmas_karras(steps, mw.sigmas[0].item(), mw.sigmas[-1].item())
        else:
            sigmas = mw.get_sigmas(steps)
        t_enc = int(min(strength, 0.999) * steps)
        sched = sigmas[steps - t_enc - 1:]
        xi = init + torch.from_numpy(noise) * sched[0]
        lat = getattr(sampling, func)(cfg_denoiser, xi, sched, disable=True)
        x = dp.vae.decode(lat / dp.vae.config.scaling_factor).sample
    arr = (255.0 * torch.clamp((x[0] + 1) / 2, 0, 1)).permute(1, 2, 0).numpy().astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("negative", ["", NEGATIVE])
@pytest.mark.parametrize("sampler,func,schedule", [("Euler", "sample_euler", "uniform"),
                                                   ("DPM++ 2M", "sample_dpmpp_2m", "karras")])
def test_a1111_img2img_matches_its_loop(xl, dpipes, sampler, func, schedule, negative):
    dp = dpipes.get("StableDiffusionXLPipeline", "tiny-sdxl", "EulerDiscreteScheduler")
    noise = _noise(13)
    ours = xl.img2img(_xl_image(5), PROMPT, negative, strength=0.6, steps=10, guidance=7.0, sampler=sampler, seed=2,
                      noise=noise, sample_posterior=False).images[0]
    theirs = _a1111_img2img_reference(dp, _xl_image(5), PROMPT, negative, 10, 0.6, 7.0, noise, func, schedule)
    assert _compare(f"SDXL A1111 img2img {sampler} negative {negative!r}", ours, theirs) <= 2
