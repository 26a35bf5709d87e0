"""sdrt.schedulers: schedules and conversions against their references, names, img2img rules,
dtypes and randomness. Sampler-by-sampler parity with k-diffusion and diffusers is in
test_schedulers_kdiffusion.py and test_schedulers_diffusers.py."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from sdrt.schedulers import (UnknownSamplerError, batch_noise_sampler, denoised_from_output, family_of, list_samplers,
                             list_schedules, make_plan, sample)
from sdrt.schedulers import schedules, training
from sdrt.schedulers.noise import BrownianTree, brownian_sampler
from sdrt.schedulers.samplers import lms_coefficient

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def test_import_needs_no_torch_scipy_or_diffusers():
    code = ("import sys; import sdrt.schedulers as s; s.make_plan('DPM++ 2M Karras', 10, config={}); "
            "bad = [m for m in ('torch', 'scipy', 'diffusers', 'k_diffusion') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------ training schedule
def test_ldm_schedule_matches_torch_float64():
    torch = pytest.importorskip("torch")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ref = torch.cumprod(1 - betas, 0).numpy()
    np.testing.assert_allclose(training.alphas_cumprod(SD, "ldm"), ref, rtol=1e-14)
    sig = training.sigmas_from_alphas_cumprod(ref)
    assert sig[0] == pytest.approx(0.0291672, abs=1e-6) and sig[-1] == pytest.approx(14.61464, abs=1e-5)


@pytest.mark.parametrize("cfg", [
    {},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"rescale_betas_zero_snr": True},
    {"trained_betas": list(np.linspace(1e-4, 2e-2, 1000))},
])
def test_diffusers_schedule_matches_diffusers(cfg):
    diffusers = pytest.importorskip("diffusers")
    full = {**SD, **cfg}
    sch = diffusers.EulerDiscreteScheduler.from_config(full)
    ours = training.alphas_cumprod(full, "diffusers")
    # Zero-SNR rescaling subtracts nearly equal numbers at the end of the schedule, which turns
    # torch's last-ulp differences (its vectorised linspace) into a few 1e-6.
    rtol = 1e-5 if cfg.get("rescale_betas_zero_snr") else 3e-7
    np.testing.assert_allclose(ours, sch.alphas_cumprod.numpy(), rtol=rtol)
    if cfg.get("rescale_betas_zero_snr"):
        assert ours[-1] == 2.0**-24


def test_ldm_zero_terminal_snr():
    ac = training.alphas_cumprod({**SD, "rescale_betas_zero_snr": True}, "ldm")
    assert ac[-1] == training.ZSNR_LAST_ALPHA_BAR
    assert ac[0] == pytest.approx(training.alphas_cumprod(SD, "ldm")[0], rel=1e-12)


def test_sigma_timestep_conversions_match_kdiffusion():
    torch = pytest.importorskip("torch")
    from kdiffusion_ref import load_kdiffusion

    _, external = load_kdiffusion()
    ac = training.alphas_cumprod(SD)
    mw = external.DiscreteEpsDDPMDenoiser(None, torch.from_numpy(ac), quantize=False)
    table = training.sigmas_from_alphas_cumprod(ac)
    log_table = np.log(table)
    rng = np.random.default_rng(0)
    for s in np.concatenate([np.exp(rng.uniform(np.log(0.01), np.log(20), 200)), table[[0, 1, 500, 998, 999]]]):
        st = torch.tensor(s, dtype=torch.float64)
        assert training.t_from_sigma(s, log_table) == pytest.approx(mw.sigma_to_t(st).item(), abs=1e-9)
        assert training.index_nearest(s, log_table) == mw.sigma_to_t(st, quantize=True).item()
    t = rng.uniform(0, 999, 100)
    ref = mw.t_to_sigma(torch.from_numpy(t)).numpy()  # k-diffusion rounds t to float32 first
    np.testing.assert_allclose(training.sigma_from_t(t.astype(np.float32), log_table), ref, rtol=1e-12)


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("n", [1, 2, 7, 20, 37])
def test_schedules_match_kdiffusion(n):
    torch = pytest.importorskip("torch")
    from kdiffusion_ref import load_kdiffusion

    sampling, external = load_kdiffusion()
    ac = training.alphas_cumprod(SD)
    table = training.sigmas_from_alphas_cumprod(ac)
    mw = external.DiscreteEpsDDPMDenoiser(None, torch.from_numpy(ac), quantize=False)
    smin, smax = float(table[0]), float(table[-1])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        np.testing.assert_allclose(schedules.normal(n, table), mw.get_sigmas(n).numpy(), rtol=1e-6)
        np.testing.assert_allclose(schedules.karras(n, smin, smax), sampling.get_sigmas_karras(n, smin, smax).numpy(),
                                   rtol=1e-12)
        np.testing.assert_allclose(schedules.exponential(n, smin, smax),
                                   sampling.get_sigmas_exponential(n, smin, smax).numpy(), rtol=1e-12)
        np.testing.assert_allclose(schedules.polyexponential(n, smin, smax, 2.0),
                                   sampling.get_sigmas_polyexponential(n, smin, smax, 2.0).numpy(), rtol=1e-12)
    finally:
        torch.set_default_dtype(old)


def test_beta_schedule_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    p = np.concatenate([np.linspace(0, 1, 57), [1e-9, 0.25, 0.999999]])
    for a, b in [(0.6, 0.6), (0.5, 0.5), (2.0, 5.0), (1.3, 0.7)]:
        np.testing.assert_allclose(schedules.beta_ppf(p, a, b), stats.beta.ppf(p, a, b), atol=1e-12)
    q = stats.beta.ppf(1 - np.linspace(0, 1, 15), 0.6, 0.6)
    np.testing.assert_allclose(schedules.beta(15, 0.03, 14.6), np.append(0.03 + q * (14.6 - 0.03), 0), rtol=1e-12)


SPACINGS = [("EulerDiscreteScheduler", {}), ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
            ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
            ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
            ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
            ("EulerDiscreteScheduler", {"use_beta_sigmas": True}),
            ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
            ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
            ("DPMSolverMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
            ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}),
            ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True}),
            ("UniPCMultistepScheduler", {"use_exponential_sigmas": True}),
            ("DDIMScheduler", {}), ("DDIMScheduler", {"timestep_spacing": "trailing"}),
            ("LCMScheduler", {})]


@pytest.mark.parametrize("steps", [4, 25, 30])
@pytest.mark.parametrize("cls,options", SPACINGS)
def test_schedules_match_diffusers(cls, options, steps):
    diffusers = pytest.importorskip("diffusers")
    sch = getattr(diffusers, cls).from_config(SD, **options)
    sch.set_timesteps(steps)
    plan = make_plan(cls, steps, config=SD, **options)
    if cls in ("DDIMScheduler", "LCMScheduler"):
        ac = sch.alphas_cumprod.numpy().astype(np.float64)
        ref = np.sqrt((1 - ac[sch.timesteps.numpy()]) / ac[sch.timesteps.numpy()])
        np.testing.assert_allclose(plan.sigmas[:-1], ref, rtol=1e-6)
    else:
        np.testing.assert_allclose(plan.sigmas, sch.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([plan.timestep(s) for s in plan.sigmas[:-1]], sch.timesteps.numpy(), atol=1e-4)


def test_lms_coefficients_match_quadrature():
    integrate = pytest.importorskip("scipy.integrate")
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0.03, 14.6, 12))[::-1]
    for order in range(1, 5):
        for i in range(order - 1, len(t) - 1):
            for j in range(order):
                def fn(tau):
                    prod = 1.0
                    for k in range(order):
                        if k != j:
                            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
                    return prod

                ref = integrate.quad(fn, t[i], t[i + 1], epsrel=1e-12)[0]
                assert lms_coefficient(order, t, i, j) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_denoised_from_output_matches_diffusers_conversions():
    rng = np.random.default_rng(2)
    x, out, s = rng.standard_normal(8), rng.standard_normal(8), 3.7
    np.testing.assert_allclose(denoised_from_output(out, x, s, "epsilon"), x - s * out)
    np.testing.assert_allclose(denoised_from_output(out, x, s, "v_prediction"),
                               out * (-s / (s * s + 1) ** 0.5) + x / (s * s + 1))
    # VP form: x0 = alpha * z - sigma_vp * v
    a = 1 / math.sqrt(1 + s * s)
    np.testing.assert_allclose(denoised_from_output(out, x, s, "v_prediction"), a * (x * a) - s * a * out)
    with pytest.raises(ValueError):
        denoised_from_output(out, x, s, "flow")


# -------------------------------------------------------------------------------- names
ALL_NAMES = [s.name for s in list_samplers()]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_listed_name_resolves(name):
    entry = next(s for s in list_samplers() if s.name == name)
    plan = make_plan(name, 10, 0.7, config=SD)
    assert plan.family == entry.family == family_of(name)
    assert (plan.unet_calls is None or plan.unet_calls > 0)  # None: DPM adaptive decides while it runs
    assert np.all(np.diff(plan.sigmas) <= 0) and plan.sigmas[0] > plan.sigmas[-1]
    for alias in entry.aliases:
        if family_of(alias) != entry.family:  # another tool's own name ("ddim"): the prefix selects
            assert any(o.name == alias for o in list_samplers()), alias
            alias = f"{entry.family}:{alias}"
        other = make_plan(alias, 10, 0.7, config=SD)
        np.testing.assert_array_equal(other.sigmas, plan.sigmas)
        assert other.name == plan.name and other.schedule_label == plan.schedule_label


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownSamplerError) as e:
        make_plan("Eular a", 10, config=SD)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for name in ("Euler a", "DPM++ 2M Karras", "dpmpp_2m", "uni_pc_bh2", "DPMSolverMultistepScheduler", "LCMScheduler"):
        assert name in msg


def test_unknown_schedule_lists_valid_schedules():
    with pytest.raises(UnknownSamplerError, match="SGM Uniform"):
        make_plan("DPM++ 2M", 10, schedule="Karras2", config=SD)
    with pytest.raises(UnknownSamplerError, match="ddim_uniform"):
        make_plan("dpmpp_2m", 10, schedule="Uniform", config=SD)
    assert set(list_schedules()) == {"a1111", "comfyui", "diffusers"}


@pytest.mark.parametrize("legacy,sampler,schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("k_dpmpp_2m_ka", "DPM++ 2M", "Karras"),
    ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
    ("DPM2 a Karras", "DPM2 a", "Karras"),
    ("LMS Karras", "LMS", "Karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
    ("DPM++ 3M SDE Karras", "DPM++ 3M SDE", "Karras"),
    ("Euler a SGM Uniform", "Euler a", "SGM Uniform"),
    ("Euler Karras", "Euler", "karras"),
])
def test_legacy_combined_names(legacy, sampler, schedule):
    a = make_plan(legacy, 14, 0.8, config=SD)
    b = make_plan(sampler, 14, 0.8, schedule, config=SD)
    np.testing.assert_array_equal(a.sigmas, b.sigmas)
    assert (a.name, a.schedule_label, a.sampler) == (b.name, b.schedule_label, b.sampler)
    assert dict(a.options) == dict(b.options)
    with pytest.raises(ValueError, match="implies"):
        make_plan(legacy, 14, 0.8, "Simple", config=SD)


def test_a1111_automatic_schedules():
    names = ("DPM++ 2M", "DPM++ 2M SDE", "DPM2", "Euler a", "LMS")
    labels = {n: make_plan(n, 10, config=SD).schedule_label for n in names}
    assert labels == {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential", "DPM2": "Karras", "Euler a": "Automatic",
                      "LMS": "Automatic"}
    np.testing.assert_array_equal(make_plan("DPM++ 2M", 10, config=SD).sigmas,
                                  make_plan("DPM++ 2M", 10, schedule="Karras", config=SD).sigmas)


def test_family_prefix_and_case():
    assert make_plan("ddim", 10, config=SD).family == "comfyui"
    assert make_plan("DDIM", 10, config=SD).family == "a1111"
    assert make_plan("comfyui:euler", 10, config=SD).family == "comfyui"
    with pytest.raises(UnknownSamplerError):
        make_plan("diffusers:euler", 10, config=SD)
    # Case matters only where two tools' names differ just by case (ComfyUI euler, A1111 Euler).
    lower = make_plan("dpm++ 2m karras", 10, config=SD)
    assert (lower.name, lower.schedule_label) == ("DPM++ 2M", "Karras")
    assert make_plan("euler", 10, config=SD).family == "comfyui"
    assert make_plan("EULER A", 10, config=SD).name == "Euler a"
    with pytest.raises(UnknownSamplerError):
        make_plan("Ddim", 10, config=SD)


# -------------------------------------------------------------------------- img2img rules
def _a1111_alpha_bar():
    """ldm's alpha-bar (float64 linspace of sqrt(beta), squared, cumprod) as the float32 buffer A1111 holds."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1 - betas).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M Karras", "LMS"])
