"""AUTOMATIC1111 and ComfyUI names against k-diffusion.

Each test runs sdrt's plan + sampler and, as the reference, k-diffusion's sampler function on its
DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser wrapping the same test model (fractional
log-sigma timesteps for A1111, quantize=True i.e. ComfyUI's argmin timestep), with the sigmas of
k-diffusion's get_sigmas / get_sigmas_karras / get_sigmas_exponential (or the tool's own schedule
function re-derived from its code) and the same injected noise. Where the tool adds its own code
path (A1111's discarded penultimate sigma and t_enc + 1 img2img steps, ComfyUI's denoise tail
and noise scaling, A1111's timestep samplers DDIM/PLMS/UniPC, LCM's distilled denoiser), the
reference reproduces that path; each such place says so. Float64 throughout; final latents
must agree to 1e-5 relative.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_stats = pytest.importorskip("scipy.stats")

from kdiffusion_ref import SequenceNoise, TorchInner, load_kdiffusion, model_torch, rel_err, sdrt_denoiser  # noqa: E402

from sdrt.schedulers import make_plan, sample  # noqa: E402

try:
    sampling, external = load_kdiffusion()
except ImportError as e:  # pragma: no cover - the test environment installs it
    pytest.skip(f"k-diffusion is not available: {e}", allow_module_level=True)

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
SHAPE = (1, 4, 6, 6)
TOL = 1e-5


@contextlib.contextmanager
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def ref_alphas_cumprod():
    """ldm's schedule: torch float64 linspace of sqrt(beta), squared."""
    betas = torch.linspace(SD_CONFIG["beta_start"] ** 0.5, SD_CONFIG["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def a1111_alphas_cumprod():
    """What A1111's samplers see: ldm registers alphas_cumprod as a float32 buffer, and
    k-diffusion's wrappers compute the sigma table from it in float32."""
    return ref_alphas_cumprod().float()


def wrapper(pred, quantize, ac=None):
    ac = ref_alphas_cumprod() if ac is None else ac
    cls = external.DiscreteVDDPMDenoiser if pred == "v_prediction" else external.DiscreteEpsDDPMDenoiser
    return cls(TorchInner(), ac, quantize=quantize)


def inputs(seed=0):
    rng = np.random.default_rng(100 + seed)
    return rng.standard_normal(SHAPE) * 0.8, rng.standard_normal(SHAPE)


def run_sdrt(name, steps, strength, schedule=None, pred="epsilon", rule=None, x0=None, noise=None, seq=None, **opts):
    plan = make_plan(name, steps, strength, schedule, config={**SD_CONFIG, "prediction_type": pred}, rule=rule, **opts)
    x = plan.start(x0, noise)
    den = sdrt_denoiser(plan, pred)
    out = sample(plan, den, x, noise_sampler=seq.reset().numpy if seq is not None else None)
    return plan, plan.finish(out), den


# ------------------------------------------------------------------ A1111 schedules, re-derived
def a1111_sigmas(kind, n, mw):
    smin, smax = mw.sigmas[0].item(), mw.sigmas[-1].item()
    if kind == "uniform":
        return mw.get_sigmas(n)
    if kind == "karras":
        return sampling.get_sigmas_karras(n, smin, smax)
    if kind == "exponential":
        return sampling.get_sigmas_exponential(n, smin, smax)
    if kind == "polyexponential":
        return sampling.get_sigmas_polyexponential(n, smin, smax, rho=1.0)
    if kind in ("normal", "sgm_uniform"):
        start, end = mw.sigma_to_t(torch.tensor(smax)), mw.sigma_to_t(torch.tensor(smin))
        ts = torch.linspace(start, end, n + 1)[:-1] if kind == "sgm_uniform" else torch.linspace(start, end, n)
        return torch.tensor([mw.t_to_sigma(t).item() for t in ts] + [0.0])
    if kind == "simple":
        ss = len(mw.sigmas) / n
        return torch.tensor([mw.sigmas[-(1 + int(x * ss))].item() for x in range(n)] + [0.0])
    if kind == "ddim":
        ss, x, out = max(len(mw.sigmas) // n, 1), 1, []
        while x < len(mw.sigmas):
            out.append(mw.sigmas[x].item())
            x += ss
        return torch.tensor(out[::-1] + [0.0])
    if kind == "beta":
        q = [scipy_stats.beta.ppf(t, 0.6, 0.6) for t in 1 - np.linspace(0, 1, n)]
        return torch.tensor([smin + v * (smax - smin) for v in q] + [0.0])
    if kind == "kl_optimal":
        i = torch.arange(n + 1)
        return torch.tan(i / n * math.atan(smin) + (1.0 - i / n) * math.atan(smax))
    if kind == "align_your_steps":
        pts = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n == len(pts):
            return torch.tensor(pts + [0.0])
        xs, ys = np.linspace(0, 1, len(pts)), np.log(pts[::-1])
        return torch.tensor(list(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]) + [0.0])
    raise KeyError(kind)


# name -> (k-diffusion function, "Automatic" schedule, discard penultimate, extra kwargs, noise)
A1111 = {
    "Euler": ("sample_euler", "uniform", False, {}, False),
    "Euler a": ("sample_euler_ancestral", "uniform", False, {"eta": 1.0}, True),
    "Heun": ("sample_heun", "uniform", False, {}, False),
    "LMS": ("sample_lms", "uniform", False, {}, False),
    "DPM2": ("sample_dpm_2", "karras", True, {}, False),
    "DPM2 a": ("sample_dpm_2_ancestral", "karras", True, {"eta": 1.0}, True),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "karras", False, {"eta": 1.0}, True),
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", False, {}, False),
    "DPM++ SDE": ("sample_dpmpp_sde", "karras", False, {"eta": 1.0}, True),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", False, {"eta": 1.0}, True),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "exponential", False, {"eta": 1.0, "solver_type": "heun"}, True),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "exponential", True, {"eta": 1.0}, True),
}


def a1111_reference(name, steps, strength, schedule, pred, x0, noise, seq, fix_steps=False):
    """A1111's KDiffusionSampler.sample_img2img: setup_img2img_steps, get_sigmas (with the
    sampler's "Automatic" schedule and discard_next_to_last_sigma), sigma_sched, xi."""
    func, auto, discard, kw, noisy = A1111[name]
    mw = wrapper(pred, quantize=False, ac=a1111_alphas_cumprod())
    if fix_steps:
        total, t_enc = int(steps / min(strength, 0.999)), steps - 1
    else:
        total, t_enc = steps, int(min(strength, 0.999) * steps)
    with f64():
        sig = a1111_sigmas(schedule or auto, total + (1 if discard else 0), mw)
        if discard:
            sig = torch.cat([sig[:-2], sig[-1:]])
        sched = sig[total - t_enc - 1:].to(torch.float64)
        x = torch.from_numpy(x0) + torch.from_numpy(noise) * sched[0]
        if noisy and seq is not None:  # else k-diffusion draws its own noise
            kw = {**kw, "noise_sampler": seq.reset().torch}
        out = getattr(sampling, func)(mw, x, sched, disable=True, **kw)
    return out.numpy(), sched.numpy()


CASES = [(12, 1.0), (15, 0.55), (9, 0.3), (10, 0.0)]  # strength 0: A1111 still runs t_enc + 1 = 1 step


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,strength", CASES)
@pytest.mark.parametrize("name", list(A1111))
def test_a1111_samplers(name, steps, strength, pred):
    if strength == 0 and name in ("DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"):
        pytest.skip("k-diffusion fails on these (test_a1111_strength_zero_single_step_to_zero)")
    x0, noise = inputs()
    seq = SequenceNoise(SHAPE, seed=7)
    ref, ref_sig = a1111_reference(name, steps, strength, None, pred, x0, noise, seq)
    plan, out, den = run_sdrt(name, steps, strength, pred=pred, x0=x0, noise=noise, seq=seq)
    np.testing.assert_allclose(plan.sigmas, ref_sig, rtol=1e-6, atol=1e-12)
    assert rel_err(out, ref) <= TOL
    assert plan.unet_calls == len(den.calls)


def a1111_no_schedule_reference(func, steps, strength, pred, x0, noise, seq, **kw):
    """A1111's DPM fast / DPM adaptive call: these take sigma_min, sigma_max (and n) instead of
    a schedule: in txt2img the model's range and the steps, in img2img the kept tail of the
    "Automatic" (uniform) schedule: sigma_max = its first sigma, sigma_min = its last nonzero one,
    n = its length. eta is A1111's eta_ancestral, 1."""
    mw = wrapper(pred, quantize=False, ac=a1111_alphas_cumprod())
    with f64():
        sig = mw.get_sigmas(steps).to(torch.float64)
        if x0 is None:
            x = torch.from_numpy(noise) * sig[0]
            lo, hi, n = mw.sigmas[0].item(), mw.sigmas[-1].item(), steps
        else:
            t_enc = int(min(strength, 0.999) * steps)
            sched = sig[steps - t_enc - 1:]
            x = torch.from_numpy(x0) + torch.from_numpy(noise) * sched[0]
            lo, hi, n = sched[-2].item(), sched[0].item(), len(sched) - 1
        if func == "sample_dpm_fast":
            kw["n"] = n
        calls = []

        def model(x_, s_, **k):
            calls.append(float(s_[0]))
            return mw(x_, s_, **k)

        out = getattr(sampling, func)(model, x, lo, hi, disable=True, eta=1.0, noise_sampler=seq.reset().torch, **kw)
    return out.numpy(), calls


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,strength", [(12, 1.0), (15, 0.55), (9, 0.3)])
@pytest.mark.parametrize("name,func", [("DPM fast", "sample_dpm_fast"), ("DPM adaptive", "sample_dpm_adaptive")])
def test_a1111_dpm_fast_and_adaptive(name, func, steps, strength, pred):
    x0, noise = inputs(14)
    x0 = None if strength == 1.0 else x0
    seq = SequenceNoise(SHAPE, seed=17)
    ref, ref_calls = a1111_no_schedule_reference(func, steps, strength, pred, x0, noise, seq)
    plan, out, den = run_sdrt(name, steps, strength, pred=pred, x0=x0, noise=noise, seq=seq)
    assert rel_err(out, ref) <= TOL
    # the same evaluations (the adaptive controller's accepts and rejects included), at levels
    # equal but for k-diffusion's float32 schedule arithmetic (t_to_sigma works in float32)
    assert [s for s, _ in den.calls] == pytest.approx(ref_calls, rel=TOL)
    if name == "DPM fast":
        assert plan.unet_calls == len(ref_calls) == (steps if x0 is None else int(strength * steps) + 1)


def restart_reference(steps, strength, pred, x0, noise, seq):
    """A1111's Restart sampler (Xu et al. 2023, "Restart Sampling for Improving Generative
    Processes"), re-derived: its "Automatic" schedule is Karras; with 20 or more steps the
    schedule is remade as Karras over steps - k * K steps (k = 9 restart steps once, steps // 4
    twice from 36 steps) and a Karras segment of k + 1 levels from the schedule's sigma nearest
    2 down to its sigma nearest 0.1 is run K times after reaching 0.1, each time after adding
    noise back up to the segment's top; every step is Heun (Euler to 0)."""
    mw = wrapper(pred, quantize=False, ac=a1111_alphas_cumprod())
    with f64():
        smin, smax = mw.sigmas[0].item(), mw.sigmas[-1].item()
        sig = sampling.get_sigmas_karras(steps, smin, smax).to(torch.float64)
        if x0 is None:
            x = torch.from_numpy(noise) * sig[0]
        else:
            t_enc = int(min(strength, 0.999) * steps)
            sig = sig[steps - t_enc - 1:]
            x = torch.from_numpy(x0) + torch.from_numpy(noise) * sig[0]
        n = len(sig) - 1
        segments = {}
        if n >= 20:
            k, times = (n // 4, 2) if n >= 36 else (9, 1)
            sig = sampling.get_sigmas_karras(n - k * times, sig[-2].item(), sig[0].item()).to(torch.float64)
            at, top = int(torch.argmin((sig - 0.1).abs())), int(torch.argmin((sig - 2.0).abs()))
            if top < at:
                seg = sampling.get_sigmas_karras(k + 1, sig[at].item(), sig[top].item()).to(torch.float64)[:-1]
                segments[at] = [(seg[j], seg[j + 1]) for j in range(len(seg) - 1)] * times
        steps_list = []
        for i in range(len(sig) - 1):
            steps_list.append((sig[i], sig[i + 1]))
            steps_list += segments.get(i + 1, [])
        seq.reset()
        level = steps_list[0][0]
        for s, sn in steps_list:
            if s > level:
                x = x + seq.torch() * (s**2 - level**2) ** 0.5
            d = sampling.to_d(x, s, mw(x, s.reshape(1)))
            if sn == 0:
                x = x + d * (sn - s)
            else:
                x2 = x + d * (sn - s)
                x = x + (d + sampling.to_d(x2, sn, mw(x2, sn.reshape(1)))) / 2 * (sn - s)
            level = sn
    return x.numpy(), len(steps_list)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,strength", [(12, 1.0), (24, 1.0), (40, 1.0), (40, 0.6), (30, 0.5)])
def test_a1111_restart(steps, strength, pred):
    x0, noise = inputs(15)
    x0 = None if strength == 1.0 else x0
    seq = SequenceNoise(SHAPE, seed=18)
    ref, n_steps = restart_reference(steps, strength, pred, x0, noise, seq)
    plan, out, den = run_sdrt("Restart", steps, strength, pred=pred, x0=x0, noise=noise, seq=seq)
    assert len(plan.options["pairs"]) == n_steps
    assert rel_err(out, ref) <= TOL
    assert plan.unet_calls == len(den.calls)


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_a1111_strength_zero_single_step_to_zero(name):
    """At strength 0 A1111 runs one step, from the last nonzero sigma to 0. k-diffusion's
    2M/3M SDE samplers fail on a run whose first step ends at 0 (UnboundLocalError: `h`), so
    A1111 fails there; sdrt returns the step's denoised latent, which is what those samplers
    return on every step to 0."""
    x0, noise = inputs(12)
    with pytest.raises(UnboundLocalError):
        a1111_reference(name, 10, 0.0, None, "epsilon", x0, noise, SequenceNoise(SHAPE))
    plan, out, den = run_sdrt(name, 10, 0.0, x0=x0, noise=noise, seq=SequenceNoise(SHAPE))
    assert plan.unet_calls == 1 and plan.sigmas[-1] == 0
    mw = wrapper("epsilon", False, a1111_alphas_cumprod())
    with f64():
        s = torch.tensor([plan.sigmas[0]])
        want = mw(torch.from_numpy(x0) + torch.from_numpy(noise) * s, s).numpy()
    assert rel_err(out, want) <= TOL


SCHEDULES = ["uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal", "align_your_steps",
             "simple", "normal", "ddim", "beta"]
LABELS = {"uniform": "Uniform", "karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential",
          "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal", "align_your_steps": "Align Your Steps",
          "simple": "Simple", "normal": "Normal", "ddim": "DDIM", "beta": "Beta"}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", ["DPM++ 2M", "Euler a", "DPM2"])
def test_a1111_schedule_types(name, schedule):
    x0, noise = inputs(1)
    seq = SequenceNoise(SHAPE, seed=3)
    steps, strength = (11, 0.7) if schedule != "align_your_steps" else (10, 0.75)
    ref, ref_sig = a1111_reference(name, steps, strength, schedule, "epsilon", x0, noise, seq)
    plan, out, _ = run_sdrt(name, steps, strength, LABELS[schedule], x0=x0, noise=noise, seq=seq)
    assert plan.schedule_label == LABELS[schedule]
    np.testing.assert_allclose(plan.sigmas, ref_sig, rtol=1e-6, atol=1e-12)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("name", ["Euler", "DPM++ SDE", "DPM2 a"])
def test_a1111_fix_steps_rule(name):
    """A1111's "img2img_fix_steps": steps / strength in all, the requested number run."""
    x0, noise = inputs(2)
    seq = SequenceNoise(SHAPE, seed=4)
    ref, ref_sig = a1111_reference(name, 10, 0.4, None, "epsilon", x0, noise, seq, fix_steps=True)
    plan, out, _ = run_sdrt(name, 10, 0.4, rule="a1111_fix_steps", x0=x0, noise=noise, seq=seq)
    assert len(plan.sigmas) == 11
    assert rel_err(out, ref) <= TOL


def test_a1111_txt2img_start():
    """A1111 txt2img: x = noise * sigmas[0], the whole schedule."""
    _, noise = inputs(3)
    mw = wrapper("epsilon", False, a1111_alphas_cumprod())
    with f64():
        sig = sampling.get_sigmas_karras(10, mw.sigmas[0].item(), mw.sigmas[-1].item())
        ref = sampling.sample_dpmpp_2m(mw, torch.from_numpy(noise) * sig[0], sig, disable=True).numpy()
    plan, out, _ = run_sdrt("DPM++ 2M Karras", 10, 1.0, noise=noise)
    assert rel_err(out, ref) <= TOL


def test_a1111_unet_sees_fractional_timesteps():
    plan = make_plan("Euler", 12, 1.0, config=SD_CONFIG)
    ts = [plan.timestep(s) for s in plan.sigmas[:-1]]
    assert ts[0] == pytest.approx(999.0) and abs(ts[3] - round(ts[3])) > 1e-3
    mw = wrapper("epsilon", False, a1111_alphas_cumprod())
    for s, t in zip(plan.sigmas[:-1], ts):
        # k-diffusion's float32 tables give t in float32: equal within its spacing near 1000 (2**-14)
        assert t == pytest.approx(mw.sigma_to_t(torch.tensor(s)).item(), abs=2**-14)


# ------------------------------------------------------------------ A1111 LCM (own denoiser)
def lcm_table(ac):
    """A1111's LCMCompVisDenoiser / ComfyUI's distilled model sampling: 50 alpha-bars, every 20th
    from t = 999 down; timestep = argmin * 20 + 19."""
    idx = torch.tensor([999 - 20 * x for x in range(50)][::-1])
    return ac[idx]


def lcm_reference(steps, strength, schedule, pred, x0, noise, seq, keep=None, ac=None):
    """A1111's LCM sampler path (its LCM denoiser and sample_lcm), re-derived from the code:
    c_out(t) * x0 + c_skip(t) * x with t the argmin timestep, then x = denoised (+ sigma_next *
    noise). A1111 takes the table from its float32 alphas_cumprod."""
    ac50 = lcm_table(a1111_alphas_cumprod() if ac is None else ac)
    mw = wrapper(pred, quantize=True, ac=ac50)

    def t_of(sig):
        return mw.sigma_to_t(sig, quantize=True) * 20 + 19

    def denoise(x, sig):
        c_in = 1.0 / (sig**2 + 1) ** 0.5
        out = model_torch(x * c_in, t_of(sig))
        if pred == "v_prediction":
            d0 = x / (sig**2 + 1) - out * sig / (sig**2 + 1) ** 0.5
        else:
            d0 = x - out * sig
        ts = t_of(sig) * 10.0
        return ts / (ts**2 + 0.25) ** 0.5 * d0 + 0.25 / (ts**2 + 0.25) * x

    with f64():
        if schedule == "karras":
            sig = sampling.get_sigmas_karras(steps, mw.sigmas[0].item(), mw.sigmas[-1].item())
        else:
            t = torch.linspace(49, 0, steps)  # linspace(999, 19) in timesteps
            sig = sampling.append_zero(mw.t_to_sigma(t))
        t_enc = int(min(strength, 0.999) * steps)
        sched = sig[steps - t_enc - 1:] if keep is None else sig[-(keep + 1):]
        sched = sched.to(torch.float64)
        x = torch.from_numpy(x0) + torch.from_numpy(noise) * sched[0]
        seq.reset()
        for i in range(len(sched) - 1):
            x = denoise(x, sched[i])
            if sched[i + 1] > 0:
                x = x + sched[i + 1] * seq.torch()
    return x.numpy(), sched.numpy()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,strength,schedule", [(6, 1.0, None), (8, 0.5, None), (6, 0.7, "karras")])
def test_a1111_lcm(steps, strength, schedule, pred):
    x0, noise = inputs(4)
    seq = SequenceNoise(SHAPE, seed=9)
    ref, ref_sig = lcm_reference(steps, strength, schedule, pred, x0, noise, seq)
    plan, out, den = run_sdrt("LCM", steps, strength, "Karras" if schedule else None, pred=pred, x0=x0, noise=noise,
                              seq=seq)
    np.testing.assert_allclose(plan.sigmas, ref_sig, rtol=1e-6, atol=1e-12)
    assert all(t == int(t) and (int(t) - 19) % 20 == 0 for _, t in den.calls)
    assert rel_err(out, ref) <= TOL


# ----------------------------------------------------- A1111 timestep samplers (DDIM, PLMS, UniPC)
def a1111_grid(n):
    return [min(max(t + 1, 0), 999) for t in range(0, 1000, 1000 // n)]


def vp_eps(out, z, a, pred):
    return a.sqrt() * out + (1 - a).sqrt() * z if pred == "v_prediction" else out


def a1111_timestep_reference(kind, steps, strength, pred, x0, noise, seq, eta=0.0, nmask=None):
    """A1111's timestep samplers (sd_samplers_timesteps*), in VP space on its grid
    1, 1 + 1000 // steps, ...: img2img noises at grid[t_enc] and samples grid[:t_enc], the loop
    stops one entry short (final alpha-bar at grid[0]); DDIM and PLMS are written out from their
    formulas, UniPC is diffusers' UniPCMultistepScheduler (order 3, bh1) on A1111's time-uniform
    continuous grid. With `nmask` (1 = repaint), inpainting as A1111's CFGDenoiserTimesteps does
    it (mask_before_denoising): every model input is z * nmask + x0 * (1 - nmask), the sampler
    steps its own z with the model's eps, and the result gets the same blend at the end."""
    ac = a1111_alphas_cumprod().double()  # A1111's float32 alpha-bar
    blend = (lambda z: z) if nmask is None else (lambda z: z * nmask + torch.from_numpy(x0) * (1 - nmask))
    out = _a1111_timestep_loop(kind, steps, strength, pred, x0, noise, seq, eta, ac, blend)
    return out if nmask is None else out * nmask.numpy() + x0 * (1 - nmask.numpy())


def _a1111_timestep_loop(kind, steps, strength, pred, x0, noise, seq, eta, ac, blend):
    grid = a1111_grid(steps)
    nt = torch.from_numpy(noise)
    if strength >= 1.0:
        sched, z = grid, nt.clone()
    else:
        t_enc = int(min(strength, 0.999) * steps)
        sched = grid[:t_enc]
        a = ac[grid[t_enc]]
        z = a.sqrt() * torch.from_numpy(x0) + (1 - a).sqrt() * nt

    def eps(z, t):
        z = blend(z)
        return vp_eps(model_torch(z, t), z, ac[t], pred)

    def ddim(z, e, t, tp, sig=0.0, n=None):
        a, ap = ac[t], ac[tp]
        x0 = (z - (1 - a).sqrt() * e) / a.sqrt()
        out = ap.sqrt() * x0 + (1 - ap - sig**2).sqrt() * e
        return out + sig * n if n is not None else out

    if kind == "DDIM":
        seq.reset()
        for index in range(len(sched) - 1, 0, -1):
            t, tp = sched[index], sched[index - 1]
            a, ap = ac[t], ac[tp]
            sig = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
            z = ddim(z, eps(z, t), t, tp, sig, seq.torch() if eta else None)
        return z.numpy()
    if kind == "PLMS":
        old = []
        for index in range(len(sched) - 1, 0, -1):
            t, tn = sched[index], sched[index - 1]
            e = eps(z, t)
            if not old:
                e2 = eps(ddim(z, e, t, tn), tn)
                ep = (e + e2) / 2
            elif len(old) == 1:
                ep = (3 * e - old[-1]) / 2
            elif len(old) == 2:
                ep = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
            else:
                ep = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
            z = ddim(z, ep, t, tn)
            old = (old + [e])[-3:]
        return z.numpy()
    # UniPC
    from diffusers import UniPCMultistepScheduler

    n = len(sched)
    if n == 0:  # strength 0: noised to grid[0], nothing to sample
        return z.numpy()
    tau0 = 999.0 if strength >= 1.0 else float(sched[-1])
    taus = np.linspace(tau0, 0.0, n + 1)
    log_alpha = 0.5 * torch.log(ac)
    lo = np.floor(taus).astype(int)
    hi = np.minimum(lo + 1, 999)
    la = log_alpha[lo] + torch.from_numpy(taus - lo) * (log_alpha[hi] - log_alpha[lo])
    sig = torch.sqrt(torch.exp(-2 * la) - 1)
    sch = UniPCMultistepScheduler(solver_order=min(3, n), solver_type="bh1", lower_order_final=True,
                                  num_train_timesteps=1000)
    sch.set_timesteps(n)
    sch.sigmas = sig.to(torch.float64)
    sch.timesteps = torch.from_numpy(taus[:-1].copy())
    sch.num_inference_steps = n
    sch.set_begin_index(0)
    # The first model call sees the latent at the grid's first level (A1111 noised it one entry
    # higher for img2img).
    # A1111 hands UniPC eps; for v models it converts with the alpha-bar of int(t).
    sch.register_to_config(prediction_type="epsilon")
    for i in range(n):
        z_in = blend(z)
        out = model_torch(z_in, taus[i])
        if pred == "v_prediction":
            a = ac[int(taus[i])]
            out = a.sqrt() * out + (1 - a).sqrt() * z_in
        z = sch.step(out, sch.timesteps[i], z).prev_sample
    return z.numpy()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,strength", [(10, 1.0), (12, 0.6), (7, 0.75), (10, 0.0)])
@pytest.mark.parametrize("kind", ["DDIM", "PLMS", "UniPC"])
def test_a1111_timestep_samplers(kind, steps, strength, pred):
    x0, noise = inputs(5)
    seq = SequenceNoise(SHAPE, seed=11)
    ref = a1111_timestep_reference(kind, steps, strength, pred, x0 if strength < 1 else None, noise, seq)
    plan, out, den = run_sdrt(kind, steps, strength, pred=pred, x0=x0 if strength < 1 else None, noise=noise, seq=seq)
    assert rel_err(out, ref) <= TOL
    assert plan.unet_calls == len(den.calls)


def _fix_steps_total(steps, strength):
    if strength >= 1.0:  # make_plan's strength 1.0 is A1111's txt2img path (its img2img clamps to 0.999)
        return steps
    return int(steps / min(strength, 0.999)) if strength > 0 else 0


@pytest.mark.parametrize("kind", ["DDIM", "PLMS", "UniPC"])
def test_a1111_timestep_samplers_fix_steps_input_errors(kind):
    """A1111 divides 1000 by its fix-steps total int(steps / strength): 0 (strength 0) or a total
    above 1000 is an input error naming the limit, every other request plans."""
    rng = np.random.default_rng(3)
    table = [(int(rng.integers(1, 200)), float(s)) for s in rng.choice([0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 1.0], 60)]
    table += [(1, 0.0), (10, 0.01), (1000, 1.0), (999, 0.9995), (10, 0.0099), (10, 0.01001)]
    for steps, strength in table:
        total = _fix_steps_total(steps, strength)
        if 1 <= total <= 1000:
            make_plan(kind, steps, strength, config=SD_CONFIG, rule="a1111_fix_steps")
        else:
            with pytest.raises(ValueError, match="from 1 to 1000") as e:
                make_plan(kind, steps, strength, config=SD_CONFIG, rule="a1111_fix_steps")
            assert "\n" not in str(e.value) and str(total) in str(e.value)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["DDIM", "PLMS", "UniPC"])
def test_a1111_timestep_samplers_inpaint_blend_the_model_input(kind, pred):
    """sdrt's A1111 inpainting blender (runtime.prepare.LatentBlender) with a timestep sampler
    blends the model's input, not its output: A1111's mask_before_denoising."""
    from sdrt.runtime.prepare import LatentBlender

    x0, noise = inputs(13)
    nmask = (np.arange(SHAPE[-1]) < 3).astype(np.float64) * np.ones(SHAPE)
    nmask[..., 0, :] = 0.5  # a soft row
    steps, strength = 10, 0.7
    ref = a1111_timestep_reference(kind, steps, strength, pred, x0, noise, SequenceNoise(SHAPE),
                                   nmask=torch.from_numpy(nmask))
    plan = make_plan(kind, steps, strength, config={**SD_CONFIG, "prediction_type": pred})
    assert plan.mask_before_denoising
    blender = LatentBlender("a1111", 1.0 - nmask, x0, noise, plan, len(plan.sigmas) - 1, nmask)
    den = blender.wrap(sdrt_denoiser(plan, pred))
    out = sample(plan, den, plan.start(x0, noise), model_input=blender.model_input)
    got = blender.finish(plan.finish(out))
    assert rel_err(got, ref) <= TOL
    # blending the model's output instead (the k-diffusion samplers' way) is a different result
    plain = LatentBlender("a1111", 1.0 - nmask, x0, noise, make_plan("Euler", 10, 0.7, config=SD_CONFIG), 10, nmask)
    out2 = sample(plan, plain.wrap(sdrt_denoiser(plan, pred)), plan.start(x0, noise))
    assert rel_err(blender.finish(plan.finish(out2)), ref) > 100 * TOL


def test_a1111_ddim_eta():
    x0, noise = inputs(6)
    seq = SequenceNoise(SHAPE, seed=12)
    ref = a1111_timestep_reference("DDIM", 10, 0.8, "epsilon", x0, noise, seq, eta=0.7)
    plan, out, _ = run_sdrt("DDIM", 10, 0.8, x0=x0, noise=noise, seq=seq, eta=0.7)
    assert rel_err(out, ref) <= TOL


# ------------------------------------------------------------------------------- ComfyUI
COMFY = {
    "euler": ("sample_euler", {}, False, False),
    "euler_ancestral": ("sample_euler_ancestral", {"eta": 1.0}, False, True),
    "heun": ("sample_heun", {}, False, False),
    "dpm_2": ("sample_dpm_2", {}, True, False),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {"eta": 1.0}, True, True),
    "lms": ("sample_lms", {}, False, False),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {"eta": 1.0}, False, True),
    "dpmpp_sde": ("sample_dpmpp_sde", {"eta": 1.0}, False, True),
    "dpmpp_sde_gpu": ("sample_dpmpp_sde", {"eta": 1.0}, False, True),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, False, False),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {"eta": 1.0}, False, True),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}, False, True),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {"eta": 1.0}, False, True),
    "ddim": ("sample_euler", {}, False, False),
    "uni_pc": ("unipc", {"variant": "bh1"}, True, False),
    "uni_pc_bh2": ("unipc", {"variant": "bh2"}, True, False),
}


