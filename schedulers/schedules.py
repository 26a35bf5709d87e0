"""Sigma schedules: one function per schedule, each returning a descending float64 array.

Table-based schedules take the model's ascending sigma table (`table`, index = training timestep
or distilled-table index) and interpolate log-sigma in index space, as k-diffusion's
DiscreteSchedule does. Most schedules end with an appended 0; the ones that end elsewhere say so.
"""

from __future__ import annotations

import math

import numpy as np

from .training import sigma_from_t


def _append_zero(s) -> np.ndarray:
    return np.concatenate([np.asarray(s, np.float64), [0.0]])


def normal(n: int, table: np.ndarray, log_table: np.ndarray | None = None) -> np.ndarray:
    """Uniform in (fractional) timestep from the last entry to the first: k-diffusion's
    get_sigmas(n), A1111 "Uniform"/"Normal", ComfyUI "normal". `log_table`: the log-sigmas to
    interpolate (default log(table))."""
    t = np.linspace(len(table) - 1, 0, n)
    return _append_zero(sigma_from_t(t, np.log(table) if log_table is None else log_table))


def sgm_uniform(n: int, table: np.ndarray, log_table: np.ndarray | None = None) -> np.ndarray:
    """n + 1 uniform timesteps without the last (SGM's discretisation): A1111 "SGM Uniform",
    ComfyUI "sgm_uniform"."""
    t = np.linspace(len(table) - 1, 0, n + 1)[:-1]
    return _append_zero(sigma_from_t(t, np.log(table) if log_table is None else log_table))


def simple(n: int, table: np.ndarray) -> np.ndarray:
    """Every (len/n)-th training sigma from the top: A1111 "Simple", ComfyUI "simple"."""
    stride = len(table) / n
    return _append_zero([table[-(1 + int(i * stride))] for i in range(n)])


def ddim_uniform(n: int, table: np.ndarray) -> np.ndarray:
    """Training sigmas 1, 1 + k, 1 + 2k, ... with k = len // n, reversed (may give more than n
    steps): A1111 "DDIM", ComfyUI "ddim_uniform"."""
    stride = max(len(table) // n, 1)
    return _append_zero(table[1::stride][::-1])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022): uniform in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Uniform in log-sigma."""
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """Polynomial in log-sigma (rho = 1 is `exponential`)."""
    ramp = np.linspace(1, 0, n) ** rho
    lo = math.log(sigma_min)
    return _append_zero(np.exp(ramp * (math.log(sigma_max) - lo) + lo))


def beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta_: float = 0.6) -> np.ndarray:
    """Beta-distribution spacing, continuous in sigma (Lee et al. 2024): A1111 "Beta" and
    diffusers use_beta_sigmas."""
    q = beta_ppf(1 - np.linspace(0, 1, n), alpha, beta_)
    return _append_zero(sigma_min + q * (sigma_max - sigma_min))


def beta_discrete(n: int, table: np.ndarray, alpha: float = 0.6, beta_: float = 0.6) -> np.ndarray:
    """Beta-distribution spacing on training timesteps, repeated timesteps dropped (so possibly
    fewer than n steps): ComfyUI "beta"."""
    q = beta_ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta_)
    ts = np.rint(q * (len(table) - 1)).astype(np.int64)
    keep = np.concatenate([[True], ts[1:] != ts[:-1]])
    return _append_zero(table[ts[keep]])


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """KL-optimal spacing, uniform in arctan(sigma), n + 1 points ending at sigma_min (no 0):
    A1111 "KL Optimal"."""
    w = np.arange(n + 1) / n
    return np.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max))


def kl_optimal_zero(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """KL-optimal spacing with n points from sigma_max to sigma_min, then 0: ComfyUI "kl_optimal"."""
    w = np.arange(n) / max(n - 1, 1)
    return _append_zero(np.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)))


# NVIDIA's "Align Your Steps" 10-step schedule for SD 1.5, log-linearly resampled for other n.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def align_your_steps(n: int, points=AYS_SD15) -> np.ndarray:
    """A1111 "Align Your Steps" (SD 1.x table)."""
    points = np.asarray(points, np.float64)
    if n == len(points):
        return _append_zero(points)
    xs = np.linspace(0, 1, len(points))
    ys = np.log(points[::-1])
    return _append_zero(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1])


def discard_penultimate(sigmas: np.ndarray) -> np.ndarray:
    """Drop the second-to-last sigma (A1111 and ComfyUI do this for DPM2-type samplers, asking
    the schedule for one step more)."""
    return np.concatenate([sigmas[:-2], sigmas[-1:]])


# --------------------------------------------------------------------- Beta distribution ppf
def _betacf(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(x, a, b) / a
    return 1.0 - math.exp(lbt) * _betacf(1.0 - x, b, a) / b


def beta_ppf(p, a: float, b: float) -> np.ndarray:
    """Quantile function of Beta(a, b) (scipy.stats.beta.ppf), by bisection to full precision."""
    out = []
    for q in np.atleast_1d(np.asarray(p, np.float64)):
        if q <= 0.0:
            out.append(0.0)
            continue
        if q >= 1.0:
            out.append(1.0)
            continue
        if a == b and q == 0.5:  # the median of a symmetric Beta, exactly
            out.append(0.5)
            continue
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if beta_cdf(mid, a, b) < q:
                lo = mid
            else:
                hi = mid
        out.append(0.5 * (lo + hi))
    return np.array(out)