def test_a1111_strength_zero_runs_one_step(name):
    """A1111: t_enc = int(0 * steps) = 0, so sigmas[steps - 1:] = [sigma_min, 0]: one step."""
    ac = _a1111_alpha_bar()
    sigma_min = float(np.sqrt((np.float32(1) - np.float32(ac[0])) / np.float32(ac[0])))
    plan = make_plan(name, 20, 0.0, config=SD)
    assert plan.unet_calls == 1
    np.testing.assert_allclose(plan.sigmas, [sigma_min, 0.0], rtol=2.4e-7)  # exp(float32 log): 2 float32 ulps
    assert plan.sigmas[0] == pytest.approx(0.0292, abs=1e-4)


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC"])
def test_a1111_timestep_samplers_at_strength_zero_noise_to_t1(name):
    """A1111's timestep samplers: timesteps[:t_enc] is empty, the latent is noised to
    timesteps[0] = 1 and returned."""
    a = _a1111_alpha_bar()[1]
    plan = make_plan(name, 20, 0.0, config=SD)
    assert plan.unet_calls == 0
    x0 = np.ones((1, 4, 2, 2))
    noise = np.full_like(x0, 0.5)
    out = plan.finish(sample(plan, lambda x_, s_: 1 / 0, plan.start(x0, noise)))
    np.testing.assert_allclose(out, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-12)


