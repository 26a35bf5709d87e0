"""diffusers scheduler class names against diffusers itself.

Each test builds ``Cls.from_config(sd_config, **options)`` and drives it as
StableDiffusionImg2ImgPipeline does (set_timesteps, get_timesteps with strength,
set_begin_index(t_start * order), add_noise at the first kept timestep, scale_model_input, the
test model at the scheduler's timestep, step); sdrt runs make_plan(class name) with the same
options and the pipeline-style denoiser (x / sqrt(sigma^2 + 1) at plan.timestep(sigma)).
Stochastic schedulers get the same noise: the `randn_tensor` they import is patched, and
DPMSolverSDE's BrownianTreeNoiseSampler is replaced by the same sequence. Float64 latents;
final latents agree to 1e-5 relative (diffusers' k-type schedulers step in float32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from kdiffusion_ref import SequenceNoise, model_torch, rel_err, sdrt_denoiser  # noqa: E402

from sdrt.schedulers import make_plan, sample  # noqa: E402

# Stable Diffusion 1.5's scheduler_config.json.
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (1, 4, 6, 6)
TOL = 1e-5


class _PatchedNoise:
    """Routes diffusers' randn_tensor (and DPMSolverSDE's Brownian noise) to a SequenceNoise."""

    def __init__(self, monkeypatch, module, seq):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            return seq.torch().to(dtype or torch.float64)

        if hasattr(module, "randn_tensor"):
            monkeypatch.setattr(module, "randn_tensor", randn_tensor)

        class Brownian:
            def __init__(self, *args, **kwargs):
                pass

            def __call__(self, sigma, sigma_next):
                return seq.torch()

        if hasattr(module, "BrownianTreeNoiseSampler"):
            monkeypatch.setattr(module, "BrownianTreeNoiseSampler", Brownian)


def _module(cls):
    return __import__(cls.__module__, fromlist=["x"])


def diffusers_run(cls_name, options, steps, strength, pred, x0, noise, seq, monkeypatch, eta=None):
    """StableDiffusionImg2ImgPipeline's scheduler loop (txt2img loop when x0 is None)."""
    cls = getattr(diffusers, cls_name)
    _PatchedNoise(monkeypatch, _module(cls), seq.reset())
    sch = cls.from_config({**SD15, "prediction_type": pred}, **options)
    sch.set_timesteps(steps)
    timesteps = sch.timesteps
    nt = torch.from_numpy(noise)
    if x0 is None:
        latents = nt * sch.init_noise_sigma
    else:
        init = min(int(steps * strength), steps)
        t_start = max(steps - init, 0)
        timesteps = sch.timesteps[t_start * sch.order:]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(t_start * sch.order)
        latents = sch.add_noise(torch.from_numpy(x0), nt, timesteps[:1])
    extra = {"eta": eta} if eta is not None else {}
    calls = []
    for t in timesteps:
        inp = sch.scale_model_input(latents, t)
        calls.append(float(t))
        out = model_torch(inp, t)
        latents = sch.step(out, t, latents, **extra, return_dict=False)[0]
    return latents.numpy(), calls


def sdrt_run(name, options, steps, strength, pred, x0, noise, seq, eta=None):
    kw = dict(options)
    if eta is not None:
        kw["eta"] = eta
    plan = make_plan(name, steps, strength, config={**SD15, "prediction_type": pred}, **kw)
    x = plan.start(x0, noise)
    den = sdrt_denoiser(plan, pred)
    out = sample(plan, den, x, noise_sampler=seq.reset().numpy)
    return plan, plan.finish(out), den


def inputs(seed):
    rng = np.random.default_rng(500 + seed)
    return rng.standard_normal(SHAPE) * 0.8, rng.standard_normal(SHAPE)


