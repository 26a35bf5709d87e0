"""Plans: which noise levels a named sampler visits, at which UNet timesteps, and how a run starts
and ends, for each tool's semantics. `sample` then runs the plan."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from . import diffusers_compat, names, noise, schedules
from . import options as option_domains
from . import samplers as samplers_mod
from .samplers import SAMPLERS, sde_midpoint
from .training import (alphas_cumprod, check_training_schedule, distilled_table, index_nearest, sigma_from_t_vp,
                       sigmas_from_alphas_cumprod, t_from_sigma)

PREDICTION_TYPES = ("epsilon", "v_prediction")
_MULTI = "dpmpp_multistep"
# Samplers with two model evaluations per step (A1111 marks them "second_order").
SECOND_ORDER = ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2s_ancestral", "restart")


@dataclass(frozen=True, eq=False)
class Plan:
    """A resolved sampler run. Build it with `make_plan`; run it with `sample`."""

    name: str                      # display name, e.g. "DPM++ 2M" (A1111 infotext "Sampler")
    schedule_label: str            # e.g. "Karras" (A1111 infotext "Schedule type")
    family: str                    # "a1111" | "comfyui" | "diffusers"
    steps: int                     # requested steps
    strength: float                # requested strength (denoise)
    sigmas: np.ndarray             # levels the run visits, descending, last = final level
    unet_calls: int | None         # denoise calls the run makes (None: decided while it runs)
    prediction_type: str
    rule: str                      # img2img rule used
    sampler: str                   # sdrt sampler function (key of samplers.SAMPLERS)
    options: Mapping[str, Any] = field(default_factory=dict)  # its keyword arguments
    noise: str = "none"            # none | randn | brownian: what randomness the run needs
    brownian_range: tuple | None = None
    brownian_seed: int | None = None
    clip_sample: float | None = None
    _timesteps: Mapping[float, float] = field(default_factory=dict, repr=False)
    _to_timestep: Callable[[float], float] | None = field(default=None, repr=False)
    _txt2img_scale: float = 1.0
    _img2img_scale: float = 0.0
    _relabel: float = 1.0
    _finish_scale: float = 1.0
    _eps_from_v_at_int_t: np.ndarray | None = field(default=None, repr=False)  # A1111 UniPC, v models
    mask_before_denoising: bool = False  # A1111's timestep samplers blend an inpainting mask into the model input

    @property
    def prompt_steps(self) -> int:
        """The step count of A1111's prompt editing: the requested steps, twice that for samplers
        that evaluate the model twice per step (A1111's "second order" samplers), whose
        CFG denoiser counts every evaluation as a step."""
        return self.steps * (2 if self.sampler in SECOND_ORDER else 1)

    def timestep(self, sigma) -> float:
        """The timestep the reference feeds its UNet at noise level `sigma`."""
        t = self._timesteps.get(float(sigma))
        if t is None:
            t = self._to_timestep(float(sigma))
        return float(t)

    def start(self, x0, noise_):
        """The k-space start latent: img2img from clean latents `x0` (the family's add-noise rule),
        or txt2img from pure noise when x0 is None. A plan without steps returns x0."""
        noise_ = np.asarray(noise_)
        if x0 is None:
            return noise_ * self._txt2img_scale
        x0 = np.asarray(x0)
        if self.unet_calls == 0 and self._img2img_scale == 0:
            return x0.copy()
        x = noise_ * self._img2img_scale
        x += x0
        if self._relabel != 1.0:
            x *= self._relabel
        return x

    def finish(self, x):
        """The latent the reference decodes (VP latent where the reference ends at a nonzero
        sigma in VP space; x otherwise)."""
        return x * self._finish_scale if self._finish_scale != 1.0 else x


def denoised_from_output(model_output, x, sigma, prediction_type: str = "epsilon"):
    """x0 estimate from the UNet output at k-space latent x (the UNet saw x / sqrt(sigma^2 + 1))."""
    sigma = float(sigma)
    if prediction_type == "epsilon":
        out = model_output * (-sigma)
        out += x
        return out
    if prediction_type == "v_prediction":
        c = 1.0 / (sigma * sigma + 1.0)
        out = model_output * (-sigma * math.sqrt(c))
        out += x * c
        return out
    if prediction_type == "sample":
        return np.array(model_output, copy=True)
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


# ----------------------------------------------------------------------------- img2img rules
def tail(rule: str, steps: int, strength: float) -> tuple[int, int | None]:
    """(steps of the full schedule, steps kept at its end) for an img2img rule; kept = 0 where
    nothing runs, None for the whole schedule (ComfyUI at denoise > 0.9999). A1111 runs
    t_enc + 1 steps, one even at strength 0 (t_enc = 0); with fix-steps, strength 0 makes a
    schedule of 0 steps, which A1111's k-diffusion samplers return unchanged."""
    if rule == "a1111":
        return steps, int(min(max(strength, 0.0), 0.999) * steps) + 1
    if strength <= 0:
        return (0 if rule == "a1111_fix_steps" else steps), 0
    if rule == "diffusers":
        return steps, min(int(steps * strength), steps)
    if rule == "a1111_fix_steps":
        return int(steps / min(strength, 0.999)), steps
    if rule == "comfyui":
        return (steps, None) if strength > 0.9999 else (int(steps / strength), steps)
    raise ValueError(f"unknown img2img rule {rule!r}; use one of {', '.join(names.RULES)}")


def _cut(full: np.ndarray, n_total: int, keep: int, rule: str) -> np.ndarray:
    """The kept tail of a schedule: A1111 and diffusers index from the start, ComfyUI from the end."""
    if keep is None:
        return full
    if rule == "comfyui":
        return full[-(keep + 1):]
    return full[max(n_total - keep, 0):]


# ------------------------------------------------------------------------------- make_plan
_SAMPLER_OPTIONS = {
    "euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "dpm_2": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "euler_ancestral": ("eta", "s_noise"),
    "dpm_2_ancestral": ("eta", "s_noise"),
    "dpmpp_2s_ancestral": ("eta", "s_noise"),
    "dpmpp_sde": ("eta", "s_noise", "r"),
    "dpmpp_multistep": ("eta", "s_noise"),
    "lms": ("order",),
    "lcm": (),
    "a1111_ddim": ("eta",),
    "a1111_plms": (),
    "a1111_unipc": ("uni_pc_variant", "uni_pc_order"),
    "comfy_unipc": (),
    "dpm_fast": ("eta", "s_noise"),
    "dpm_adaptive": ("eta", "s_noise", "order", "rtol", "atol", "h_init", "pcoeff", "icoeff", "dcoeff", "accept_safety"),
    "restart": ("s_noise",),
}
_SCHEDULE_OPTIONS = ("sigma_min", "sigma_max", "rho", "beta_alpha", "beta_beta")
_COMMON_OPTIONS = ("discard_penultimate_sigma", "seed", "original_inference_steps")


def make_plan(sampler: str, steps: int, strength: float = 1.0, schedule: str | None = None, *, config: dict,
              rule: str | None = None, **options) -> Plan:
    """Resolve a sampler name (+ schedule) for `steps` steps at img2img `strength` against the
    model's scheduler config. See the package docstring for names and rules."""
    spec, sched_key, name_options = names.resolve(sampler, schedule)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    rule = names.default_rule(spec.family) if rule is None else {"comfy": "comfyui"}.get(rule, rule)
    if rule not in names.RULES:
        raise ValueError(f"unknown img2img rule {rule!r}; use one of {', '.join(names.RULES)}")
    config = dict(config or {})
    problem = check_training_schedule(config)
    if problem:
        raise ValueError(f"scheduler config: {problem}")
    if spec.family == "diffusers":
        if sched_key is not None:
            options = {**names.DIFFUSERS_SCHEDULES[sched_key][1], **options}
        return _plan_diffusers(spec, steps, strength, rule, config, {**name_options, **options}, sched_key)
    return _plan_kdiffusion(spec, steps, strength, sched_key, rule, config, options)


def _empty(spec, label, steps, strength, rule, pred, sigma=0.0, finish_scale=1.0, img2img_scale=0.0) -> Plan:
    """A plan without steps: the start latent is the result (x0 itself when nothing is noised)."""
    return Plan(spec.name, label, spec.family, steps, strength, np.array([float(sigma)]), 0, pred, rule, "euler",
                _to_timestep=lambda s: 0.0, _txt2img_scale=1.0 / finish_scale, _img2img_scale=img2img_scale,
                _finish_scale=finish_scale)


def _prediction(config) -> str:
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {pred!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}")
    return pred


def sampler_options(sampler: str) -> tuple[str, ...]:
    """The options a sampler name takes as keywords of make_plan (eta, s_churn, s_noise, ...),
    less those its name fixes (A1111's DPM++ 2M runs with eta 0)."""
    spec, _, _ = names.resolve(sampler)
    return tuple(sorted(set(_SAMPLER_OPTIONS.get(spec.sampler, ())) - set(spec.options)))


def _split_options(spec, options):
    own = set(_SAMPLER_OPTIONS.get(spec.sampler, ())) - set(spec.options)
    allowed = own | set(_SCHEDULE_OPTIONS) | set(_COMMON_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{spec.name} has no option {', '.join(unknown)}; "
                         f"its options are: {', '.join(sorted(allowed))}")
    sampler_opts = {k: v for k, v in options.items() if k in own}
    return sampler_opts, {k: v for k, v in options.items() if k not in sampler_opts}


def _schedule_fn(family: str, key: str, table: np.ndarray, opts: dict, log_table: np.ndarray | None = None):
    smin = float(table[0] if opts.get("sigma_min") is None else opts["sigma_min"])
    smax = float(table[-1] if opts.get("sigma_max") is None else opts["sigma_max"])
    option_domains.check_sigma_range(smin, smax)
    a, b = float(opts.get("beta_alpha", 0.6)), float(opts.get("beta_beta", 0.6))
    rho = opts.get("rho")
    fns = {
        "uniform": lambda n: schedules.normal(n, table, log_table),
        "normal": lambda n: schedules.normal(n, table, log_table),
        "karras": lambda n: schedules.karras(n, smin, smax, float(rho or 7.0)),
        "exponential": lambda n: schedules.exponential(n, smin, smax),
        "polyexponential": lambda n: schedules.polyexponential(n, smin, smax, float(rho or 1.0)),
        "sgm_uniform": lambda n: schedules.sgm_uniform(n, table, log_table),
        "simple": lambda n: schedules.simple(n, table),
        "ddim": lambda n: schedules.ddim_uniform(n, table),
        "ddim_uniform": lambda n: schedules.ddim_uniform(n, table),
        "align_your_steps": lambda n: schedules.align_your_steps(n),
        "beta": (lambda n: schedules.beta(n, smin, smax, a, b)) if family == "a1111"
        else (lambda n: schedules.beta_discrete(n, table, a, b)),
        "kl_optimal": (lambda n: schedules.kl_optimal(n, smin, smax)) if family == "a1111"
        else (lambda n: schedules.kl_optimal_zero(n, smin, smax)),
    }
    return fns[key]


def _schedule_label(spec, key):
    """A1111 writes the schedule "Automatic" resolved to (Karras, Exponential) but "Automatic"
    where the sampler keeps its uniform default."""
    if spec.family == "a1111":
        if key in (None, "automatic"):
            key = spec.schedule if spec.schedule not in (None, "uniform") else "automatic"
        return names.A1111_SCHEDULES[key][0]
    return key or ""


def _plan_kdiffusion(spec, steps, strength, sched_key, rule, config, options) -> Plan:
    """A1111 and ComfyUI: k-diffusion samplers on the discrete DDPM denoiser."""
    pred = _prediction(config)
    sampler_opts, other = _split_options(spec, options)
    option_domains.check(options, spec.sampler)
    family = spec.family
    if spec.sampler in ("a1111_ddim", "a1111_plms", "a1111_unipc"):
        # A1111's timestep samplers have their own grid and ignore the schedule choice.
        return _plan_a1111_timesteps(spec, steps, strength, rule, config, sampler_opts, other, pred)

    precision = "a1111" if family == "a1111" else "ldm"  # A1111: float32 alpha-bar and sigmas
    ac = alphas_cumprod(config, precision)
    table = sigmas_from_alphas_cumprod(ac, precision)
    stride = 1
    if spec.sampler == "lcm":
        table, stride = distilled_table(table, int(other.get("original_inference_steps", 50)))
    log_table = np.log(table.astype(np.float32)).astype(np.float64) if family == "a1111" else np.log(table)
    if family == "a1111" and spec.sampler != "lcm":
        def to_t(s, _lt=log_table):
            return t_from_sigma(s, _lt)
    else:
        def to_t(s, _lt=log_table, _k=stride):
            return float(index_nearest(s, _lt) * _k + _k - 1)

    key = sched_key if sched_key not in (None, "automatic") else spec.schedule
    label = _schedule_label(spec, sched_key if family == "a1111" else key)
    fn = _schedule_fn(family, key, table, other, log_table)
    discard = spec.discard_penultimate or bool(other.get("discard_penultimate_sigma", False))

    def full_schedule(n):
        s = fn(n + 1 if discard else n)
        return schedules.discard_penultimate(s) if discard else s

    n_total, keep = tail(rule, steps, strength)
    if keep == 0:
        return _empty(spec, label, steps, strength, rule, pred)
    full = full_schedule(n_total)
    run = _cut(full, n_total, keep, rule)
    if len(run) < 2:
        return _empty(spec, label, steps, strength, rule, pred)

    kw: dict = dict(spec.options)
    kw.update({k: float(v) for k, v in sampler_opts.items() if k != "order"})
    if "order" in sampler_opts:
        kw["order"] = int(sampler_opts["order"])
    noise_kind = "none"
    sampler = spec.sampler
    if sampler in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"):
        kw.setdefault("eta", 1.0)
        noise_kind = "randn" if kw["eta"] else "none"
    if sampler == _MULTI and "eta" not in kw:
        kw["eta"] = 1.0
    if spec.brownian and kw.get("eta", 1.0):
        noise_kind = "brownian"
    if sampler in ("euler", "heun", "dpm_2") and kw.get("s_churn", 0) > 0:
        noise_kind = "randn"
    if sampler == "lcm":
        noise_kind = "randn"
        kw["vp"] = False
    calls = len(run) - 1
    if sampler in ("dpm_fast", "dpm_adaptive"):
        # A1111 hands these sigma_max, sigma_min and n instead of the schedule: the model's own
        # range and the steps in txt2img, the ends of the kept schedule (its last nonzero sigma)
        # and its length in img2img. They stop at sigma_min; eta defaults to A1111's 1.
        if strength >= 1.0:
            smax, smin, nfe = float(table[-1]), float(table[0]), steps
        else:
            smax, smin, nfe = float(run[0]), float(run[-2]), len(run) - 1
        kw.setdefault("eta", 1.0)
        noise_kind = "randn" if kw["eta"] else "none"
        if sampler == "dpm_fast":
            kw["orders"] = samplers_mod.dpm_fast_orders(nfe)
            calls = nfe
            run = np.exp(-np.linspace(-math.log(smax), -math.log(smin), len(kw["orders"]) + 1))
        else:
            calls = None  # decided while it runs
            run = np.array([smax, smin])
    elif sampler == "restart":
        kw["pairs"] = samplers_mod.restart_pairs(run, schedules.karras)
        calls = sum(2 if b > 0 else 1 for _, b in kw["pairs"])
        restarts = any(p1[1] < p2[0] for p1, p2 in zip(kw["pairs"], kw["pairs"][1:]))
        noise_kind = "randn" if restarts else "none"
    elif sampler == "comfy_unipc":
        sampler = "unipc"
        run = run.copy()
        if run[-1] == 0:
            run[-1] = 0.001
        order = max(1, min(3, len(run) - 2))
        kw = {"variant": kw["variant"], "order": order}
    elif sampler in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2s_ancestral"):
        calls = 2 * calls - int(run[-1] == 0)
    brownian_range = None
    if noise_kind == "brownian":
        src = full if family == "a1111" else run
        brownian_range = (float(src[src > 0].min()), float(src.max()))
    s0 = float(run[0])
    if family == "comfyui":
        smax = float(table[-1])
        # ComfyUI's noise_scaling: sqrt(1 + sigma^2) when the run starts at the model's top sigma
        txt_scale = img_scale = math.sqrt(1.0 + s0 * s0) if (math.isclose(smax, s0, rel_tol=1e-5) or s0 > smax) else s0
    else:
        txt_scale = img_scale = s0
    return Plan(spec.name, label, family, steps, strength, np.asarray(run, np.float64), calls, pred, rule, sampler, kw,
                noise_kind, brownian_range, other.get("seed"), None, {}, to_t, txt_scale, img_scale)


def _plan_a1111_timesteps(spec, steps, strength, rule, config, sampler_opts, other, pred) -> Plan:
    """A1111's DDIM, PLMS and UniPC: the VP-space samplers on its timestep grid 1, 1 + k, ..."""
    ac = alphas_cumprod(config, "a1111")
    T = len(ac)
    label = "Automatic"

    def vs(t):
        return math.sqrt((1.0 - ac[int(t)]) / ac[int(t)])

    n_total, keep = steps, None
    if strength < 1.0:
        n_total, keep = tail(rule, steps, strength)
    m = n_total + (1 if other.get("discard_penultimate_sigma") else 0)
    if not 1 <= m <= T:  # A1111 divides T by it (its fix-steps total int(steps / strength))
        raise ValueError(f"{spec.name} with img2img rule {rule!r} needs int(steps / strength) from 1 to {T}, "
                         f"got {m} (steps {steps}, strength {strength}); raise strength or lower steps")
    if keep == 0:
        return _empty(spec, label, steps, strength, rule, pred)
    grid = np.clip(np.arange(0, T, T // m) + 1, 0, T - 1)
    if keep is None:
        sched, noise_t = grid, None
    else:
        t_enc = min(keep - 1, len(grid) - 1)
        sched, noise_t = grid[:t_enc], int(grid[t_enc])
    n_sched = len(sched)
    if spec.sampler == "a1111_unipc":
        if n_sched == 0:
            s = vs(noise_t)
            return _empty(spec, label, steps, strength, rule, pred, s, 1.0 / math.sqrt(1 + s * s), s)
        tau0 = float(T - 1) if noise_t is None else float(sched[-1])
        taus = np.linspace(tau0, 0.0, n_sched + 1)
        sig = sigma_from_t_vp(taus, ac)
        order = int(sampler_opts.get("uni_pc_order", 3))
        kw = {"variant": str(sampler_opts.get("uni_pc_variant", "bh1")), "order": order}
        tmap = {float(s): float(t) for s, t in zip(sig, taus)}
        first, final = float(sig[0]), float(sig[-1])
        calls, sampler = n_sched, "unipc"
    else:
        if n_sched <= 1:
            t = int(sched[0]) if noise_t is None else noise_t
            s = vs(t)
            return _empty(spec, label, steps, strength, rule, pred, s, 1.0 / math.sqrt(1 + s * s), s)
        down = [int(t) for t in sched[::-1]]  # calls at down[0..-2], final level down[-1]
        if spec.sampler == "a1111_plms":
            calls_t = [down[0], down[1]] + down[1:-1]
            sampler, kw = "plms", {}
        else:
            calls_t = down[:-1]
            sampler, kw = "ddim", {"eta": float(sampler_opts.get("eta", 0.0))}
        sig = np.array([vs(t) for t in calls_t] + [vs(down[-1])])
        tmap = {float(vs(t)): float(t) for t in calls_t}
        first, final = float(sig[0]), float(sig[-1])
        calls = len(calls_t)
    if noise_t is None:
        img_scale, relabel = first, 1.0
    else:
        s_noise = vs(noise_t)
        img_scale, relabel = s_noise, math.sqrt((1.0 + first * first) / (1.0 + s_noise * s_noise))
    noise_kind = "randn" if sampler == "ddim" and kw.get("eta") else "none"

    def to_t(s, _lt=np.log(sigmas_from_alphas_cumprod(ac, "a1111").astype(np.float32)).astype(np.float64)):
        return t_from_sigma(s, _lt)

    quirk = ac if sampler == "unipc" and pred == "v_prediction" else None
    return Plan(spec.name, label, "a1111", steps, strength, sig, calls, pred, rule, sampler, kw, noise_kind, None, None,
                None, tmap, to_t, math.sqrt(1.0 + first * first), img_scale, relabel,
                1.0 / math.sqrt(1.0 + final * final), quirk, mask_before_denoising=True)


def _plan_diffusers(spec, steps, strength, rule, config, options, sched_key) -> Plan:
    cls = spec.name
    options = dict(options)
    option_domains.check(options, defaults=diffusers_compat.DEFAULTS.get(cls))
    eta = options.pop("eta", None)  # a pipeline argument, passed to DDIMScheduler.step
    if eta is not None and cls != "DDIMScheduler":
        raise ValueError(f"eta is an option of DDIMScheduler only, not of {cls}")
    cfg = diffusers_compat.merged_config(cls, config, options)
    pred = cfg["prediction_type"]
    n_total, keep = tail(rule, steps, strength)
    label = names.DIFFUSERS_SCHEDULES[sched_key][0] if sched_key else _diffusers_label(cfg)
    if keep == 0:
        return _empty(spec, label, steps, strength, rule, pred)
    run = diffusers_compat.build(cls, cfg, n_total, 0 if keep is None else n_total - keep)
    if run.unet_calls == 0:
        return _empty(spec, label, steps, strength, rule, pred)
    if eta:
        run.options["eta"] = float(eta)
        run.noise = "randn"
    log_sigmas = run.log_sigmas if run.log_sigmas is not None else diffusers_compat._table(cfg, cls)[2]

    def to_t(s, _lt=log_sigmas):
        return t_from_sigma(s, _lt)

    seed = cfg.get("noise_sampler_seed") if run.noise == "brownian" else None
    return Plan(cls, label, "diffusers", steps, strength, np.asarray(run.sigmas, np.float64), run.unet_calls, pred,
                rule, run.sampler, run.options, run.noise, run.brownian_range, seed, run.clip_sample, run.timesteps,
                to_t, run.txt2img_scale, run.start_sigma, 1.0, run.finish_scale)


def _diffusers_label(cfg) -> str:
    for k, (label, opts) in names.DIFFUSERS_SCHEDULES.items():
        if cfg.get(next(iter(opts))):
            return label
    return ""


def _eps_from_v_at_int_t(denoise, timestep, alphas_cumprod):
    """A1111's timestep samplers turn v into eps with the alpha-bar of int(t) (its
    CompVisTimestepsVDenoiser); with UniPC's fractional t that is not the alpha-bar of sigma.
    The x0 estimate that results, from the exact one."""

    def wrapped(x, sigma):
        den = denoise(x, sigma)
        c = 1.0 / math.sqrt(1.0 + sigma * sigma)
        a = float(alphas_cumprod[int(timestep(sigma))])
        v = x * (c * c) - den
        v *= 1.0 / (sigma * c)
        eps = v * math.sqrt(a)
        eps += x * (c * math.sqrt(1.0 - a))
        eps *= -sigma
        eps += x
        return eps

    return wrapped


# ---------------------------------------------------------------------------------- sample
def _query_levels(plan: Plan) -> list[float]:
    """The noise levels at which a Brownian plan will query its noise."""
    levels = [float(v) for v in plan.sigmas if v > 0]
    if plan.sampler == "dpmpp_sde":
        mids = plan.options.get("sigmas_mid")
        r = float(plan.options.get("r", 0.5))
        pairs = zip(plan.sigmas[:-1], plan.sigmas[1:])
        levels += [float(m) for m in mids if m > 0] if mids is not None else \
            [sde_midpoint(float(a), float(b), r) for a, b in pairs if b > 0]
    return levels


def _noise_for(plan: Plan, rng: np.random.Generator, shape, dtype):
    if plan.noise == "brownian":
        seed = plan.brownian_seed if plan.brownian_seed is not None else int(rng.integers(0, 2**63 - 1))
        lo, hi = plan.brownian_range
        return noise.brownian_sampler(seed, lo, hi, shape, dtype, points=_query_levels(plan))
    return noise.randn_sampler(rng, shape, dtype)


def batch_noise_sampler(plan: Plan, rngs, x):
    """A noise sampler drawing each batch item's noise from its own Generator (one Brownian
    motion per item for Brownian plans), so an image does not depend on its batch."""
    x = np.asarray(x)
    if plan.noise == "none":
        return None
    return noise.batched([_noise_for(plan, r, x.shape[1:], x.dtype) for r in rngs])


_TWO_STAGE = ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde")


def sample(plan: Plan, denoise, x, *, rng: np.random.Generator | None = None, noise_sampler=None, callback=None,
           substep_callback=None, model_input=None):
    """Run `plan` from the start latent x (see Plan.start); returns the final k-space latent
    (pass it to Plan.finish for what the reference decodes).

    Randomness comes from `noise_sampler(sigma, sigma_next)` if given, else from `rng`.
    `callback(i, x, sigma, sigma_next, denoised)` runs after each step of plan.sigmas; an array
    it returns replaces x. `substep_callback`, same contract, runs on the intermediate latent of
    two-stage samplers (Heun, DPM2, DPM2 a, DPM++ SDE) before its evaluation, where diffusers'
    4-channel inpainting blends too (sigma_next is the step's target).

    `model_input(x, sigma)`, if given, is the latent the model is evaluated at instead of x
    (A1111's mask_before_denoising); the sampler still steps its own x with the model's
    prediction, i.e. the x0 estimate it gets is moved by x - model_input(x, sigma)."""
    x = np.asarray(x)
    if plan.unet_calls == 0:
        return x.copy()
    kwargs = dict(plan.options)
    if plan.noise != "none":
        if noise_sampler is None:
            if rng is None:
                raise ValueError(f"sampler {plan.name!r} draws noise: pass rng=np.random.Generator(...) "
                                 "or a noise_sampler")
            noise_sampler = _noise_for(plan, rng, x.shape, x.dtype)
        kwargs["noise_sampler"] = noise_sampler
    if plan.sampler == "lcm":
        kwargs["timestep"] = plan.timestep
    if substep_callback is not None and plan.sampler in _TWO_STAGE:
        kwargs["substep"] = substep_callback
    if plan.clip_sample:
        inner, c = denoise, plan.clip_sample

        def denoise(x_, s_):
            return np.clip(inner(x_, s_), -c, c)

    if plan._eps_from_v_at_int_t is not None:
        denoise = _eps_from_v_at_int_t(denoise, plan.timestep, plan._eps_from_v_at_int_t)
    if model_input is not None:
        at_x = denoise

        def denoise(x_, s_):
            x_in = model_input(x_, s_)
            den = at_x(x_in, s_)
            den += x_
            den -= x_in
            return den

    return SAMPLERS[plan.sampler](denoise, x, plan.sigmas, callback=callback, **kwargs)
