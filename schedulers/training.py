"""The model's training noise schedule, from a scheduler_config.json dict, and sigma <-> timestep.

Two precisions, because the tools differ and the difference is visible (about 1e-5 in sigma):

- ``"ldm"``: betas, cumulative products and sigmas in float64, as ldm, AUTOMATIC1111 and ComfyUI
  compute them (k-diffusion's DiscreteSchedule then interpolates log-sigma).
- ``"a1111"``: ldm's float64 alpha-bar rounded to float32 (ldm registers it as a float32 buffer),
  and sigmas computed from it in float32, as AUTOMATIC1111's k-diffusion wrappers and timestep
  samplers use them.
- ``"diffusers"``: diffusers' arithmetic: betas from a float32 ``torch.linspace``, ``cumprod`` with
  a float64 accumulator rounded to float32 at every element, sigmas in float32.

Everything returns float64 arrays (in the "diffusers" precision their values are float32 numbers).
"""

from __future__ import annotations

import math

from typing import Any

import numpy as np

# What an SD checkpoint trains with, for configs that leave it out (A1111 and ComfyUI read the
# model's own yaml, where these are the ldm "linear" = diffusers "scaled_linear" values).
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_BETA_SCHEDULE = "scaled_linear"

# Terminal alpha-bar of a zero-terminal-SNR schedule: diffusers uses 2**-24, A1111 and ComfyUI this.
ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)`` (its scalar formula: from both ends)."""
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], np.float32)
    step = np.float32((b - a) / np.float32(n - 1))
    i = np.arange(n)
    head = a + step * i.astype(np.float32)
    tail = b - step * (n - 1 - i).astype(np.float32)
    return np.where(i < n // 2, head, tail).astype(np.float32)


def _alpha_bar_cosine(n: int, max_beta: float = 0.999) -> np.ndarray:
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], np.float64)


def betas(config: dict, precision: str = "ldm") -> np.ndarray:
    """The training betas the config describes (float64 array; float32 values for "diffusers")."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        out = np.asarray(trained, np.float64)
        return out.astype(np.float32).astype(np.float64) if precision == "diffusers" else out
    kind = config.get("beta_schedule", SD_BETA_SCHEDULE)
    start = float(config.get("beta_start", SD_BETA_START))
    end = float(config.get("beta_end", SD_BETA_END))
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {kind!r} is not supported; use one of {', '.join(BETA_SCHEDULES)}")
    if precision == "diffusers":
        if kind == "linear":
            out = _linspace_f32(start, end, n)
        elif kind == "scaled_linear":
            out = _linspace_f32(start**0.5, end**0.5, n) ** 2
        else:
            out = _alpha_bar_cosine(n).astype(np.float32)
        return out.astype(np.float64)
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    return _alpha_bar_cosine(n)


def _cumprod_f32(alphas32: np.ndarray) -> np.ndarray:
    """torch.cumprod on float32 (CPU): float64 running product, each element rounded to float32."""
    return np.cumprod(alphas32.astype(np.float64)).astype(np.float32)


def _rescale_zero_snr(alphas_cumprod: np.ndarray, dtype) -> np.ndarray:
    """Zero terminal SNR (Lin et al. 2023, algorithm 1) on alpha-bar; returns the new alpha-bar."""
    r = np.sqrt(alphas_cumprod.astype(dtype)).astype(dtype)
    r0, rt = r[0], r[-1]
    r = ((r - rt) * (r0 / (r0 - rt))).astype(dtype)
    return (r * r).astype(dtype)


def alphas_cumprod(config: dict, precision: str = "ldm") -> np.ndarray:
    """alpha-bar_t for t = 0 .. T-1 (float64 array), zero-terminal-SNR rescaled if the config says so."""
    b = betas(config, precision)
    zsnr = bool(config.get("rescale_betas_zero_snr", False))
    if precision == "diffusers":
        b32 = b.astype(np.float32)
        ac = _cumprod_f32(np.float32(1) - b32)
        if zsnr:  # diffusers rescales the betas and multiplies them out again
            abar = _rescale_zero_snr(ac, np.float32)
            alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]]).astype(np.float32)
            b32 = (np.float32(1) - alphas).astype(np.float32)
            ac = _cumprod_f32(np.float32(1) - b32)
            ac[-1] = np.float32(2.0**-24)
        return ac.astype(np.float64)
    ac = np.cumprod(1.0 - b)
    if zsnr:
        ac = _rescale_zero_snr(ac, np.float64)
        ac[-1] = ZSNR_LAST_ALPHA_BAR
    if precision == "a1111":
        ac = ac.astype(np.float32).astype(np.float64)
    return ac