VARIANTS = {
    "EulerDiscreteScheduler": [{}, {"use_karras_sigmas": True}, {"timestep_spacing": "trailing"},
                               {"timestep_spacing": "leading"}, {"use_exponential_sigmas": True},
                               {"use_beta_sigmas": True}, {"final_sigmas_type": "sigma_min"},
                               {"interpolation_type": "log_linear"},
                               {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}],
    "EulerAncestralDiscreteScheduler": [{}, {"timestep_spacing": "trailing"}],
    "HeunDiscreteScheduler": [{}, {"use_karras_sigmas": True}, {"timestep_spacing": "leading"}],
    "KDPM2DiscreteScheduler": [{}, {"use_karras_sigmas": True}],
    "KDPM2AncestralDiscreteScheduler": [{}, {"use_karras_sigmas": True}],
    "LMSDiscreteScheduler": [{}, {"use_karras_sigmas": True}],
    "DPMSolverMultistepScheduler": [{}, {"use_karras_sigmas": True}, {"algorithm_type": "sde-dpmsolver++"},
                                    {"solver_order": 3}, {"solver_type": "heun"}, {"final_sigmas_type": "sigma_min"},
                                    {"timestep_spacing": "trailing"}, {"use_lu_lambdas": True},
                                    {"euler_at_final": True}, {"solver_order": 1}, {"lower_order_final": False},
                                    {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                                    {"use_exponential_sigmas": True}],
    "DPMSolverSDEScheduler": [{}, {"use_karras_sigmas": True}],
    "DDIMScheduler": [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"},
                      {"set_alpha_to_one": True}, {"clip_sample": True},
                      {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}],
    "PNDMScheduler": [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}],
    "UniPCMultistepScheduler": [{}, {"use_karras_sigmas": True},
                                {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                                {"solver_order": 3},
                                {"final_sigmas_type": "sigma_min"}, {"disable_corrector": [1, 2]},
                                {"timestep_spacing": "trailing"}],
    "LCMScheduler": [{}, {"rescale_betas_zero_snr": True}],
}
CASES = [(10, 1.0), (13, 0.6), (22, 0.35)]
PARAMS = [(cls, i) for cls, variants in VARIANTS.items() for i in range(len(variants))]


def _id(p):
    cls, i = p
    opts = VARIANTS[cls][i]
    return cls.replace("Scheduler", "") + ("" if not opts else "-" + "-".join(f"{k}={v}" for k, v in opts.items()))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,strength", CASES)
@pytest.mark.parametrize("variant", PARAMS, ids=[_id(p) for p in PARAMS])
def test_diffusers_img2img(variant, steps, strength, pred, monkeypatch):
    cls, i = variant
    options = VARIANTS[cls][i]
    if options.get("rescale_betas_zero_snr") and cls in ("DDIMScheduler", "LCMScheduler") and pred == "epsilon" \
            and strength == 1.0:
        pytest.skip("zero terminal SNR: an eps model cannot denoise from pure noise (diffusers divides by 0)")
    if cls == "LCMScheduler":
        steps = {10: 4, 13: 6, 22: 8}[steps]
    x0, noise = inputs(i)
    seq = SequenceNoise(SHAPE, seed=21)
    ref, ref_calls = diffusers_run(cls, options, steps, strength, pred, x0, noise, seq, monkeypatch)
    plan, out, den = sdrt_run(cls, options, steps, strength, pred, x0, noise, seq)
    assert np.isfinite(ref).all()
    assert rel_err(out, ref) <= TOL
    assert [t for _, t in den.calls] == pytest.approx(ref_calls, abs=2e-4), "the UNet must see diffusers' timesteps"
    assert plan.unet_calls == len(ref_calls)


@pytest.mark.parametrize("cls", list(VARIANTS))
def test_diffusers_txt2img(cls, monkeypatch):
    _, noise = inputs(40)
    seq = SequenceNoise(SHAPE, seed=22)
    steps = 6 if cls == "LCMScheduler" else 12
    ref, _ = diffusers_run(cls, {}, steps, 1.0, "epsilon", None, noise, seq, monkeypatch)
    _, out, _ = sdrt_run(cls, {}, steps, 1.0, "epsilon", None, noise, seq)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("steps,strength", [(12, 1.0), (15, 0.6)])
def test_diffusers_ddim_eta(eta, steps, strength, monkeypatch):
    x0, noise = inputs(50)
    seq = SequenceNoise(SHAPE, seed=23)
    ref, _ = diffusers_run("DDIMScheduler", {}, steps, strength, "epsilon", x0, noise, seq, monkeypatch, eta=eta)
    _, out, _ = sdrt_run("DDIMScheduler", {}, steps, strength, "epsilon", x0, noise, seq, eta=eta)
    assert rel_err(out, ref) <= TOL


def test_options_in_name_equal_keyword_options():
    cfg = {**SD15}
    a = make_plan("DPMSolverMultistepScheduler(use_karras_sigmas=True, algorithm_type=sde-dpmsolver++)", 12, 0.7,
                  config=cfg)
    b = make_plan("DPMSolverMultistepScheduler", 12, 0.7, config=cfg, use_karras_sigmas=True,
                  algorithm_type="sde-dpmsolver++")
    np.testing.assert_array_equal(a.sigmas, b.sigmas)
    assert a.options["eta"] == b.options["eta"] == 1.0
    c = make_plan("DPMSolverMultistepScheduler", 12, 0.7, "Karras", config=cfg)
    np.testing.assert_array_equal(a.sigmas, c.sigmas)
    assert c.schedule_label == "Karras"


def test_unknown_diffusers_option():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        make_plan("EulerDiscreteScheduler(use_karas_sigmas=True)", 10, config=SD15)


def test_unipc_bh1_to_zero_is_finite():
    """diffusers' UniPC with solver_type="bh1" and a final sigma of 0 multiplies -inf by 0 on its
    last step and returns NaN; sdrt returns the denoised latent there, as every other solver."""
    x0, noise = inputs(60)
    plan, out, den = sdrt_run("UniPCMultistepScheduler", {"solver_type": "bh1"}, 10, 0.7, "epsilon", x0, noise,
                              SequenceNoise(SHAPE))
    assert np.isfinite(out).all()



INPAINT = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
           "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
           "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "DDIMScheduler", "PNDMScheduler",
           "UniPCMultistepScheduler", "LCMScheduler"]


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cls", INPAINT)
def test_diffusers_inpaint_blending(cls, pred, monkeypatch):
    """StableDiffusionInpaintPipeline with a 4-channel UNet blends the latents with the init
    noised to the next level after every scheduler step, half steps of the interleaved
    second-order schedulers included: sdrt's callback and substep_callback reproduce it."""
    x0, noise = inputs(70)
    mask = (np.arange(SHAPE[-1]) < 3).astype(np.float64) * np.ones(SHAPE)  # 1 = repaint
    steps, strength = (6, 0.8) if cls == "LCMScheduler" else (12, 0.7)
    seq = SequenceNoise(SHAPE, seed=24)

    sch = getattr(diffusers, cls).from_config({**SD15, "prediction_type": pred})
    _PatchedNoise(monkeypatch, _module(type(sch)), seq.reset())
    sch.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = sch.timesteps[t_start * sch.order:]
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(t_start * sch.order)
    init, nt, m = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(mask)
    latents = sch.add_noise(init, nt, timesteps[:1])
    for i, t in enumerate(timesteps):
        out = model_torch(sch.scale_model_input(latents, t), t)
        latents = sch.step(out, t, latents, return_dict=False)[0]
        proper = sch.add_noise(init, nt, timesteps[i + 1:i + 2]) if i < len(timesteps) - 1 else init
        latents = (1 - m) * proper + m * latents
    ref = latents.numpy()

    plan = make_plan(cls, steps, strength, config={**SD15, "prediction_type": pred})
    last = len(plan.sigmas) - 2
    clean = x0 / float(plan.finish(np.ones(1))[0])

    def blend(final):
        def cb(i, x, sigma, sigma_next, denoised):
            target = clean if final and i == last else x0 + noise * sigma_next
            return x * mask + target * (1 - mask)

        return cb

    x = plan.start(x0, noise)
    out = sample(plan, sdrt_denoiser(plan, pred), x, noise_sampler=seq.reset().numpy, callback=blend(True),
                 substep_callback=blend(False))
    assert rel_err(plan.finish(out), ref) <= TOL