@pytest.mark.parametrize("name", ["euler", "EulerDiscreteScheduler", "PNDMScheduler", "uni_pc", "LCMScheduler"])
def test_strength_zero_has_no_steps(name):
    plan = make_plan(name, 4 if name == "LCMScheduler" else 20, 0.0, config=SD)
    assert plan.unet_calls == 0 and len(plan.sigmas) == 1
    x0 = np.ones((1, 4, 2, 2), np.float32)
    x = plan.start(x0, np.full_like(x0, 5))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(plan.finish(sample(plan, lambda x_, s_: 1 / 0, x)), x0)


@pytest.mark.parametrize("rule,steps,strength,kept", [
    ("diffusers", 20, 0.5, 10), ("diffusers", 20, 0.33, 6), ("diffusers", 20, 1.0, 20), ("diffusers", 20, 0.04, 0),
    ("a1111", 20, 0.5, 11), ("a1111", 20, 1.0, 20), ("a1111", 20, 0.01, 1),
    ("a1111_fix_steps", 20, 0.5, 20), ("a1111_fix_steps", 20, 1.0, 20),
    ("comfyui", 20, 0.5, 20), ("comfyui", 20, 0.99995, 20),
])
def test_img2img_rules(rule, steps, strength, kept):
    plan = make_plan("Euler", steps, strength, config=SD, rule=rule)
    assert len(plan.sigmas) - 1 == kept and plan.rule == rule
    if rule == "a1111_fix_steps" and strength < 1:
        full = make_plan("Euler", int(steps / strength), config=SD)
        np.testing.assert_array_equal(plan.sigmas, full.sigmas[-(kept + 1):])


