"""Textual-inversion embeddings and a LoRA on an SD 2.x-style model (tiny-sd2-v: v-prediction,
GELU text encoder, "!" padding, linear transformer projections) against diffusers'
load_textual_inversion and load_lora_weights + fuse_lora on the same model and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.runtime import InputError, load
from test_lora import make_lora
from test_pipeline_parity import NEGATIVE, SIZE, _compare, _diffusers_noise, _image, _step_noise_source

STEPS, SEED, STRENGTH = 4, 99, 0.75
SAMPLER = "EulerDiscreteScheduler"
WIDTH = 32  # the tiny SD 2.x text encoder's (real SD 2.x: 1024)


@pytest.fixture(scope="module")
def sd2(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2networks")
    src = models.source("tiny-sd2-v")
    g = torch.Generator().manual_seed(5)
    save_file({"emb_params": torch.randn(2, WIDTH, generator=g)}, str(folder / "sd2emb.safetensors"))
    save_file({"emb_params": torch.randn(1, 768, generator=g)}, str(folder / "sd1emb.safetensors"))
    save_file(make_lora(src, "kohya", seed=8, scale=0.3), str(folder / "sd2lora.safetensors"))
    pipe = load(models.exported("tiny-sd2-v"), provider="cpu", embeddings_dir=folder, lora_dir=folder)
    assert pipe.info.prediction_type == "v_prediction"
    return pipe, src, folder


def _noise():
    return np.random.default_rng(3).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)


def _ours(pipe, prompt):
    return pipe.img2img(_image(), prompt, NEGATIVE, strength=STRENGTH, steps=STEPS, sampler=SAMPLER, seed=SEED,
                        noise=_noise(), sample_posterior=False).images[0]


def _theirs(src, prompt, setup):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    dp = StableDiffusionImg2ImgPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    dp.scheduler = EulerDiscreteScheduler.from_config(dp.scheduler.config)
    assert dp.scheduler.config.prediction_type == "v_prediction"
    dp.set_progress_bar_config(disable=True)
    setup(dp)
    with _diffusers_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"], _noise(),
                          _step_noise_source(SEED)):
        return dp(prompt, image=_image(), negative_prompt=NEGATIVE, strength=STRENGTH, num_inference_steps=STEPS,
                  guidance_scale=7.5).images[0]


def test_sd2_embedding_matches_diffusers(sd2):
    pipe, src, folder = sd2
    prompt = "a sd2emb circle on a white background"
    got = _ours(pipe, prompt)
    ref = _theirs(src, prompt, lambda dp: dp.load_textual_inversion(str(folder / "sd2emb.safetensors"), token="sd2emb"))
    assert _compare("SD 2.x embedding", got, ref) <= 2
    plain = load(pipe.info.path, provider="cpu", embeddings_dir=folder / "none")
    assert _compare("SD 2.x embedding vs plain words", got, _ours(plain, prompt)) > 4


def test_sd2_lora_matches_diffusers(sd2):
    pipe, src, folder = sd2

    def fuse(dp):
        dp.load_lora_weights(str(folder), weight_name="sd2lora.safetensors")
        dp.fuse_lora(lora_scale=0.8)

    prompt = "a red circle on a white background"
    got = _ours(pipe, prompt + "<lora:sd2lora:0.8>")
    assert _compare("SD 2.x LoRA", got, _theirs(src, prompt, fuse)) <= 2
    assert _compare("SD 2.x LoRA vs none", got, _ours(pipe, prompt)) > 8


def test_sd1_embedding_on_sd2_is_one_line(sd2):
    pipe, _, _ = sd2
    with pytest.raises(InputError) as e:
        pipe.img2img(_image(), "a sd1emb circle", steps=2, dry_run=True)
    msg = str(e.value)
    assert "width 768 (SD 1.x)" in msg and "\n" not in msg, msg


# Real SD 2.x text encoders are 1024 wide (OpenCLIP ViT-H/14), SD 1.x ones 768 (CLIP ViT-L/14).
WIDTHS = [  # (text encoder width, embedding shape, accepted, words in the refusal)
    (1024, (1, 1024), True, ""), (1024, (4, 1024), True, ""), (1024, (1024,), True, ""),
    (768, (2, 768), True, ""),
    (1024, (1, 768), False, "width 768 (SD 1.x), this text encoder takes 1024 (SD 2.x)"),
    (1024, (3, 768), False, "SD 1.x"), (1024, (768,), False, "SD 1.x"),
    (768, (1, 1024), False, "width 1024 (SD 2.x), this text encoder takes 768 (SD 1.x)"),
    (1024, (2, 1280), False, "width 1280, this text encoder takes 1024"),
    (1024, (2, 1024, 1), False, "not [vectors, width]"), (1024, (0, 1024), False, "not [vectors, width]"),
]


@pytest.mark.parametrize("width,shape,ok,words", WIDTHS, ids=[f"{w}-{s}" for w, s, _, _ in WIDTHS])
def test_embedding_width_check(tmp_path, width, shape, ok, words):
    from safetensors.numpy import save_file as save_np

    from sdrt.runtime.embeddings import read_embedding

    path = tmp_path / "e.safetensors"
    vec = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    save_np({"emb_params": vec}, str(path))
    if ok:
        assert read_embedding(path, width).vectors.shape == (vec.reshape(-1, width).shape)
        return
    with pytest.raises(InputError) as e:
        read_embedding(path, width)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