# ------------------------------------------------------------- every accepted option, generated
# Values to try for each option a diffusers class accepts (keys of sdrt's DEFAULTS, i.e. what
# from_config takes). A class option without an entry here fails test_every_option_has_values:
# a new option cannot go untested.
OPTION_VALUES = {
    "num_train_timesteps": [500],
    "beta_start": [0.0001],
    "beta_end": [0.02],
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
    "trained_betas": [np.linspace(0.0002, 0.015, 1000).tolist()],
    "prediction_type": ["v_prediction", "sample"],
    "timestep_spacing": ["linspace", "leading", "trailing"],
    "steps_offset": [0, 3],
    "use_karras_sigmas": [True],
    "use_exponential_sigmas": [True],
    "use_beta_sigmas": [True],
    "interpolation_type": ["log_linear"],
    "sigma_min": [0.1],
    "sigma_max": [10.0],
    "timestep_type": ["continuous"],
    "rescale_betas_zero_snr": [True],
    "final_sigmas_type": ["sigma_min", "zero"],
    "clip_sample": [True],
    "clip_sample_range": [0.5],
    "thresholding": [True],
    "dynamic_thresholding_ratio": [0.9],
    "sample_max_value": [2.0],
    "solver_order": [1, 3],
    "algorithm_type": ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"],
    "solver_type": ["midpoint", "heun", "bh1", "bh2"],
    "lower_order_final": [False],
    "euler_at_final": [True],
    "use_lu_lambdas": [True],
    "use_flow_sigmas": [True],
    "flow_shift": [2.0],
    "lambda_min_clipped": [-5.1],
    "variance_type": ["learned"],
    "use_dynamic_shifting": [True],
    "time_shift_type": ["linear"],
    "noise_sampler_seed": [7],
    "set_alpha_to_one": [True],
    "skip_prk_steps": [False],
    "predict_x0": [False],
    "disable_corrector": [[1, 2]],
    "solver_p": ["UniPCMultistepScheduler"],
    "shift_terminal": [0.5],
    "original_inference_steps": [30],
    "timestep_scaling": [5.0],
}

