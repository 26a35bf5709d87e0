"""What each sampler and schedule option accepts: one domain per option, checked before a plan is
made, each failure one line naming the option and its domain."""

from __future__ import annotations

import math

import numpy as np

MAX_SEED = 2**63 - 1


def _real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _finite(v) -> bool:
    return _real(v) and math.isfinite(v)


def _whole_in(lo: int, hi: int):
    return lambda v: _whole(v) and lo <= v <= hi, f"a whole number from {lo} to {hi}"


def _one_of(*values):
    return lambda v: isinstance(v, type(values[0])) and v in values, "one of " + ", ".join(map(str, values))


_FINITE = (_finite, "a finite number")
_NON_NEGATIVE = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
_POSITIVE = (lambda v: _finite(v) and v > 0, "a finite number > 0")
_BOOL = (lambda v: isinstance(v, (bool, np.bool_)), "true or false")
_SEED = _whole_in(0, MAX_SEED)

DOMAINS = {
    "eta": _NON_NEGATIVE,
    "s_noise": _FINITE,
    "s_churn": _NON_NEGATIVE,
    "s_tmin": _NON_NEGATIVE,
    "s_tmax": (lambda v: _real(v) and v >= 0, "a number >= 0 (inf for no bound)"),
    "r": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "order": _whole_in(1, 10),
    "uni_pc_order": _whole_in(1, 50),  # A1111's setting
    "uni_pc_variant": _one_of("bh1", "bh2"),
    "rtol": _POSITIVE,
    "atol": _POSITIVE,
    "h_init": _POSITIVE,
    "accept_safety": _POSITIVE,
    "pcoeff": _FINITE,
    "icoeff": _FINITE,
    "dcoeff": _FINITE,
    "sigma_min": _POSITIVE,
    "sigma_max": _POSITIVE,
    "rho": _POSITIVE,
    "beta_alpha": _POSITIVE,
    "beta_beta": _POSITIVE,
    "discard_penultimate_sigma": _BOOL,
    "seed": _SEED,
    "original_inference_steps": _whole_in(1, 100_000),
    # diffusers classes
    "noise_sampler_seed": (lambda v: v is None or _SEED[0](v), f"none or {_SEED[1]}"),
    "steps_offset": _whole_in(0, 100_000),
    "solver_order": _whole_in(1, 10),
    "timestep_scaling": _POSITIVE,
    "clip_sample_range": _POSITIVE,
    "sample_max_value": _POSITIVE,
    "dynamic_thresholding_ratio": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
}
# Where a sampler gives an option another domain.
SAMPLER_DOMAINS = {("dpm_adaptive", "order"): _one_of(2, 3)}


def check(options: dict, sampler: str | None = None, defaults: dict | None = None) -> None:
    """Raise ValueError naming the first option outside its domain. `defaults` (a diffusers
    class's constructor defaults) makes the options whose default is true/false take only those."""
    for key, value in options.items():
        test, accepted = SAMPLER_DOMAINS.get((sampler, key)) or DOMAINS.get(key) or (None, None)
        if test is None and defaults is not None and isinstance(defaults.get(key), bool):
            test, accepted = _BOOL
        if test is not None and not test(value):
            raise ValueError(f"{key} must be {accepted}, got {value!r}")
    check_sigma_range(options.get("sigma_min"), options.get("sigma_max"))


def check_sigma_range(sigma_min, sigma_max) -> None:
    """sigma_max above sigma_min where both are set."""
    if sigma_min is not None and sigma_max is not None and not float(sigma_max) > float(sigma_min):
        raise ValueError(f"sigma_max must be greater than sigma_min, got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r}")
