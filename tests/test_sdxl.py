"""SDXL: the exported graphs against PyTorch, the conditioning against diffusers and A1111's rules,
and img2img, inpainting (4- and 9-channel) and txt2img against diffusers' SDXL pipelines.

The models are tiny random-weight SDXL pipelines (export/testmodels.py: two text encoders of
different widths with the real CLIP vocabulary, addition_embed_type "text_time"). diffusers runs
in PyTorch on the diffusers folder, sdrt on its export; both get the same initial and per-step
noise and the VAE posterior's mean (test_pipeline_parity's helpers), so images agree within 2/255.
"""

from __future__ import annotations

from collections import Counter

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
def xlpipe(models):
    """kind -> the sdrt pipeline of its fp32 cpu export, loaded once."""
    loaded = {}

    def get(kind: str):
        if kind not in loaded:
            loaded[kind] = load(models.exported(kind), provider="cpu")
        return loaded[kind]

    return get


@pytest.fixture(scope="module")
def xl(xlpipe):
    return xlpipe("tiny-sdxl")


def _noise(seed: int, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, h // 2, w // 2)).astype(np.float32)


def _xl_image(seed: int = 0) -> Image.Image:
    return _image(seed).resize((W, H), Image.BICUBIC)


def _xl_mask() -> Image.Image:
    m = np.zeros((H, W), np.uint8)
    m[6:22, 14:40] = 255
    return Image.fromarray(m)


# ---------------------------------------------------------------------------------- the graphs
def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_fp32_graphs_match_pytorch(models, dpipes, kind):
    """Each exported (fused, fp32, cpu) SDXL graph computes what diffusers/transformers compute,
    at shapes other than the export's examples: every layer's hidden states and the pooled
    outputs of each text encoder, the UNet with text_embeds and time_ids (5 for a refiner) at a
    batch of 3 and latent sizes it cannot halve evenly, the VAE."""
    cls = "StableDiffusionXLPipeline" if kind == "tiny-sdxl" else "StableDiffusionXLImg2ImgPipeline"
    diffs = graph_differences(models.exported(kind), dpipes.get(cls, kind, "EulerDiscreteScheduler"))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-4, (worst, diffs[worst])


def graph_differences(folder, dp) -> dict[str, float]:
    """Max abs difference of each graph of the sdrt folder against the diffusers pipeline's module."""
    g = torch.Generator().manual_seed(3)
    diffs = {}
    with torch.no_grad():
        ids = torch.randint(0, 49408, (3, 77), generator=g)
        for name in [n for n in ("text_encoder", "text_encoder_2") if getattr(dp, n) is not None]:
            te = getattr(dp, name)
            out = te(ids, output_hidden_states=True)
            sess = _session(folder / name / "model.onnx")
            names = [o.name for o in sess.get_outputs()]
            got = dict(zip(names, sess.run(None, {"input_ids": ids.numpy().astype(np.int32)})))
            assert len(out.hidden_states) == sum(n.startswith("hidden_states.") for n in names)
            for i, h in enumerate(out.hidden_states):
                diffs[f"{name} hidden_states.{i}"] = float(np.abs(got[f"hidden_states.{i}"] - h.numpy()).max())
            pooled = "text_embeds" if name == "text_encoder_2" else "pooler_output"
            diffs[f"{name} {pooled}"] = float(np.abs(got[pooled] - getattr(out, pooled).numpy()).max())
        unet, cfg = dp.unet, dp.unet.config
        n_ids = 5 if dp.text_encoder is None else 6
        pooled_dim = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
        sess = _session(folder / "unet" / "model.onnx")
        for (b, h, w), t in (((3, 12, 20), 999.0), ((2, 11, 18), 432.7), ((1, 7, 5), 1.0)):
            sample = torch.randn(b, cfg.in_channels, h, w, generator=g)
            enc = torch.randn(b, 77 * 2, cfg.cross_attention_dim, generator=g)  # two prompt chunks
            emb = torch.randn(b, pooled_dim, generator=g)
            tids = torch.tensor([[96.0, 160.0, 8.0, 4.0, 64.0, 80.0][:n_ids]] * b)
            ref = unet(sample, torch.tensor(t), enc, added_cond_kwargs={"text_embeds": emb, "time_ids": tids}).sample
            got = sess.run(None, {"sample": sample.numpy(), "timestep": np.array(t, np.float32),
                                  "encoder_hidden_states": enc.numpy(), "text_embeds": emb.numpy(),
                                  "time_ids": tids.numpy()})[0]
            diffs[f"unet {b}x{h}x{w} t={t}"] = float(np.abs(got - ref.numpy()).max())
        img = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
        got = _session(folder / "vae_encoder" / "model.onnx").run(None, {"sample": img.numpy()})[0]
        diffs["vae_encoder"] = float(np.abs(got - dp.vae.encode(img).latent_dist.parameters.numpy()).max())
        lat = torch.randn(2, 4, 10, 14, generator=g)
        got = _session(folder / "vae_decoder" / "model.onnx").run(None, {"latent_sample": lat.numpy()})[0]
        diffs["vae_decoder"] = float(np.abs(got - dp.vae.decode(lat).sample.numpy()).max())
    return diffs


# -------------------------------------------------------------------------------------- parity
# Every sampler once, the strengths spread over them (a full product costs minutes, adds little).
IMG2IMG_CASES = [("EulerDiscreteScheduler", 0.3), ("EulerAncestralDiscreteScheduler", 0.75),
                 ("DPMSolverMultistepScheduler(use_karras_sigmas=True)", 1.0), ("DDIMScheduler", 0.5),
                 ("UniPCMultistepScheduler", 0.75)]


@pytest.mark.parametrize("sampler,strength", IMG2IMG_CASES)
def test_img2img_matches_diffusers(xl, dpipes, sampler, strength):
    noise, seed = _noise(7), 1234
    ours = xl.img2img(_xl_image(), PROMPT, NEGATIVE, strength=strength, steps=8, guidance=7.5, sampler=sampler, seed=seed,
                      noise=noise, sample_posterior=False).images[0]
    theirs = dpipes.run("StableDiffusionXLImg2ImgPipeline", "tiny-sdxl", sampler, noise, seed, prompt=PROMPT,
                        image=_xl_image(), negative_prompt=NEGATIVE, strength=strength, num_inference_steps=8,
                        guidance_scale=7.5)
    assert _compare(f"SDXL img2img {sampler} strength {strength}", ours, theirs) <= 2


@pytest.mark.parametrize("kind,sampler,strength", [
    ("tiny-sdxl", "EulerDiscreteScheduler", 0.5),
    ("tiny-sdxl", "DPMSolverMultistepScheduler(use_karras_sigmas=True)", 1.0),
    ("tiny-sdxl-inpaint", "EulerDiscreteScheduler", 1.0),
    ("tiny-sdxl-inpaint", "DDIMScheduler", 0.5),
])
def test_inpaint_matches_diffusers(xlpipe, dpipes, kind, sampler, strength):
    pipe = xlpipe(kind)
    noise, seed = _noise(3), 99
    ours = pipe.inpaint(_xl_image(1), _xl_mask(), PROMPT, NEGATIVE, strength=strength, steps=8, guidance=7.5,
                        sampler=sampler, seed=seed, noise=noise, sample_posterior=False, mask_blur=0, overlay=False,
                        fill="original").images[0]
    theirs = dpipes.run("StableDiffusionXLInpaintPipeline", kind, sampler, noise, seed, prompt=PROMPT, image=_xl_image(1),
                        mask_image=_xl_mask(), negative_prompt=NEGATIVE, strength=strength, num_inference_steps=8,
                        guidance_scale=7.5, height=H, width=W)
    assert _compare(f"SDXL inpaint {kind} {sampler} strength {strength}", ours, theirs) <= 2


@pytest.mark.parametrize("sampler", ["EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_txt2img_matches_diffusers(xl, dpipes, sampler):
    w, h = 40, 56
    noise, seed = _noise(5, w, h), 17
    ours = xl.txt2img(PROMPT, NEGATIVE, steps=8, guidance=6.0, sampler=sampler, seed=seed, width=w, height=h,
                      noise=noise).images[0]
    theirs = dpipes.run("StableDiffusionXLPipeline", "tiny-sdxl", sampler, noise, seed, prompt=PROMPT,
                        negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=6.0, height=h, width=w)
    assert _compare(f"SDXL txt2img {sampler}", ours, theirs) <= 2


@pytest.mark.parametrize("kind", ["tiny-sdxl", "tiny-sdxl-inpaint"])
def test_only_masked_matches_padding_mask_crop(xlpipe, dpipes, kind):
    """only_masked (A1111's "Only masked") against diffusers' SDXL padding_mask_crop: the crop, the
    resize-and-fill, the paste-back with overlay; the work size (the time ids' size) is W x H."""
    pipe = xlpipe(kind)
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


def test_refiner_img2img_matches_diffusers(xlpipe, dpipes):
    """A refiner (second text encoder alone, aesthetic-score time ids, no zeros for an empty negative)."""
    pipe = xlpipe("tiny-sdxl-refiner")
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


def test_empty_negative_prompt_by_family_and_model(xl, xlpipe, dpipes):
    """An empty negative prompt: zeros for SDXL base with diffusers names (force_zeros_for_empty_prompt,
    diffusers' negative_prompt=None) and always with A1111 names; the refiner (flag off) encodes ""
    with diffusers names, as diffusers does, and still gets zeros with A1111 names, as A1111 does."""
    for family in ("diffusers", "a1111"):
        _, c, u = xl.xl_conditioning(PROMPT, "", family=family)(0)
        assert not u["encoder_hidden_states"].any() and not u["text_embeds"].any(), family
        assert c["encoder_hidden_states"].any()
    refiner = xlpipe("tiny-sdxl-refiner")
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
def test_time_ids_reach_the_unet_as_in_diffusers(xlpipe, dpipes, monkeypatch, mode, kind, opts):
    """The time ids of every UNet call (negative rows first), as each diffusers SDXL pipeline passes
    them, including the options it ignores (a lone negative size in txt2img, the negative crop in
    base img2img/inpainting)."""
    pipe = xlpipe(kind)
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
def test_a1111_time_ids_are_the_work_size(xlpipe, monkeypatch, mode):
    """A1111 (sd_models_xl.get_learned_conditioning): original and target size are the size worked
    at (height, width), the crop its sdxl_crop_top/left settings (0, 0), for both sides."""
    pipe = xlpipe("tiny-sdxl")
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


# ------------------------------------------------------------------------ sizes, bad input, refusals
def test_default_size_comes_from_the_model_config(xl):
    """txt2img without width/height works at the model's native size (UNet sample_size x VAE
    factor: 64 for the tiny model, 1024 for SDXL 1.0's config), and the infotext says so."""
    from dataclasses import replace

    cfg = xl.info
    assert cfg.default_size == 32 * 2  # the tiny UNet's sample_size 32, two VAE blocks
    r = xl.txt2img(PROMPT, steps=1, seed=0, sampler="Euler")
    assert r.images[0].size == (64, 64) and "Size: 64x64" in r.infotext
    sdxl10 = replace(cfg, sample_size=128, vae_scale_factor=8)  # SDXL 1.0's unet/vae configs
    assert sdxl10.default_size == 1024
    job = xl.txt2img(PROMPT, dry_run=True)
    assert (job.parameters["width"], job.parameters["height"]) == (64, 64)


_SIZE_BAD = [(0, 64), (64,), (64, 64, 64), (64.5, 64), "64x64", (True, 64), (64, 16385), (-8, 64), 64]
_CROP_BAD = [(-1, 0), (0,), (1.5, 0), "0,0", (0, 16385), (False, 0)]
_SCORE_BAD = [float("nan"), float("inf"), "high", True, (6.0,)]
BAD_OPTIONS = ([(k, v) for k in ("original_size", "target_size", "negative_original_size", "negative_target_size")
                for v in _SIZE_BAD]
               + [(k, v) for k in ("crops_coords_top_left", "negative_crops_coords_top_left") for v in _CROP_BAD]
               + [(k, v) for k in ("aesthetic_score", "negative_aesthetic_score") for v in _SCORE_BAD])


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_bad_micro_conditioning_is_a_clear_error(xl, mode):
    for name, value in BAD_OPTIONS:
        with pytest.raises(InputError, match=name):
            _request(xl, mode, **{name: value})


@pytest.mark.parametrize("name", ["denoising_start", "denoising_end"])
@pytest.mark.parametrize("value", [0.0, 0.5, 0.8, 1.0])
def test_refiner_hand_off_is_refused_by_name(xl, name, value):
    """diffusers' base-to-refiner ensemble (denoising_end on the base, denoising_start on the
    refiner, latents between them) is refused with a message naming it and the alternative."""
    for mode in ("txt2img", "img2img", "inpaint"):
        with pytest.raises(InputError, match=f"{name}.*strength"):
            _request(xl, mode, **{name: value})


def test_micro_conditioning_on_an_sd_model_is_refused(models):
    sd = load(models.exported("tiny-sd1"), provider="cpu")
    for name in ("original_size", "target_size", "crops_coords_top_left", "aesthetic_score"):
        value = 6.0 if name == "aesthetic_score" else (64, 64)
        with pytest.raises(InputError, match=f"{name}.*SDXL models only"):
            _request(sd, "img2img", **{name: value})


def _request(pipe, mode, **opts):
    common = dict(steps=2, sampler="Euler", seed=0, dry_run=True, **opts)
    if mode == "txt2img":
        return pipe.txt2img(PROMPT, width=W, height=H, **common)
    if mode == "img2img":
        return pipe.img2img(_xl_image(), PROMPT, **common)
    return pipe.inpaint(_xl_image(), _xl_mask(), PROMPT, **common)


# ------------------------------------------------------------------------- int8 cpu, fp16 cuda
def _unet_feeds(seed: int, n_ids: int = 6) -> dict:
    g = np.random.default_rng(seed)
    return {"sample": g.standard_normal((2, 4, 16, 16), dtype=np.float32),
            "timestep": np.array(100.0 + 400 * seed, np.float32),
            "encoder_hidden_states": g.standard_normal((2, 77, 80), dtype=np.float32),
            "text_embeds": g.standard_normal((2, 40), dtype=np.float32),
            "time_ids": np.array([[64, 48, 0, 0, 64, 48][:n_ids]] * 2, np.float32)}


def test_int8_cpu_export(models, tmp_path):
    """--precision int8 on an SDXL fp32 folder (the quantization an export from the diffusers
    folder runs too, without tracing again): the UNet (with text_embeds/time_ids) quantized, the
    two text encoders and the VAE fp32; its fused int8 kernels compute what ONNX Runtime's own
    unfused QDQ arithmetic of the same graph computes, and the folder runs img2img on the CPU."""
    import onnx
    import onnxruntime as ort

    from sdrt.export import export_model

    folder = export_model(models.exported("tiny-sdxl"), tmp_path / "int8", precision="int8", log=lambda m: None)
    pipe = load(folder, provider="cpu")
    assert pipe.info.precision == {"text_encoder": "fp32", "text_encoder_2": "fp32", "unet": "int8",
                                   "vae_encoder": "fp32", "vae_decoder": "fp32"}
    ops = Counter(n.op_type for n in onnx.load(str(folder / "unet" / "model.onnx")).graph.node)
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] >= 8 and ops["QuantizeLinear"] >= 10
    fp32 = _session(models.exported("tiny-sdxl") / "unet" / "model.onnx")
    fused = _session(folder / "unet" / "model.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(folder / "unet" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    err, err_ref = [], []
    for seed in range(3):
        feeds = _unet_feeds(seed)
        ref = fp32.run(None, feeds)[0]
        err.append(np.abs(fused.run(None, feeds)[0] - ref).mean() / np.abs(ref).mean())
        err_ref.append(np.abs(unfused.run(None, feeds)[0] - ref).mean() / np.abs(ref).mean())
    assert np.mean(err) <= 1.1 * np.mean(err_ref)  # as for SD (tests/test_export.py)
    r = pipe.img2img(_xl_image(), PROMPT, NEGATIVE, steps=4, sampler="Euler", seed=1)
    assert r.images[0].size == (W, H) and np.asarray(r.images[0]).std() > 0


def test_fp16_cuda_export_structure(models):
    """The fp16 cuda export of an SDXL folder (the CUDA provider runs it; here its structure): both
    text encoders and the UNet fp16, the UNet's timestep and time_ids fp32 up to the end of their
    sinusoidal projections (sines of sizes up to 16384 lose their fraction in fp16), the VAE fp32
    (its config says force_upcast, as SDXL's does), attention fused."""
    import onnx

    from sdrt.runtime.modelfolder import read_model_folder

    folder = models.exported("tiny-sdxl", target="cuda", precision="fp16")
    info = read_model_folder(folder, verify="full")
    assert info.precision == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16",
                              "vae_encoder": "fp32", "vae_decoder": "fp32"}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    unet = onnx.load(str(folder / "unet" / "model.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}
    assert types == {"sample": f16, "timestep": f32, "encoder_hidden_states": f16, "text_embeds": f16, "time_ids": f32}
    inferred = onnx.shape_inference.infer_shapes(unet)
    out_type = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for prefix in ("/unet/time_proj/", "/unet/add_time_proj/"):
        trig = [n for n in unet.graph.node if n.name.startswith(prefix) and n.op_type in ("Sin", "Cos")]
        assert len(trig) == 2 and all(out_type[n.output[0]] == f32 for n in trig), prefix
    ops = Counter(n.op_type for n in unet.graph.node)
    assert ops["MultiHeadAttention"] >= 4 and ops["Softmax"] == 0
    for name in ("text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder"):
        inits = Counter(t.data_type for t in onnx.load(str(folder / name / "model.onnx")).graph.initializer)
        want = f16 if name.startswith("text_encoder") else f32
        assert inits[want] > 10 and inits[f16 if want == f32 else f32] <= 2, (name, inits)


# --------------------------------------------------------------------------------------- CLI
def test_cli_handles_sdxl_folders(models, tmp_path):
    """`sdrt info` describes an SDXL folder (its two text encoders, its default size); `sdrt
    txt2img` without --width/--height makes the model's size and says so in the PNG's infotext;
    `sdrt img2img` and `sdrt inpaint` run on it."""
    from typer.testing import CliRunner

    from sdrt.cli.app import app
    from sdrt.runtime.infotext import read_infotext

    folder = models.exported("tiny-sdxl")
    run = CliRunner().invoke
    r = run(app, ["info", str(folder)])
    assert r.exit_code == 0, r.output
    rows = {ln.split("  ", 1)[0]: ln.split("  ", 1)[1].strip() for ln in r.output.splitlines() if "  " in ln}
    assert rows["family"] == "sdxl" and rows["default size"].startswith("64x64")
    assert rows["text encoders"] == "text_encoder, text_encoder_2"
    r = run(app, ["txt2img", "-m", str(folder), "-p", PROMPT, "--steps", "2", "--seed", "3", "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "t" / "txt2img-3.png"
    assert Image.open(out).size == (64, 64) and "Size: 64x64" in read_infotext(out)
    _xl_image().save(tmp_path / "in.png")
    _xl_mask().save(tmp_path / "mask.png")
    for cmd in (["img2img"], ["inpaint", "--mask", str(tmp_path / "mask.png")]):
        r = run(app, [*cmd, str(tmp_path / "in.png"), "-m", str(folder), "-p", PROMPT, "--steps", "2", "--seed", "1",
                      "-o", str(tmp_path / cmd[0])])
        assert r.exit_code == 0, r.output
        (png,) = (tmp_path / cmd[0]).glob("*.png")
        assert Image.open(png).size == (W, H)
