"""What a diffusers scheduler class computes, as a k-space run for `sdrt.schedulers.sample`.

`build(cls, config, steps, t_start)` reproduces ``Cls.from_config(config)``, ``set_timesteps``
and an img2img pipeline starting at step index ``t_start`` (``get_timesteps`` with strength,
``set_begin_index(t_start * order)``): which sigmas the run visits, the timestep diffusers feeds
the UNet at each of them, the per-step details of its update (orders, midpoints, DDIM targets)
and how its start latent and final latent relate to k-space. No torch: float32 arithmetic is
reproduced with NumPy float32 where diffusers computes in float32.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

import numpy as np

from . import schedules
from .samplers import plms_weights
from .training import alphas_cumprod, check_training_schedule, sigmas_from_alphas_cumprod, t_from_sigmas

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
_SIGMA_OPTS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
_THRESH = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}

# Constructor defaults of each class (diffusers 0.3x-0.4x), i.e. what from_config falls back to.
DEFAULTS: dict[str, dict] = {
    "EulerDiscreteScheduler": {
        **_COMMON, **_SIGMA_OPTS, "interpolation_type": "linear", "sigma_min": None, "sigma_max": None,
        "timestep_type": "discrete", "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {**_COMMON, "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {**_COMMON, **_SD_BETAS, **_SIGMA_OPTS, "clip_sample": False, "clip_sample_range": 1.0},
    "KDPM2DiscreteScheduler": {**_COMMON, **_SD_BETAS, **_SIGMA_OPTS},
    "KDPM2AncestralDiscreteScheduler": {**_COMMON, **_SD_BETAS, **_SIGMA_OPTS},
    "LMSDiscreteScheduler": {**_COMMON, **_SIGMA_OPTS},
    "DPMSolverMultistepScheduler": {
        **_COMMON, **_SIGMA_OPTS, **_THRESH, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "variance_type": None, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "DPMSolverSDEScheduler": {**_COMMON, **_SD_BETAS, **_SIGMA_OPTS, "noise_sampler_seed": None},
    "DDIMScheduler": {
        **_COMMON, **_THRESH, "clip_sample": True, "set_alpha_to_one": True, "clip_sample_range": 1.0,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "UniPCMultistepScheduler": {
        **_COMMON, **_SIGMA_OPTS, **_THRESH, "solver_order": 2, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_flow_sigmas": False,
        "flow_shift": 1.0, "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential", "sigma_min": None, "sigma_max": None,
        "shift_terminal": None,
    },
    "LCMScheduler": {
        **_COMMON, **_SD_BETAS, **_THRESH, "beta_schedule": "scaled_linear", "original_inference_steps": 50,
        "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True, "timestep_spacing": "leading",
        "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
    },
}

# What each class's step does, as an sdrt sampler; "vp": the class keeps latents in the VP
# parameterisation (its start noise is N(0, 1) and its final latent is not in k-space).
KIND = {
    "EulerDiscreteScheduler": ("euler", False),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", False),
    "HeunDiscreteScheduler": ("heun", False),
    "KDPM2DiscreteScheduler": ("dpm_2", False),
    "KDPM2AncestralDiscreteScheduler": ("dpm_2_ancestral", False),
    "LMSDiscreteScheduler": ("lms", False),
    "DPMSolverMultistepScheduler": ("dpmpp_multistep", True),
    "DPMSolverSDEScheduler": ("dpmpp_sde", False),
    "DDIMScheduler": ("ddim", True),
    "PNDMScheduler": ("plms", True),
    "UniPCMultistepScheduler": ("unipc", True),
    "LCMScheduler": ("lcm", True),
}

def parse_name(text: str) -> tuple[str, dict]:
    """"Cls" or "Cls(opt=value, ...)" -> (Cls, options). Values are Python literals; bare words
    are strings, true/false/none are accepted in any case."""
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", text, flags=re.S)
    if not m:
        raise ValueError(f"cannot read scheduler name {text!r}")
    cls, args = m.group(1), (m.group(2) or "").strip()
    opts: dict = {}
    for part in _split_args(args):
        if "=" not in part:
            raise ValueError(f"scheduler option {part!r} in {text!r} is not of the form name=value")
        key, value = (p.strip() for p in part.split("=", 1))
        opts[key] = _literal(value)
    return cls, opts


def _split_args(args: str) -> list[str]:
    parts, depth, quote, cur = [], 0, None, ""
    for ch in args:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in (q.strip() for q in parts) if p]


def _literal(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value.strip("'\"")


def merged_config(cls: str, model_config: dict, options: dict) -> dict:
    """``Cls.from_config(model_config, **options).config``: class defaults, overridden by the keys of
    the model config the class knows, overridden by options (unknown options are an error)."""
    cfg = dict(DEFAULTS[cls])
    for k, v in (model_config or {}).items():
        if k in cfg:
            cfg[k] = v
    unknown = sorted(set(options) - set(cfg))
    if unknown:
        raise ValueError(f"{cls} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(cfg))}")
    cfg.update(options)
    problem = check_training_schedule(cfg)
    if problem:
        raise ValueError(f"{cls}: {problem}")
    _check_supported(cls, cfg)
    return cfg


def _check_supported(cls: str, cfg: dict) -> None:
    def no(key, why="is not supported"):
        raise ValueError(f"{cls}: {key}={cfg[key]!r} {why}")

    if cfg.get("thresholding"):
        no("thresholding", "(dynamic thresholding, for pixel-space models) is not supported")
    if cfg.get("use_flow_sigmas"):
        no("use_flow_sigmas", "(flow-matching models) is not supported")
    if cfg.get("use_dynamic_shifting"):
        no("use_dynamic_shifting")
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        no("prediction_type", "is not supported: use epsilon or v_prediction")
    if cfg["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        no("timestep_spacing", "is not one of linspace, leading, trailing")
    if sum(bool(cfg.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
        raise ValueError(f"{cls}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
    if cls == "DPMSolverMultistepScheduler":
        if cfg["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++"):
            no("algorithm_type", "is not supported: use dpmsolver++ or sde-dpmsolver++")
        if cfg["solver_type"] not in ("midpoint", "heun"):
            no("solver_type", "is not one of midpoint, heun")
        if cfg["solver_order"] not in (1, 2, 3):
            no("solver_order", "is not 1, 2 or 3")
        if cfg["variance_type"] is not None:
            no("variance_type")
    if cls == "UniPCMultistepScheduler":
        if not cfg["predict_x0"]:
            no("predict_x0", "is not supported (UniPC runs in data prediction)")
        if cfg["solver_p"] is not None:
            no("solver_p")
        if cfg["solver_type"] not in ("bh1", "bh2"):
            no("solver_type", "is not one of bh1, bh2")
        if cfg["shift_terminal"]:
            no("shift_terminal")
    if cls == "PNDMScheduler" and not cfg["skip_prk_steps"]:
        no("skip_prk_steps", "(PNDM's Runge-Kutta warm-up) is not supported: pass skip_prk_steps=True "
                             "as Stable Diffusion's scheduler config does")
    if cls == "EulerDiscreteScheduler" and cfg["interpolation_type"] not in ("linear", "log_linear"):
        no("interpolation_type", "is not one of linear, log_linear")
    if cfg.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        no("final_sigmas_type", "is not one of zero, sigma_min")


@dataclass
class Run:
    """A diffusers run in k-space (see `build`)."""

    sigmas: np.ndarray                 # levels visited; last = final
    timesteps: dict                    # sigma -> timestep fed to the UNet
    sampler: str
    options: dict = field(default_factory=dict)
    noise: str = "none"                # none | randn | brownian
    brownian_range: tuple | None = None
    start_sigma: float = 0.0           # img2img noise level (add_noise at the first step)
    txt2img_scale: float = 1.0         # noise multiplier for a txt2img start in k-space
    finish_scale: float = 1.0          # k-space -> the latent diffusers decodes
    clip_sample: float | None = None
    log_sigmas: np.ndarray | None = None  # for timesteps of other sigmas (log-sigma interpolation)
    unet_calls: int = 0


def _f32(a) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def _leading(cfg, n, ratio, points=None):
    """The offset timesteps (arange(points) * ratio + steps_offset) of "leading" spacing, checked
    to stay below num_train_timesteps."""
    T, off = cfg["num_train_timesteps"], cfg["steps_offset"]
    top = (n if points is None else points) - 1
    if top * ratio + off > T - 1:
        raise ValueError(f"steps_offset must be from 0 to {max(T - 1 - top * ratio, 0)} for {n} steps "
                         f"(timesteps below num_train_timesteps {T}), got {off}")


def _spacing_k(cfg, n, dtype):
    """Timesteps of the k-diffusion-type classes (Euler, Heun, KDPM2, LMS, DPMSolverSDE)."""
    T, sp, off = cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"]
    if sp == "linspace":
        return np.linspace(0, T - 1, n, dtype=dtype)[::-1].copy()
    if sp == "leading":
        ratio = T // n
        _leading(cfg, n, ratio)
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(dtype) + dtype(off)
    ratio = T / n
    return np.arange(T, 0, -ratio).round().copy().astype(dtype) - dtype(1)


def _spacing_multistep(cfg, n, last):
    """Integer timesteps of DPMSolverMultistep and UniPC (n + 1 points, the last dropped)."""
    T, sp, off = cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"]
    if sp == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if sp == "leading":
        ratio = last // (n + 1)
        _leading(cfg, n, ratio, n)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + off
    ratio = T / n
    return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1


def _spacing_ddim(cfg, n):
    T, sp, off = cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"]
    if n > T:
        raise ValueError(f"steps ({n}) cannot exceed num_train_timesteps ({T})")
    if sp == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if sp == "leading":
        ratio = T // n
        _leading(cfg, n, ratio)
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + off
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def _spacing_pndm(cfg, n):
    """PNDM's ascending _timesteps."""
    T, sp, off = cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"]
    if sp == "linspace":
        return np.linspace(0, T - 1, n).round().astype(np.int64)
    if sp == "leading":
        ratio = T // n
        _leading(cfg, n, ratio)
        return ((np.arange(0, n) * ratio).round() + off).astype(np.int64)
    return np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1