# (class, option, value) where diffusers' result is not finite (NaN or inf on its step to
# sigma 0) and sdrt returns the denoised latent there, as on every other step to 0.
NOT_FINITE_IN_DIFFUSERS = {
    ("UniPCMultistepScheduler", "solver_type", "bh1"),  # -inf * 0 in its bh1 coefficient
    ("UniPCMultistepScheduler", "lower_order_final", False),  # a 2nd-order step to lambda = inf
}


def _option_cases():
    from sdrt.schedulers.diffusers_compat import DEFAULTS

    out = []
    for cls, defaults in DEFAULTS.items():
        for key in defaults:
            for value in OPTION_VALUES.get(key, []):
                # img2img at full strength and at 0.6, alternately (the variants above cover both)
                out.append((cls, key, value, *((10, 1.0) if len(out) % 2 == 0 else (13, 0.6))))
    return out


OPTION_CASES = _option_cases()


def test_every_option_has_values():
    from sdrt.schedulers.diffusers_compat import DEFAULTS

    missing = sorted({k for d in DEFAULTS.values() for k in d} - set(OPTION_VALUES))
    assert not missing, f"options accepted but not tested against diffusers: {missing}"


def _diffusers_accepts(cls_name, options):
    cls = getattr(diffusers, cls_name)
    try:
        sch = cls.from_config(SD15, **options)
        sch.set_timesteps(10)
    except (ValueError, NotImplementedError, TypeError, AttributeError):
        return False
    return True


@pytest.mark.parametrize("cls,key,value,steps,strength", OPTION_CASES,
                         ids=[f"{c.replace('Scheduler', '')}-{k}={v if not isinstance(v, list) else 'list'}-{st}"
                              for c, k, v, _, st in OPTION_CASES])