def test_default_rule_follows_family():
    assert len(make_plan("Euler", 20, 0.5, config=SD).sigmas) == 12  # A1111: t_enc + 1 steps
    assert len(make_plan("euler", 20, 0.5, config=SD).sigmas) == 21  # ComfyUI: all 20 steps
    assert len(make_plan("EulerDiscreteScheduler", 20, 0.5, config=SD).sigmas) == 11  # diffusers: 10 steps


def test_bad_arguments():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            make_plan("Euler", bad, config=SD)
    with pytest.raises(ValueError):
        make_plan("Euler", 10, 1.5, config=SD)
    with pytest.raises(ValueError, match="rule"):
        make_plan("Euler", 10, 0.5, config=SD, rule="auto1111")
    with pytest.raises(ValueError, match="no option"):
        make_plan("DPM++ 2M", 10, config=SD, eta=0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        make_plan("Euler", 10, config={**SD, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_plan("PNDMScheduler", 10, config={**SD, "skip_prk_steps": False})


# ------------------------------------------------------------------------ running samplers
def _denoiser(x, sigma):
    return np.tanh(x / math.sqrt(1 + sigma * sigma)) * 0.8


@pytest.mark.parametrize("name", ALL_NAMES)
def test_samplers_keep_float32_and_leave_input_alone(name):
    plan = make_plan(name, 8, 0.75, config=SD)
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x = plan.start(x0, rng.standard_normal(x0.shape).astype(np.float32))
    assert x.dtype == np.float32
    before = x.copy()
    seen = []

    def cb(i, x_, s, sn, den):
        assert x_.dtype == np.float32 and den.dtype == np.float32 and s >= sn  # PLMS repeats a level
        seen.append(i)

    calls = []

    def den(x_, s_):
        calls.append(s_)
        return _denoiser(x_, s_)

    out = sample(plan, den, x, rng=np.random.default_rng(4), callback=cb)
    assert len(calls) == plan.unet_calls or plan.unet_calls is None and len(calls) >= 3
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(x, before)
    # one callback per step (per attempt for DPM adaptive, whose steps are decided while it runs)
    assert seen == list(range(len(plan.sigmas) - 1 if plan.unet_calls is not None else len(seen)))
    assert plan.finish(out).dtype == np.float32


def test_callback_replaces_x():
    plan = make_plan("DPM++ 2M", 10, config=SD)
    x = np.random.default_rng(5).standard_normal((1, 4, 4, 4))
    ref = sample(plan, _denoiser, x)
    out = sample(plan, _denoiser, x, callback=lambda i, x_, s, sn, d: x_ * 0 if i == len(plan.sigmas) - 2 else None)
    assert np.abs(ref).max() > 0 and np.abs(out).max() == 0


def test_stochastic_plans_need_a_generator():
    plan = make_plan("Euler a", 10, config=SD)
    x = np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="rng"):
        sample(plan, _denoiser, x)
    a = sample(plan, _denoiser, x, rng=np.random.default_rng(7))
    b = sample(plan, _denoiser, x, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    sample(make_plan("Euler", 10, config=SD), _denoiser, x)  # deterministic: no generator needed


@pytest.mark.parametrize("name", ["DPM++ SDE Karras", "dpmpp_2m_sde", "DPMSolverSDEScheduler", "Euler a"])
def test_batch_noise_matches_single_images(name):
    plan = make_plan(name, 8, config=SD)
    x = np.random.default_rng(8).standard_normal((2, 4, 4, 4)).astype(np.float32)
    ns = batch_noise_sampler(plan, [np.random.default_rng(1), np.random.default_rng(2)], x)
    both = sample(plan, _denoiser, x, noise_sampler=ns)
    one = sample(plan, _denoiser, x[1:], noise_sampler=batch_noise_sampler(plan, [np.random.default_rng(2)], x[1:]))
    np.testing.assert_allclose(both[1:], one, rtol=1e-6)
    assert batch_noise_sampler(make_plan("Euler", 8, config=SD), [np.random.default_rng(1)], x) is None


def test_timesteps_by_family():
    a = make_plan("Euler", 13, config=SD)
    c = make_plan("euler", 13, config=SD)
    d = make_plan("DDIMScheduler", 13, config=SD)
    assert any(abs(a.timestep(s) - round(a.timestep(s))) > 1e-3 for s in a.sigmas[:-1])
    assert all(c.timestep(s) == int(c.timestep(s)) for s in c.sigmas[:-1])
    assert [d.timestep(s) for s in d.sigmas[:-1]] == list(range(12 * 76 + 1, 0, -76))  # "leading", offset 1


def test_vp_start_and_finish():
    plan = make_plan("DDIMScheduler", 10, config=SD)  # set_alpha_to_one False: ends at alpha-bar_0
    s0, sf = plan.sigmas[0], plan.sigmas[-1]
    table = training.sigmas_from_alphas_cumprod(training.alphas_cumprod(SD, "diffusers"), "diffusers")
    assert sf == pytest.approx(table[0], rel=1e-6)
    noise = np.ones(3)
    np.testing.assert_allclose(plan.start(None, noise), noise * math.sqrt(1 + s0 * s0))
    np.testing.assert_allclose(plan.finish(np.ones(3)), np.ones(3) / math.sqrt(1 + sf * sf))
    k = make_plan("EulerDiscreteScheduler", 10, config=SD)
    np.testing.assert_allclose(k.start(None, noise), noise * k.sigmas[0], rtol=1e-6)


# --------------------------------------------------------------------------- Brownian tree
def test_brownian_tree_is_a_fixed_function_of_t():
    a = BrownianTree(0.03, 14.6, (3, 5), seed=11)
    b = BrownianTree(0.03, 14.6, (3, 5), seed=11)
    ts = [14.6, 0.03, 3.1, 0.5, 7.77, 3.1000001, 1.234567]
    first = {t: a(t).copy() for t in ts}
    for t in reversed(ts):
        np.testing.assert_array_equal(b(t), first[t])
    np.testing.assert_array_equal(a(0.03), 0)
    assert not np.allclose(BrownianTree(0.03, 14.6, (3, 5), seed=12)(3.1), first[3.1])


def test_brownian_increments_are_standard_normal_and_additive():
    ns = brownian_sampler(5, 0.03, 14.6, (200_000,), np.float64)
    for a, b in [(14.6, 9.1), (2.0, 1.0), (0.2, 0.0301)]:
        z = ns(a, b)
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    a, b, c = 9.0, 4.0, 0.5
    lhs = ns(a, c) * math.sqrt(a - c)
    rhs = ns(a, b) * math.sqrt(a - b) + ns(b, c) * math.sqrt(b - c)
    np.testing.assert_allclose(lhs, rhs, atol=1e-9)
    assert abs(np.corrcoef(ns(a, b), ns(b, c))[0, 1]) < 0.01


def test_brownian_tree_with_query_points():
    """Points the run will query are tree nodes (one draw each); W stays a fixed function of t
    with standard-normal, additive increments on and off those points."""
    pts = [14.6, 9.0, 5.5, 3.3, 2.0, 1.1, 0.6, 0.2, 0.05]
    a = BrownianTree(0.03, 14.6, (100_000,), seed=3, points=pts)
    b = BrownianTree(0.03, 14.6, (100_000,), seed=3, points=pts)
    qs = [9.0, 0.6, 4.2, 5.5, 0.0301, 1.1, 4.2001]
    vals = {t: a(t).copy() for t in qs}
    for t in reversed(qs):
        np.testing.assert_array_equal(b(t), vals[t])
    for lo, hi in [(5.5, 9.0), (4.2, 5.5), (0.6, 1.1), (4.2, 4.2001), (0.2, 0.6)]:
        z = (a(hi) - a(lo)) / math.sqrt(hi - lo)
        assert abs(z.mean()) < 0.015 and abs(z.std() - 1) < 0.015, (lo, hi, z.std())
    z1 = (a(5.5) - a(4.2)) / math.sqrt(1.3)
    z2 = (a(4.2) - a(3.3)) / math.sqrt(0.9)
    assert abs(np.corrcoef(z1, z2)[0, 1]) < 0.015



@pytest.mark.parametrize("name,family,sampler", [
    ("ddim", "comfyui", "euler"),          # ComfyUI's own name wins over A1111's alias of DDIM
    ("a1111:ddim", "a1111", "ddim"),       # the prefix picks A1111's DDIM
    ("DDIM", "a1111", "ddim"),
    ("comfyui:ddim", "comfyui", "euler"),
    ("DPM fast", "a1111", "dpm_fast"), ("k_dpm_fast", "a1111", "dpm_fast"),
    ("DPM adaptive", "a1111", "dpm_adaptive"), ("k_dpm_ad", "a1111", "dpm_adaptive"),
    ("Restart", "a1111", "restart"), ("restart", "a1111", "restart"),
])
def test_shared_names_and_new_a1111_samplers(name, family, sampler):
    plan = make_plan(name, 12, 0.6, config=SD)
    assert (plan.family, plan.sampler) == (family, sampler)


@pytest.mark.parametrize("name", ["DDIM CFG++", "ddim_cfgpp"])
def test_ddim_cfgpp_is_refused_by_name(name):
    with pytest.raises(UnknownSamplerError, match="DDIM CFG\\+\\+.*not supported") as e:
        make_plan(name, 10, config=SD)
    assert "\n" not in str(e.value)


# make_plan itself refuses options outside their domain (the pipeline adds the sampler's name).
_SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
       "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False}
OUT_OF_DOMAIN = [
    ("DDIMScheduler(num_train_timesteps=1)", {}, r"num_train_timesteps must be a whole number from 2"),
    ("EulerDiscreteScheduler(beta_start=1, beta_end=0)", {}, r"beta_start must be a number between 0 and 1"),
    ("EulerDiscreteScheduler(beta_start=0.01, beta_end=0.001)", {}, r"beta_start must be below beta_end"),
    ("DDIMScheduler(steps_offset=100000)", {}, r"steps_offset must be from 0 to 199 for 5 steps"),
    ("EulerDiscreteScheduler(beta_end=1.5)", {}, r"beta_end must be a number between 0 and 1"),
    ("DDIMScheduler(steps_offset=-5000)", {}, r"steps_offset must be a whole number from 0"),
    ("EulerDiscreteScheduler(trained_betas=[0.5])", {}, r"trained_betas must be a list of at least 2"),
    ("DPMSolverSDEScheduler(noise_sampler_seed='abc')", {}, r"noise_sampler_seed must be none or a whole number"),
    ("DDIMScheduler", {"eta": math.nan}, r"eta must be a finite number >= 0, got nan"),
    ("Euler a", {"eta": -1.0}, r"eta must be a finite number >= 0"),
    ("DPM++ 2M Karras", {"sigma_max": 0}, r"sigma_max must be a finite number > 0, got 0"),
    ("DPM++ 2M Karras", {"rho": 0}, r"rho must be a finite number > 0"),
    ("DPM++ 2M Karras", {"sigma_min": 3.0, "sigma_max": 2.0}, r"sigma_max must be greater than sigma_min"),
    ("DPM++ 2M Beta", {"beta_alpha": 0}, r"beta_alpha must be a finite number > 0"),
    ("dpmpp_2m", {"beta_beta": -1.0}, r"beta_beta must be a finite number > 0"),
    ("Euler a", {"s_noise": math.inf}, r"s_noise must be a finite number, got inf"),
    ("DPM++ SDE", {"r": 0}, r"r must be a number in \(0, 1\]"),
    ("UniPC", {"uni_pc_order": 0}, r"uni_pc_order must be a whole number from 1 to 50"),
]


@pytest.mark.parametrize("name,options,message", OUT_OF_DOMAIN)
def test_make_plan_refuses_options_outside_their_domain(name, options, message):
    with pytest.raises(ValueError, match=r"^(\w+: )?" + message):
        make_plan(name, 5, 0.7, config=_SD, **options)