def _bounds(cfg, sigmas, use_config=True):
    smin = cfg.get("sigma_min") if use_config else None
    smax = cfg.get("sigma_max") if use_config else None
    smin = float(sigmas[-1]) if smin is None else float(smin)
    smax = float(sigmas[0]) if smax is None else float(smax)
    return smin, smax


def _converted(cfg, sigmas, n, use_config=True):
    """use_karras/exponential/beta_sigmas on the interpolated sigmas (None if none is set)."""
    smin, smax = _bounds(cfg, sigmas, use_config)
    if cfg.get("use_karras_sigmas"):
        return schedules.karras(n, smin, smax)[:-1]
    if cfg.get("use_exponential_sigmas"):
        return schedules.exponential(n, smin, smax)[:-1]
    if cfg.get("use_beta_sigmas"):
        return schedules.beta(n, smin, smax)[:-1]
    return None


# DDIM and LCM keep alpha-bar_T = 0 under zero-terminal-SNR rescaling (the others raise it to
# 2**-24): an infinite sigma, which k-space stands in for by this one. At it the UNet input
# x / sqrt(sigma^2 + 1) is the VP latent to 1e-12 and a v-prediction gives x0 = -v to 1e-24.
TERMINAL_SIGMA = 1e12


def _table(cfg, cls=None):
    ac = alphas_cumprod(cfg, "diffusers")
    if cls in ("DDIMScheduler", "LCMScheduler") and cfg.get("rescale_betas_zero_snr"):
        ac = ac.copy()
        ac[-1] = 0.0
    with np.errstate(divide="ignore"):
        sig = sigmas_from_alphas_cumprod(ac, "diffusers")
    sig = np.minimum(sig, TERMINAL_SIGMA)
    return ac, sig, np.log(sig.astype(np.float32)).astype(np.float64)


