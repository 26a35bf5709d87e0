"""Every sampler at every step count: sampler names x schedules x step counts x strengths on the
tiny model, each run succeeding with finite output.

The grid is generated from the names sdrt lists (`list_samplers`, `list_schedules`): every name
with each schedule of its family that it takes (A1111's combined legacy names imply theirs; a
diffusers class takes a schedule where it has the option the schedule sets), at 1, 2 and 3 steps
(and 10 with the name's default schedule) and strengths 0.5 and 1, driven by the tiny model's
UNet; then every name through the API's img2img at 1 and 2 steps and txt2img at one step. What the one-step runs compute is
checked against k-diffusion and diffusers in test_schedulers_kdiffusion.py and
test_schedulers_diffusers.py (test_*_one_step).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import load
from sdrt.schedulers import list_samplers, list_schedules, make_plan, sample
from sdrt.schedulers.diffusers_compat import DEFAULTS as DIFFUSERS_OPTIONS
from sdrt.schedulers.names import A1111_LEGACY, DIFFUSERS_SCHEDULES

SIZE = 8  # 4x4 latents on the tiny model (VAE factor 2)
PROMPT = "a red circle"
NAMES = [s.name for s in list_samplers()]


def schedules_of(sampler) -> list:
    """None (the name's default) and each schedule of its family that it takes."""
    if sampler.name in A1111_LEGACY:
        return [None]
    labels = list_schedules()[sampler.family]
    if sampler.family == "diffusers":
        options = DIFFUSERS_OPTIONS[sampler.name]
        labels = [label for label, opts in DIFFUSERS_SCHEDULES.values() if set(opts) <= set(options)]
    return [None, *labels]


GRID = {s.name: schedules_of(s) for s in list_samplers()}


def _image() -> Image.Image:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] * (16 // SIZE)
    return Image.fromarray(np.stack([xx * 15, yy * 15, (xx + yy) * 7], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def sd1(models):
    return load(models.exported("tiny-sd1"), provider="cpu")


@pytest.fixture(scope="module")
def unet_run(sd1):
    """run(name, schedule, steps, strength) -> final latents, with the tiny model's UNet; a run
    whose plan another run of the same name already made (same sampler, noise levels, options
    and start) returns None."""
    cond, uncond = sd1.encode_prompt(PROMPT)
    pixels = np.asarray(_image(), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    x0 = sd1.encode_images(pixels, None, sample_posterior=False)
    noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    config = sd1.info.scheduler_config

    seen = set()

    def run(name, schedule, steps, strength):
        plan = make_plan(name, steps, strength, schedule, config=config)
        key = (name, plan.sampler, plan.sigmas.tobytes(), repr(plan.options), plan.noise, plan.brownian_range,
               strength, plan.unet_calls)
        if key in seen:
            return None
        seen.add(key)
        x = plan.start(x0 if strength < 1 else None, noise)
        denoise = sd1.make_denoiser(plan, cond, uncond, 1.0)
        return plan.finish(sample(plan, denoise, x, rng=np.random.default_rng(1)))

    return run


@pytest.mark.parametrize("name", NAMES)
def test_every_schedule_step_count_and_strength(unet_run, name):
    failed = []
    for schedule in GRID[name]:
        for steps in (1, 2, 3) if schedule is not None else (1, 2, 3, 10):
            for strength in (0.5, 1.0):
                try:
                    out = unet_run(name, schedule, steps, strength)
                    ok = out is None or bool(np.isfinite(out).all())
                except ValueError as e:
                    failed.append((schedule, steps, strength, str(e)))
                    continue
                if not ok:
                    failed.append((schedule, steps, strength, "non-finite latents"))
    assert not failed, failed


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_through_the_api(sd1, name):
    img = _image()
    for steps in (1, 2):
        r = sd1.img2img(img, PROMPT, strength=0.6, steps=steps, sampler=name, seed=2, output="latent")
        assert r.arrays.shape == (1, 4, SIZE // 2, SIZE // 2) and np.isfinite(r.arrays).all(), steps
    r = sd1.txt2img(PROMPT, steps=1, sampler=name, seed=3, width=SIZE, height=SIZE, output="np")
    assert r.arrays.shape == (1, SIZE, SIZE, 3) and np.isfinite(r.arrays).all()