def sigmas_from_alphas_cumprod(ac: np.ndarray, precision: str = "ldm") -> np.ndarray:
    """k-diffusion sigma of each training timestep: sqrt((1 - ac) / ac), ascending in t."""
    if precision in ("diffusers", "a1111"):
        a = ac.astype(np.float32)
        return np.sqrt((np.float32(1) - a) / a).astype(np.float64)
    return np.sqrt((1.0 - ac) / ac)


def distilled_table(sigmas: np.ndarray, original_steps: int = 50) -> tuple[np.ndarray, int]:
    """The sigma table of an LCM-distilled model (A1111's LCM denoiser, ComfyUI's "lcm" sampling):
    every (T // original_steps)-th training sigma, ending at t = T - 1. Returns (table, stride);
    entry i is timestep i * stride + stride - 1."""
    n = len(sigmas)
    stride = n // original_steps
    idx = n - 1 - stride * np.arange(original_steps)[::-1]
    return sigmas[idx], stride


# ------------------------------------------------------------------------------ sigma <-> t
# `log_sigmas` is ascending (index = training timestep, or table index for a distilled table).


def t_from_sigma(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional index by interpolation in log-sigma (k-diffusion's DiscreteSchedule.sigma_to_t,
    diffusers' _sigma_to_t): the last entry <= log(sigma), capped one below the end, then a
    clamped linear weight towards the next entry."""
    ls = math.log(max(float(sigma), 1e-10))
    low = int(np.searchsorted(log_sigmas, ls, side="right")) - 1
    low = min(max(low, 0), len(log_sigmas) - 2)
    lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
    w = min(max((lo - ls) / (lo - hi), 0.0), 1.0)
    return (1.0 - w) * low + w * (low + 1)


def t_from_sigmas(sigmas, log_sigmas: np.ndarray) -> np.ndarray:
    """`t_from_sigma` over an array."""
    return np.array([t_from_sigma(s, log_sigmas) for s in np.asarray(sigmas, np.float64).ravel()])


def sigma_from_t(t, log_sigmas: np.ndarray):
    """Inverse of `t_from_sigma`: exp of the linear interpolation of log-sigma (t clamped to the table)."""
    t = np.clip(np.asarray(t, np.float64), 0, len(log_sigmas) - 1)
    lo = np.floor(t).astype(np.int64)
    hi = np.ceil(t).astype(np.int64)
    w = t - lo
    return np.exp((1.0 - w) * log_sigmas[lo] + w * log_sigmas[hi])


def index_nearest(sigma: float, log_sigmas: np.ndarray) -> int:
    """Index of the table entry nearest in log-sigma (ComfyUI's ModelSamplingDiscrete.timestep)."""
    return int(np.abs(math.log(float(sigma)) - log_sigmas).argmin())


def sigma_from_t_vp(t, alphas_cumprod: np.ndarray):
    """Sigma at a fractional timestep when log(alpha) is interpolated linearly in t, as the
    original UniPC/DPM-Solver NoiseScheduleVP('discrete') does (A1111's UniPC)."""
    log_alpha = 0.5 * np.log(alphas_cumprod)
    t = np.clip(np.asarray(t, np.float64), 0, len(log_alpha) - 1)
    lo = np.floor(t).astype(np.int64)
    hi = np.minimum(lo + 1, len(log_alpha) - 1)
    la = log_alpha[lo] + (t - lo) * (log_alpha[hi] - log_alpha[lo])
    return np.sqrt(np.expm1(-2.0 * la))


def check_training_schedule(values: dict[str, Any], steps: Any = None) -> str | None:
    """What is wrong with a training noise schedule's settings (num_train_timesteps, trained_betas,
    beta_start, beta_end), or None. `steps`: num_train_timesteps where it is set elsewhere."""
    n = values.get("num_train_timesteps", steps)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 100_000):
        return f"num_train_timesteps must be a whole number from 2 to 100000, got {n!r}"
    for key in ("beta_start", "beta_end"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not 0 < v < 1):
            return f"{key} must be a number between 0 and 1 (exclusive), got {v!r}"
    lo, hi = values.get("beta_start"), values.get("beta_end")
    if lo is not None and hi is not None and not lo < hi:
        return f"beta_start must be below beta_end, got beta_start={lo!r}, beta_end={hi!r}"
    betas = values.get("trained_betas")
    if hasattr(betas, "tolist"):  # a NumPy array
        betas = betas.tolist()
    if betas is not None:
        if not isinstance(betas, (list, tuple)) or len(betas) < 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 < b < 1 for b in betas):
            shown = repr(betas) if len(repr(betas)) < 60 else repr(betas)[:57] + "..."
            return f"trained_betas must be a list of at least 2 numbers between 0 and 1 (exclusive), got {shown}"
        if isinstance(n, int) and len(betas) != n:
            return f"trained_betas has {len(betas)} values but num_train_timesteps is {n}; give one beta per timestep"
    return None