def _init_noise_sigma(cfg, sigmas_full) -> float:
    smax = float(np.max(sigmas_full))
    return smax if cfg["timestep_spacing"] in ("linspace", "trailing") else float(np.float32(math.sqrt(smax**2 + 1)))


def _tmap(sigmas, timesteps) -> dict:
    return {float(s): float(t) for s, t in zip(sigmas, timesteps)}


def _k_schedule(cls, cfg, n, sig_table, log_sigmas):
    """sigmas (with the final entry) and timesteps of the k-type classes."""
    sde = cls == "DPMSolverSDEScheduler"
    ts = _spacing_k(cfg, n, np.float64 if sde else np.float32)
    sigmas = np.interp(ts, np.arange(len(sig_table)), sig_table.astype(np.float32))
    if cls == "EulerDiscreteScheduler" and cfg["interpolation_type"] == "log_linear":
        sigmas = np.exp(np.linspace(np.log(np.float32(sig_table[-1])), np.log(np.float32(sig_table[0])),
                                    n + 1, dtype=np.float32)).astype(np.float64)
    if cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        conv = _converted(cfg, sigmas, n, use_config=cls == "EulerDiscreteScheduler")
        if conv is not None:
            sigmas, ts = conv, t_from_sigmas(conv, log_sigmas)
    else:  # LMS, KDPM2, KDPM2Ancestral, DPMSolverSDE: from the ends of the interpolated sigmas
        conv = _converted(cfg, sigmas, n, use_config=False)
        if conv is not None:
            sigmas, ts = conv, t_from_sigmas(conv, log_sigmas)
            if cfg.get("use_karras_sigmas") and cls in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
                ts = ts.round()  # KDPM2 rounds its Karras timesteps only
    last = 0.0
    if cfg.get("final_sigmas_type") == "sigma_min":
        last = float(sig_table[0])
    sig_f = _f32(np.concatenate([sigmas, [last]]))
    ts = np.asarray(ts, np.float64 if sde else np.float32).astype(np.float64)
    continuous = cfg.get("timestep_type") == "continuous" and cfg["prediction_type"] == "v_prediction"
    if cls == "EulerDiscreteScheduler" and continuous:  # EDM-style v models: t = log(sigma) / 4
        ts = _f32(0.25 * np.log(sig_f[:-1].astype(np.float32)))
    return sig_f, ts