def test_every_option_matches_diffusers_or_is_refused(cls, key, value, steps, strength, monkeypatch):
    """Each accepted option of each accepted class: sdrt reproduces diffusers' img2img run with it,
    or refuses it with an error naming it."""
    options = {key: value}
    if key == "rescale_betas_zero_snr":
        options["timestep_spacing"] = "trailing"
        if cls in ("DDIMScheduler", "LCMScheduler") and strength == 1.0:
            pytest.skip("zero terminal SNR: an eps model cannot denoise from pure noise (diffusers divides by 0)")
    if cls == "LCMScheduler":
        steps = {10: 4, 13: 6}[steps]
    try:
        make_plan(cls, steps, strength, config=SD15, **options)
    except ValueError as e:
        assert key in str(e), f"the refusal names the option: {e}"
        return
    if not _diffusers_accepts(cls, options):
        pytest.fail(f"sdrt accepts {cls}({key}={value!r}), which diffusers refuses")
    x0, noise = inputs(3)
    seq = SequenceNoise(SHAPE, seed=31)
    pred = options.pop("prediction_type", "epsilon")
    ref, ref_calls = diffusers_run(cls, options, steps, strength, pred, x0, noise, seq, monkeypatch)
    plan, out, den = sdrt_run(cls, options, steps, strength, pred, x0, noise, seq)
    assert np.isfinite(out).all()
    if not isinstance(value, list) and (cls, key, value) in NOT_FINITE_IN_DIFFUSERS:
        assert not np.isfinite(ref).all()
        return
    assert rel_err(out, ref) <= TOL
    assert [t for _, t in den.calls] == pytest.approx(ref_calls, abs=2e-4)


@pytest.mark.parametrize("variant", PARAMS, ids=[_id(p) for p in PARAMS])
def test_diffusers_one_step(variant, monkeypatch):
    """steps=1 (the one step diffusers' img2img keeps at strength 1, and txt2img)."""
    cls, i = variant
    pred = "v_prediction" if i % 2 else "epsilon"
    options = VARIANTS[cls][i]
    if options.get("rescale_betas_zero_snr") and cls in ("DDIMScheduler", "LCMScheduler") and pred == "epsilon":
        pytest.skip("zero terminal SNR: an eps model cannot denoise from pure noise (diffusers divides by 0)")
    x0, noise = inputs(60 + i)
    seq = SequenceNoise(SHAPE, seed=23)
    for start in (x0, None):
        ref, ref_calls = diffusers_run(cls, options, 1, 1.0, pred, start, noise, seq, monkeypatch)
        plan, out, den = sdrt_run(cls, options, 1, 1.0, pred, start, noise, seq)
        assert np.isfinite(out).all()
        assert rel_err(out, ref) <= TOL
        assert plan.unet_calls == len(ref_calls)


@pytest.mark.parametrize("options", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                     {"use_beta_sigmas": True}])
def test_dpmsolver_sde_one_step_with_its_own_noise(options):
    """DPMSolverSDEScheduler at one step: its Brownian tree spans a single noise level (torchsde
    accepts t0 == t1); each side draws from its own tree and the result is diffusers'."""
    x0, noise = inputs(70)
    sch = diffusers.DPMSolverSDEScheduler.from_config({**SD15, "noise_sampler_seed": 3}, **options)
    sch.set_timesteps(1)
    latents = torch.from_numpy(noise) * sch.init_noise_sigma
    for t in sch.timesteps:
        latents = sch.step(model_torch(sch.scale_model_input(latents, t), t), t, latents, return_dict=False)[0]
    plan = make_plan("DPMSolverSDEScheduler", 1, config={**SD15, "noise_sampler_seed": 3}, **options)
    assert plan.noise == "brownian"
    out = plan.finish(sample(plan, sdrt_denoiser(plan, "epsilon"), plan.start(None, noise),
                             rng=np.random.default_rng(0)))
    assert rel_err(out, latents.numpy()) <= TOL