def comfy_sigmas(kind, n, mw):
    """ComfyUI's calculate_sigmas on ModelSamplingDiscrete, re-derived from its code."""
    table = mw.sigmas
    smin, smax = table[0].item(), table[-1].item()
    if kind == "normal":
        return mw.get_sigmas(n)
    if kind == "karras":
        return sampling.get_sigmas_karras(n, smin, smax)
    if kind == "exponential":
        return sampling.get_sigmas_exponential(n, smin, smax)
    if kind == "sgm_uniform":
        ts = torch.linspace(len(table) - 1, 0, n + 1)[:-1]
        return torch.tensor([mw.t_to_sigma(t).item() for t in ts] + [0.0])
    if kind == "simple":
        ss = len(table) / n
        return torch.tensor([table[-(1 + int(x * ss))].item() for x in range(n)] + [0.0])
    if kind == "ddim_uniform":
        ss, x, out = max(len(table) // n, 1), 1, []
        while x < len(table):
            out.append(table[x].item())
            x += ss
        return torch.tensor(out[::-1] + [0.0])
    if kind == "beta":
        ts = np.rint(scipy_stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * (len(table) - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(table[int(t)].item())
            last = t
        return torch.tensor(out + [0.0])
    if kind == "kl_optimal":
        adj = torch.arange(n, dtype=torch.float64) / (n - 1)
        s = torch.zeros(n + 1)
        s[:-1] = torch.tan(adj * math.atan(smin) + (1 - adj) * math.atan(smax))
        return s
    raise KeyError(kind)


def comfy_unipc(mw, x, sigmas, variant):
    """ComfyUI's uni_pc: UniPC (data prediction, order min(3, len - 2), lower order final) on the
    given sigmas with a final 0 replaced by 0.001, then back to k-space; diffusers'
    UniPCMultistepScheduler is the implementation of that algorithm used here."""
    from diffusers import UniPCMultistepScheduler

    sig = sigmas.clone().to(torch.float64)
    if sig[-1] == 0:
        sig[-1] = 0.001
    n = len(sig) - 1
    sch = UniPCMultistepScheduler(solver_order=max(1, min(3, len(sig) - 2)), solver_type=variant,
                                  lower_order_final=True,
                                  num_train_timesteps=1000)
    sch.set_timesteps(n)
    sch.sigmas = sig
    sch.num_inference_steps = n
    sch.set_begin_index(0)
    z = x / torch.sqrt(1 + sig[0] ** 2)
    for i in range(n):
        s = sig[i]
        xk = z * torch.sqrt(1 + s**2)
        den = mw(xk, s.reshape(1))
        eps_vp = (xk - den) / s  # eps; UniPC (data prediction) turns it back into den exactly
        z = sch.step(eps_vp, sch.timesteps[i], z).prev_sample
    return z * torch.sqrt(1 + sig[-1] ** 2)


def comfy_reference(name, steps, denoise, schedule, pred, x0, noise, seq):
    """ComfyUI's KSampler: calculate_sigmas (+1 step and the penultimate sigma dropped for
    dpm_2/dpm_2_ancestral/uni_pc*), set_steps' int(steps / denoise) tail, noise scaled by
    sqrt(1 + sigma^2) at full denoise (max_denoise) else by sigma, then the sampler. ComfyUI's lms
    ends with x = denoised on the step to 0 (reproduced: k-diffusion's lms up to the last
    nonzero sigma, then one denoise)."""
    func, kw, discard, noisy = COMFY[name]
    mw = wrapper(pred, quantize=True)
    schedule = schedule or ("ddim_uniform" if name == "ddim" else "normal")

    def calc(n):
        s = comfy_sigmas(schedule, n + (1 if discard else 0), mw)
        return torch.cat([s[:-2], s[-1:]]) if discard else s

    with f64():
        sig = calc(steps) if denoise > 0.9999 else calc(int(steps / denoise))[-(steps + 1):]
        sig = sig.to(torch.float64)
        smax = mw.sigmas[-1].item()
        s0 = sig[0].item()
        max_denoise = math.isclose(smax, s0, rel_tol=1e-5) or s0 > smax
        scale = math.sqrt(1 + s0 * s0) if max_denoise else s0
        x = torch.from_numpy(x0) + torch.from_numpy(noise) * scale
        if noisy and seq is not None:  # else k-diffusion draws its own noise
            kw = {**kw, "noise_sampler": seq.reset().torch}
        if func == "unipc":
            out = comfy_unipc(mw, x, sig, kw["variant"])
        elif name == "lms":
            out = sampling.sample_lms(mw, x, sig[:-1], disable=True)
            out = mw(out, sig[-2].reshape(1))
        else:
            out = getattr(sampling, func)(mw, x, sig, disable=True, **kw)
    return out.numpy(), sig.numpy()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,denoise", [(12, 1.0), (10, 0.6), (8, 0.35)])
@pytest.mark.parametrize("name", list(COMFY))
def test_comfy_samplers(name, steps, denoise, pred):
    x0, noise = inputs(7)
    seq = SequenceNoise(SHAPE, seed=13)
    ref, ref_sig = comfy_reference(name, steps, denoise, None, pred, x0, noise, seq)
    plan, out, den = run_sdrt(name, steps, denoise, pred=pred, x0=x0, noise=noise, seq=seq)
    if name.startswith("uni_pc") and ref_sig[-1] == 0:
        ref_sig = ref_sig.copy()
        ref_sig[-1] = 0.001
    np.testing.assert_allclose(plan.sigmas, ref_sig, rtol=1e-6, atol=1e-12)
    assert all(t == int(t) for _, t in den.calls), "ComfyUI feeds integer (argmin) timesteps"
    assert rel_err(out, ref) <= TOL
    assert plan.unet_calls == len(den.calls)


@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform",
                                      "beta", "kl_optimal"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_ancestral", "dpm_2"])
def test_comfy_schedulers(name, schedule):
    x0, noise = inputs(8)
    seq = SequenceNoise(SHAPE, seed=14)
    ref, ref_sig = comfy_reference(name, 13, 0.8, schedule, "epsilon", x0, noise, seq)
    plan, out, _ = run_sdrt(name, 13, 0.8, schedule, x0=x0, noise=noise, seq=seq)
    assert plan.schedule_label == schedule
    np.testing.assert_allclose(plan.sigmas, ref_sig, rtol=1e-6, atol=1e-12)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_comfy_lcm(pred, denoise):
    """ComfyUI's lcm with its distilled (LCM) model sampling is A1111's LCM path with ComfyUI's
    schedule tail and noise scaling (sqrt(1 + sigma^2) at full denoise)."""
    x0, noise = inputs(9)
    seq = SequenceNoise(SHAPE, seed=15)
    plan, out, _ = run_sdrt("lcm", 6, denoise, pred=pred, x0=x0, noise=noise, seq=seq)
    total = 6 if denoise == 1.0 else int(6 / denoise)
    _, full = lcm_reference(total, 1.0, None, pred, x0, noise, seq, ac=ref_alphas_cumprod())
    s0 = full[-7]
    scale = math.sqrt(1 + s0 * s0) if denoise == 1.0 else s0
    # lcm_reference adds noise * sched[0]: hand it the start latent directly (zero noise).
    ref, ref_sig = lcm_reference(total, 1.0, None, pred, x0 + noise * scale, np.zeros_like(noise), seq,
                                 keep=6, ac=ref_alphas_cumprod())
    np.testing.assert_allclose(plan.sigmas, ref_sig, rtol=1e-6, atol=1e-12)
    assert rel_err(out, ref) <= TOL


# ------------------------------------------------------------------------------ one step
# k-diffusion's 2M/3M SDE samplers fail when their first step ends at 0 (UnboundLocalError: `h`,
# see test_a1111_strength_zero_single_step_to_zero); sdrt returns that step's denoised latent.
FIRST_STEP_TO_ZERO_FAILS = {"DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "dpmpp_2m_sde",
                            "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}


def _one_step(name, schedule, strength, reference, mw, x0, noise):
    """sdrt at steps=1 against `reference(seq)`. A single step to 0 draws no noise: then each side
    makes its own (k-diffusion a BrownianTreeNoiseSampler over the run's one noise level, sdrt a
    Brownian tree from a Generator), else both get the same noise sequence."""
    plan = make_plan(name, 1, strength, schedule, config=SD_CONFIG)
    own = plan.sigmas[-1] == 0
    seq = None if own else SequenceNoise(SHAPE, seed=21)
    start = plan.start(x0, noise)
    out = plan.finish(sample(plan, sdrt_denoiser(plan, "epsilon"), start, rng=np.random.default_rng(5),
                             noise_sampler=None if own else seq.reset().numpy))
    assert np.isfinite(out).all()
    if own and name in FIRST_STEP_TO_ZERO_FAILS:
        with pytest.raises(UnboundLocalError):
            reference(seq)
        with f64():
            s = torch.tensor([plan.sigmas[0]])
            want = mw(torch.from_numpy(start), s).numpy()
    else:
        want, ref_sig = reference(seq)
        np.testing.assert_allclose(plan.sigmas, ref_sig, rtol=1e-6, atol=1e-12)
    assert rel_err(out, want) <= TOL


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", list(A1111))
def test_a1111_one_step(name, schedule):
    """At one step A1111 runs the same sigmas at any strength (t_enc + 1 = 1)."""
    strength = 0.6
    x0, noise = inputs(20)
    mw = wrapper("epsilon", False, a1111_alphas_cumprod())
    _one_step(name, LABELS[schedule], strength,
              lambda seq: a1111_reference(name, 1, strength, schedule, "epsilon", x0, noise, seq), mw, x0, noise)


COMFY_SCHEDULES = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]


@pytest.mark.parametrize("schedule,denoise", [(s, 1.0) for s in COMFY_SCHEDULES] + [("normal", 0.5), ("karras", 0.5)])
@pytest.mark.parametrize("name", [n for n in COMFY if n != "ddim"])
def test_comfy_one_step(name, schedule, denoise):
    x0, noise = inputs(21)

    def reference(seq):
        out, sig = comfy_reference(name, 1, denoise, schedule, "epsilon", x0, noise, seq)
        if name.startswith("uni_pc") and sig[-1] == 0:  # ComfyUI's uni_pc ends at 0.001
            sig = np.concatenate([sig[:-1], [0.001]])
        return out, sig

    _one_step(name, schedule, denoise, reference, wrapper("epsilon", True), x0, noise)


def test_comfy_kl_optimal_one_step():
    """ComfyUI's kl_optimal divides by steps - 1: at one step its only sigma is NaN (0 / 0) and
    the image is lost. sdrt starts that step at sigma_max, where its other schedules start."""
    mw = wrapper("epsilon", True)
    with f64():
        assert torch.isnan(comfy_sigmas("kl_optimal", 1, mw)[0])
    for name in ("euler", "dpmpp_sde", "dpmpp_2m_sde"):
        plan = make_plan(name, 1, 1.0, "kl_optimal", config=SD_CONFIG)
        np.testing.assert_allclose(plan.sigmas, [mw.sigmas[-1].item(), 0.0], rtol=1e-6)
        x0, noise = inputs(22)
        out = sample(plan, sdrt_denoiser(plan, "epsilon"), plan.start(x0, noise), rng=np.random.default_rng(1))
        assert np.isfinite(out).all()