def _dpm_multistep_schedule(cls, cfg, n, ac, sig_table, log_sigmas):
    T = cfg["num_train_timesteps"]
    last = T
    if cls == "DPMSolverMultistepScheduler":
        a32 = ac.astype(np.float32)
        lam = (np.log(np.sqrt(a32)) - np.log(np.sqrt(np.float32(1) - a32))).astype(np.float32)
        clipped = int(np.searchsorted(lam[::-1], cfg["lambda_min_clipped"]))
        last = T - clipped
    ts = _spacing_multistep(cfg, n, last)
    flipped = sig_table[::-1]
    rounded = cfg["beta_schedule"] != "squaredcos_cap_v2"
    unipc = cls == "UniPCMultistepScheduler"
    converted = any(cfg.get(k) for k in _SIGMA_OPTS)
    if converted:  # only UniPC has sigma_min / sigma_max options
        sigmas = _converted(cfg, flipped, n, use_config=unipc)
        ts = t_from_sigmas(sigmas, log_sigmas)
        ts = ts.round() if cfg.get("use_karras_sigmas") and (rounded or unipc) else ts
    elif cfg.get("use_lu_lambdas"):  # uniform in log-sigma over the whole table
        sigmas = np.exp(np.linspace(float(np.log(flipped[0])), float(np.log(flipped[-1])), n))
        ts = t_from_sigmas(sigmas, log_sigmas)
        ts = ts.round() if rounded else ts
    else:
        sigmas = np.interp(ts, np.arange(len(sig_table)), sig_table.astype(np.float32))
    final = 0.0
    if cfg["final_sigmas_type"] == "sigma_min":
        final = float(sigmas[-1]) if unipc and converted else float(sig_table[0])
    return _f32(np.concatenate([sigmas, [final]])), np.asarray(ts, np.int64).astype(np.float64)


def _add_midpoints(table: dict, mids: np.ndarray, ts) -> np.ndarray:
    """Enter midpoint sigmas and their timesteps in the timestep table. diffusers gives a
    midpoint its own timestep even where it equals a step's sigma (KDPM2Ancestral: the
    midpoint of sigma and sigma_down is sigma_next); such a midpoint moves up by a few ulps
    so that the table tells the two evaluations apart."""
    out = np.array(mids, np.float64)
    for i, (m, t) in enumerate(zip(out, ts)):
        m, t = float(m), float(t)
        while table.get(m, t) != t:
            m = float(np.nextafter(m, np.inf))
        out[i] = m
        table[m] = t
    return out


def _dpm2_midpoints(sig_full, ancestral):
    """KDPM2's sigmas_interpol per step (float32): the log-midpoint of sigma and sigma_next, or
    for the ancestral variant of sigma and sigma_down; 0 on the step to sigma = 0."""
    s32 = sig_full.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if ancestral:
            nxt = s32[1:]
            up = np.sqrt(nxt**2 * (s32[:-1] ** 2 - nxt**2) / s32[:-1] ** 2)
            ld = np.log(np.sqrt(nxt**2 - up**2))
            mids = np.exp(ld - (ld - np.log(s32[:-1])) * np.float32(0.5))
        else:
            mids = np.exp(np.log(s32[:-1]) - (np.log(s32[:-1]) - np.log(s32[1:])) * np.float32(0.5))
    mids = mids.astype(np.float64)
    mids[-1] = 0.0
    return mids


def _vp_sigma(ac, t) -> float:
    a = float(np.float32(ac[int(t)]))
    return math.sqrt((1.0 - a) / a) if a > 0 else TERMINAL_SIGMA


def build(cls: str, cfg: dict, n: int, t_start: int) -> Run:
    """The run of `cls` (with merged config `cfg`) for n steps, img2img from step index t_start."""
    if n < 1:
        raise ValueError("steps must be at least 1")
    kind, vp = KIND[cls]
    ac, sig_table, log_sigmas = _table(cfg, cls)
    pred = cfg["prediction_type"]

    if kind in ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_sde"):
        if kind == "euler_ancestral":
            cfg = {**cfg, **{k: False for k in _SIGMA_OPTS}}
        sig_full, ts = _k_schedule(cls, cfg, n, sig_table, log_sigmas)
        sig = sig_full[t_start:]
        if cls == "EulerDiscreteScheduler" and cfg["interpolation_type"] == "log_linear":
            sig = sig_full[t_start : n + 1]  # n + 1 sigmas, n timesteps: it stops at the smallest
        run = Run(sig, _tmap(sig_full[:-1], ts), kind, log_sigmas=log_sigmas, start_sigma=float(sig[0]),
                  txt2img_scale=_init_noise_sigma(cfg, sig_full))
        steps = len(sig) - 1
        run.unet_calls = steps
        if kind == "euler_ancestral":
            run.options = {"eta": 1.0}
            run.noise = "randn"
        elif kind == "heun":
            run.unet_calls = 2 * steps - (1 if steps and sig[-1] == 0 else 0)
            if cfg["clip_sample"]:
                run.clip_sample = float(cfg["clip_sample_range"])
        elif kind in ("dpm_2", "dpm_2_ancestral"):
            mids = _dpm2_midpoints(sig_full, ancestral=kind == "dpm_2_ancestral")
            if kind == "dpm_2_ancestral":
                run.options = {"eta": 1.0}
                run.noise = "randn"
            mids[:-1] = _add_midpoints(run.timesteps, mids[:-1], _f32(t_from_sigmas(mids[:-1], log_sigmas)))
            run.options["sigmas_mid"] = mids[t_start:]
            run.unet_calls = 2 * steps - 1 if steps else 0
        elif kind == "lms":
            run.options = {"prior_sigmas": sig_full[:t_start]}
        elif kind == "dpmpp_sde":
            s = sig_full[:-1]
            t = -np.log(s)
            t_prop = t[:-1] + np.diff(t) * 0.5
            mid_ts = t_from_sigmas(np.exp(-t_prop), log_sigmas)
            s32 = s.astype(np.float32)
            t32 = -np.log(s32)
            mids = np.exp(-(t32[:-1] + (t32[1:] - t32[:-1]) * np.float32(0.5))).astype(np.float64)
            mids = np.concatenate([_add_midpoints(run.timesteps, mids, mid_ts), [0.0]])
            run.options = {"sigmas_mid": mids[t_start:], "eta": 1.0}
            run.noise = "brownian"
            pos = sig_full[sig_full > 0]
            run.brownian_range = (float(pos.min()), float(sig_full.max()))
            run.unet_calls = 2 * steps - 1 if steps else 0
        return run

    if kind == "dpmpp_multistep" or kind == "unipc":
        sig_full, ts = _dpm_multistep_schedule(cls, cfg, n, ac, sig_table, log_sigmas)
        N = len(ts)
        sig = sig_full[t_start:]
        run = Run(sig, _tmap(sig_full[:-1], ts), kind, log_sigmas=log_sigmas, start_sigma=float(sig[0]),
                  txt2img_scale=math.sqrt(1.0 + float(sig_full[0]) ** 2),
                  finish_scale=1.0 / math.sqrt(1.0 + float(sig_full[-1]) ** 2))
        so = int(cfg["solver_order"])
        orders = []
        for j in range(len(sig) - 1):
            i = t_start + j
            done = min(j, so)
            if kind == "unipc":
                o = min(so, N - i) if cfg["lower_order_final"] else so
                orders.append(min(o, done + 1))
                continue
            lof = i == N - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and N < 15)
                                  or cfg["final_sigmas_type"] == "zero")
            los = i == N - 2 and cfg["lower_order_final"] and N < 15
            if so == 1 or done < 1 or lof:
                orders.append(1)
            elif so == 2 or done < 2 or los:
                orders.append(2)
            else:
                orders.append(3)
        run.unet_calls = len(sig) - 1
        if kind == "unipc":
            skip = set(int(v) for v in (cfg["disable_corrector"] or []))
            run.options = {"variant": cfg["solver_type"], "order": so, "orders": orders,
                           "correct": [(t_start + j) not in skip for j in range(len(sig) - 1)]}
        else:
            sde = cfg["algorithm_type"] == "sde-dpmsolver++"
            run.options = {"order": so, "orders": orders, "solver_type": cfg["solver_type"], "eta": 1.0 if sde else 0.0,
                           "d2_shift": 1.0 if sde else 0.0}
            run.noise = "randn" if sde else "none"
        return run

    if kind == "ddim":
        T = cfg["num_train_timesteps"]
        ts = _spacing_ddim(cfg, n)
        ratio = T // n
        final = 0.0 if cfg["set_alpha_to_one"] else _vp_sigma(ac, 0)
        labels = np.array([_vp_sigma(ac, t) for t in ts])
        to = np.array([_vp_sigma(ac, t - ratio) if t - ratio >= 0 else final for t in ts])
        sig = np.concatenate([labels[t_start:], to[-1:]])
        run = Run(sig, _tmap(labels, ts), "ddim", start_sigma=float(sig[0]),
                  txt2img_scale=math.sqrt(1.0 + labels[0] ** 2), finish_scale=1.0 / math.sqrt(1.0 + to[-1] ** 2))
        run.options = {"sigmas_to": to[t_start:]}
        if cfg["clip_sample"]:
            run.options["clip_sample"] = float(cfg["clip_sample_range"])
        run.unet_calls = len(sig) - 1
        return run

    if kind == "plms":
        T = cfg["num_train_timesteps"]
        r = T // n
        base = _spacing_pndm(cfg, n)
        calls = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1][t_start:]
        m = len(calls)
        final_sigma = 0.0 if cfg["set_alpha_to_one"] else _vp_sigma(ac, 0)

        def vs(t):
            return _vp_sigma(ac, t) if t >= 0 else final_sigma

        labels = [vs(t) for t in calls]
        s_from, s_to = [], []
        for j, c in enumerate(calls):
            tt, pv = (c + r, c) if j == 1 else (c, c - r)
            s_from.append(vs(tt) if tt < T else vs(T - 1))
            s_to.append(vs(pv))
        sig = np.array(labels + [s_to[-1]]) if m else np.array([0.0])
        run = Run(sig, _tmap(labels, calls), "plms", start_sigma=float(sig[0]),
                  txt2img_scale=math.sqrt(1.0 + float(sig[0]) ** 2),
                  finish_scale=1.0 / math.sqrt(1.0 + float(sig[-1]) ** 2))
        run.options = {"weights": plms_weights(m), "bases": [0 if j == 1 else j for j in range(m)],
                       "sigmas_from": s_from, "sigmas_to": s_to, "combine": "v" if pred == "v_prediction" else "eps"}
        run.unet_calls = m
        return run

    # LCM
    T = cfg["num_train_timesteps"]
    orig = int(cfg["original_inference_steps"])
    if orig > T:
        raise ValueError(f"original_inference_steps ({orig}) cannot exceed num_train_timesteps ({T})")
    if n > orig:
        raise ValueError(f"LCMScheduler: steps ({n}) cannot exceed original_inference_steps ({orig})")
    k = T // orig
    origin = (np.arange(1, orig + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    ts = origin[idx]
    labels = np.array([_vp_sigma(ac, t) for t in ts])
    sig = np.concatenate([labels[t_start:], [0.0]])
    run = Run(sig, _tmap(labels, ts), "lcm", start_sigma=float(sig[0]), txt2img_scale=math.sqrt(1.0 + labels[0] ** 2))
    run.options = {"timestep_scaling": float(cfg["timestep_scaling"]), "vp": True}
    run.noise = "randn"
    if cfg["clip_sample"]:
        run.clip_sample = float(cfg["clip_sample_range"])
    run.unet_calls = len(sig) - 1
    return run
