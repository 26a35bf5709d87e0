"""Samplers: one pure function per sampler, in k-diffusion space (x = x0 + sigma * eps).

Every sampler has the signature ``sample_xxx(denoise, x, sigmas, *, callback=None, ...)``:

- ``denoise(x, sigma) -> x0 estimate`` returns a new array (the sampler may keep and modify it);
- ``x`` is the start latent at ``sigmas[0]`` (not modified: the sampler works on a copy);
- ``sigmas`` lists the noise levels the run visits, descending, the last one final;
- ``callback(i, x, sigma, sigma_next, denoised)`` runs after step i; an array it returns replaces
  x. The x it receives is the sampler's working buffer: copy it to keep it.
- ``noise_sampler(sigma, sigma_next) -> array`` supplies all randomness (ancestral/SDE samplers).
- two-stage samplers also take ``substep``, a callback with the same signature run on the
  intermediate latent before its evaluation (diffusers' inpainting blends there, as its
  interleaved schedulers make that a step of their own).

Arithmetic keeps x's dtype (coefficients are Python floats) and updates x in place.
Where a reference tool computes an intermediate noise level in its own way, the caller can pass
it (``sigmas_mid``), so that the denoiser sees exactly the reference's sigma and timestep.
"""

from __future__ import annotations

import math

import numpy as np


def _done(callback, i, x, sigma, sigma_next, denoised):
    if callback is None:
        return x
    out = callback(i, x, sigma, sigma_next, denoised)
    return x if out is None else out


def _own(den, x):
    """The denoiser's output, as an array the sampler may modify (never x itself)."""
    return den.copy() if den is x else den


def _toward(x, den, c, buf):
    """x <- x + c * (x - den), in place (an Euler step with dt / sigma = c)."""
    np.subtract(x, den, out=buf)
    buf *= c
    x += buf
    return x


def _log_mid(a: float, b: float) -> float:
    """exp(lerp(log a, log b, 1/2)), as torch's lerp computes it."""
    la, lb = math.log(a), math.log(b)
    return math.exp(lb - (lb - la) * 0.5)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: deterministic target and added-noise level."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _churn(x, sigma, sigma_next, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras et al.'s stochastic churn: raise the noise level to sigma_hat before the step."""
    if not s_churn > 0 or not s_tmin <= sigma <= s_tmax:
        return sigma
    gamma = min(s_churn / n, 2**0.5 - 1)
    sigma_hat = sigma * (gamma + 1)
    x += noise_sampler(sigma, sigma_next) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
    return sigma_hat


# --------------------------------------------------------------------------- first order
def sample_euler(denoise, x, sigmas, *, callback=None, noise_sampler=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=math.inf, s_noise=1.0):
    """Euler (Karras et al. 2022, algorithm 2 with optional churn). DDIM with eta = 0 is this."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    n = len(sigmas) - 1
    for i in range(n):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        s_hat = _churn(x, s, sn, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        den = _own(denoise(x, s_hat), x)
        _toward(x, den, (sn - s_hat) / s_hat, buf)
        x = _done(callback, i, x, s, sn, den)
    return x


def sample_euler_ancestral(denoise, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """Euler steps to sigma_down, then fresh noise up to sigma_next."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        sd, su = ancestral_step(s, sn, eta)
        _toward(x, den, (sd - s) / s, buf)
        if sn > 0 and su > 0:
            x += noise_sampler(s, sn) * (s_noise * su)
        x = _done(callback, i, x, s, sn, den)
    return x


def sample_ddim(denoise, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, sigmas_to=None,
                clip_sample=None):
    """DDIM (Song et al. 2021) in k-space: x0 + sigma_down * eps + sigma_up * noise, where
    (sigma_down, sigma_up) is the ancestral split of eta (eta = 0: an Euler step).

    ``sigmas_to[i]`` is where step i lands when that differs from the next evaluation level
    ``sigmas[i + 1]`` (diffusers steps to t - T // n whatever the spacing); the latent is then
    carried over unchanged in the VP parameterisation, i.e. rescaled in k-space.
    ``clip_sample`` clips x0 but not the eps used for the direction (diffusers' default)."""
    x = np.array(x, copy=True)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        st = sn if sigmas_to is None else float(sigmas_to[i])
        den = _own(denoise(x, s), x)
        x0 = np.clip(den, -clip_sample, clip_sample) if clip_sample else den
        su = eta * st * math.sqrt(max(s * s - st * st, 0.0)) / s if eta else 0.0
        sd = math.sqrt(max(st * st - su * su, 0.0))
        np.subtract(x, den, out=x)
        x *= sd / s
        x += x0
        if eta > 0:
            x += noise_sampler(s, sn) * su
        if st != sn:
            x *= math.sqrt((1.0 + sn * sn) / (1.0 + st * st))
        x = _done(callback, i, x, s, sn, x0)
    return x


def sample_lcm(denoise, x, sigmas, *, callback=None, noise_sampler=None, timestep, timestep_scaling=10.0,
               vp=False, sigma_data=0.5):
    """Latent consistency sampling: the consistency-model boundary condition
    c_skip(t) * x + c_out(t) * x0, then fresh noise at sigma_next (none at the end).

    ``timestep(sigma)`` gives the t of the boundary condition; ``vp`` applies c_skip to the VP
    latent x / sqrt(1 + sigma^2) (diffusers) rather than to x (A1111, ComfyUI)."""
    x = np.array(x, copy=True)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        ts = float(timestep(s)) * timestep_scaling
        c_skip = sigma_data**2 / (ts * ts + sigma_data**2)
        c_out = ts / math.sqrt(ts * ts + sigma_data**2)
        x *= c_skip / math.sqrt(1.0 + s * s) if vp else c_skip
        den *= c_out
        x += den
        den = x.copy() if callback is not None else den
        if sn > 0:
            x += noise_sampler(s, sn) * sn
        x = _done(callback, i, x, s, sn, den)
    return x


# -------------------------------------------------------------------------- second order
def sample_heun(denoise, x, sigmas, *, callback=None, noise_sampler=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=math.inf, s_noise=1.0, substep=None):
    """Heun's method (Karras et al. 2022, algorithm 2); Euler on the step to sigma = 0."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    n = len(sigmas) - 1
    for i in range(n):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        s_hat = _churn(x, s, sn, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        den = _own(denoise(x, s_hat), x)
        _heun_step(denoise, x, den, s_hat, sn, buf, substep, i, s)
        x = _done(callback, i, x, s, sn, den)
    return x


def _heun_step(denoise, x, den, s, sn, buf, substep, i, s_report):
    """x (in place) from s to sn by Heun's method given den = denoise(x, s); Euler to sn = 0.
    The substep callback sees the Euler estimate (reported as the step from s_report)."""
    dt = sn - s
    if sn == 0:
        _toward(x, den, dt / s, buf)
        return
    d = x - den
    d *= 1.0 / s
    x2 = _done(substep, i, x + d * dt, s_report, sn, den)
    den2 = denoise(x2, sn)
    np.subtract(x2, den2, out=x2)
    x2 *= 1.0 / sn
    d += x2
    d *= dt / 2
    x += d


def _midpoint_step(denoise, x, den, s, target, mid, substep):
    """x + d(x_mid, mid) * (target - s), x_mid = x + d(x, s) * (mid - s): DPM-Solver-2's step.
    `substep(x_mid)` may replace the midpoint latent before its evaluation."""
    x2 = x - den
    x2 *= (mid - s) / s
    x2 += x
    x2 = substep(x2)
    den2 = denoise(x2, mid)
    np.subtract(x2, den2, out=x2)
    x2 *= (target - s) / mid
    x += x2
    return x


def sample_dpm_2(denoise, x, sigmas, *, callback=None, noise_sampler=None, sigmas_mid=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, substep=None):
    """DPM-Solver-2 style midpoint steps (log-midpoint of sigma and sigma_next); Euler to 0."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    n = len(sigmas) - 1
    for i in range(n):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        s_hat = _churn(x, s, sn, n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        den = _own(denoise(x, s_hat), x)
        if sn == 0:
            _toward(x, den, (sn - s_hat) / s_hat, buf)
        else:
            mid = _log_mid(s_hat, sn) if sigmas_mid is None else float(sigmas_mid[i])
            _midpoint_step(denoise, x, den, s_hat, sn, mid, lambda v: _done(substep, i, v, s, sn, den))
        x = _done(callback, i, x, s, sn, den)
    return x


def sample_dpm_2_ancestral(denoise, x, sigmas, *, callback=None, noise_sampler=None, sigmas_mid=None,
                           eta=1.0, s_noise=1.0, substep=None):
    """DPM-Solver-2 midpoint step to sigma_down, then noise up to sigma_next."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        sd, su = ancestral_step(s, sn, eta)
        if sd == 0:
            _toward(x, den, (sd - s) / s, buf)
        else:
            mid = _log_mid(s, sd) if sigmas_mid is None else float(sigmas_mid[i])
            _midpoint_step(denoise, x, den, s, sd, mid, lambda v: _done(substep, i, v, s, sn, den))
            if su > 0:
                x += noise_sampler(s, sn) * (s_noise * su)
        x = _done(callback, i, x, s, sn, den)
    return x


def sample_dpmpp_2s_ancestral(denoise, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step to sigma_down, then noise up to sigma_next."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        sd, su = ancestral_step(s, sn, eta)
        if sd == 0:
            _toward(x, den, (sd - s) / s, buf)
        else:
            h = math.log(s) - math.log(sd)
            mid = math.exp(-(-math.log(s) + 0.5 * h))
            x2 = x * (mid / s)
            x2 -= den * math.expm1(-0.5 * h)
            den2 = denoise(x2, mid)
            x *= sd / s
            den2 *= math.expm1(-h)
            x -= den2
        if sn > 0 and su > 0:
            x += noise_sampler(s, sn) * (s_noise * su)
        x = _done(callback, i, x, s, sn, den)
    return x


def sde_midpoint(sigma: float, sigma_next: float, r: float = 0.5) -> float:
    """DPM++ SDE's intermediate level: a fraction r of the way from sigma to sigma_next in log-sigma."""
    t = -math.log(sigma)
    return math.exp(-(t + (-math.log(sigma_next) - t) * r))


def sample_dpmpp_sde(denoise, x, sigmas, *, callback=None, noise_sampler=None, sigmas_mid=None, eta=1.0,
                     s_noise=1.0, r=0.5, substep=None):
    """DPM-Solver++ (stochastic), two stages per step with ancestral noise in each; the noise is
    meant to come from a Brownian motion (two increments per step). Euler on the step to 0."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    fac = 1.0 / (2.0 * r)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        if sn == 0:
            _toward(x, den, (sn - s) / s, buf)
        else:
            mid = sde_midpoint(s, sn, r) if sigmas_mid is None else float(sigmas_mid[i])
            sd, su = ancestral_step(s, mid, eta)
            x2 = x * (sd / s)
            x2 -= den * math.expm1(math.log(sd) - math.log(s))
            if su > 0:
                x2 += noise_sampler(s, mid) * (s_noise * su)
            x2 = _done(substep, i, x2, s, sn, den)
            den2 = denoise(x2, mid)
            sd, su = ancestral_step(s, sn, eta)
            if fac != 1.0:
                den2 *= fac
                den2 += den * (1.0 - fac)
            x *= sd / s
            den2 *= math.expm1(math.log(sd) - math.log(s))
            x -= den2
            if su > 0:
                x += noise_sampler(s, sn) * (s_noise * su)
        x = _done(callback, i, x, s, sn, den)
    return x


# ----------------------------------------------------------------------------- multistep
_GL_X, _GL_W = np.polynomial.legendre.leggauss(4)


def lms_coefficient(order: int, t, i: int, j: int) -> float:
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial of node t[i-j] on the nodes
    t[i], ..., t[i-order+1]; Gauss-Legendre quadrature, exact for these polynomials."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    a, b = float(t[i]), float(t[i + 1])
    tau = 0.5 * (b - a) * _GL_X + 0.5 * (b + a)
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
    return 0.5 * (b - a) * float(np.dot(_GL_W, prod))


def sample_lms(denoise, x, sigmas, *, callback=None, order=4, prior_sigmas=(), denoise_to_zero=False):
    """Linear multistep on the ODE derivative, coefficients integrated over sigma.

    ``prior_sigmas``: sigmas before the run in the schedule the coefficients are computed on
    (diffusers keeps its step index absolute after img2img truncation, so its first steps use
    coefficients of a higher order than the derivatives it has). ``denoise_to_zero``: the step to
    sigma = 0 returns the denoised latent (ComfyUI)."""
    x = np.array(x, copy=True)
    nodes = np.concatenate([np.asarray(prior_sigmas, np.float64), np.asarray(sigmas, np.float64)])
    off = len(prior_sigmas)
    ds: list[np.ndarray] = []
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        d = x - den
        d *= 1.0 / s
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        if denoise_to_zero and sn == 0:
            x[...] = den
        else:
            k = i + off
            cur = min(k + 1, order)
            for j, dj in zip(range(cur), reversed(ds)):
                x += dj * lms_coefficient(cur, nodes, k, j)
        x = _done(callback, i, x, s, sn, den)
    return x


def sample_dpmpp_multistep(denoise, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, order=2,
                           solver_type="midpoint", orders=None, s_noise=1.0, d2_shift=0.0):
    """Multistep DPM-Solver++ up to third order, with optional SDE noise:
    DPM++ 2M (eta = 0), DPM++ 2M SDE (eta = 1), DPM++ 3M SDE (order 3, heun), diffusers'
    DPMSolverMultistep (dpmsolver++ / sde-dpmsolver++, its per-step `orders`).

    ``solver_type`` selects the second-order correction (midpoint or heun); by default step i
    has order min(order, i + 1) and the step to sigma = 0 returns the denoised latent.
    ``d2_shift`` adds to the third-order phi_3 coefficient (diffusers' sde-dpmsolver++ uses
    phi_3 + 1 there)."""
    x = np.array(x, copy=True)
    den1 = den2 = None
    h1 = h2 = None
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        p = min(order, i + 1) if orders is None else int(orders[i])
        p = min(p, 1 + (den1 is not None) + (den2 is not None))
        if sn == 0 and p == 1 or sn == 0 and orders is None:
            x[...] = den
            h = math.inf
        else:
            h = math.log(s) - math.log(sn)
            he = h * (eta + 1.0)
            c0 = -math.expm1(-he)
            x *= (sn / s) * math.exp(-eta * h)
            x += den * c0
            if p == 2:
                r0 = h1 / h
                c = (math.expm1(-he) / he + 1.0) / r0 if solver_type == "heun" else 0.5 * c0 / r0
                x += (den - den1) * c
            elif p >= 3:
                r0, r1 = h1 / h, h2 / h
                phi2 = math.expm1(-he) / he + 1.0
                phi3 = phi2 / he - 0.5 + d2_shift
                c10 = (phi2 * (1.0 + r0 / (r0 + r1)) - phi3 / (r0 + r1)) / r0
                c11 = (phi3 - phi2 * r0) / (r0 + r1) / r1
                x += den * c10
                x += den1 * (c11 - c10)
                x -= den2 * c11
            if eta > 0 and s_noise > 0 and sn > 0:
                x += noise_sampler(s, sn) * (sn * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise)
        x = _done(callback, i, x, s, sn, den)
        den2, den1 = den1, den
        h2, h1 = h1, h
    return x


def _lam(sigma: float) -> float:
    return -math.log(sigma) if sigma > 0 else math.inf


def _unipc_update(x, s0, st, hist, p, variant, m_t=None):
    """One UniP (m_t None) or UniC (m_t = output at the predicted point) update of order p from
    s0 to st in k-space; hist = [(lambda, x0 estimate), ...], newest (at s0) last."""
    lam0, m0 = hist[-1]
    if st == 0:
        return m0.copy()
    h = _lam(st) - lam0
    hh = -h
    h_phi_1 = math.expm1(hh)
    bh = hh if variant == "bh1" else math.expm1(hh)
    rks, d1s = [], []
    for k in range(1, p):
        lk, mk = hist[-1 - k]
        rk = (lk - lam0) / h
        rks.append(rk)
        d1s.append((mk - m0) / rk)
    rks.append(1.0)
    R, b = [], []
    h_phi_k, fact = h_phi_1 / hh - 1.0, 1.0
    for k in range(1, p + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * fact / bh)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R, b = np.array(R), np.array(b)
    out = x * (st / s0)
    out -= m0 * h_phi_1
    if m_t is None:
        if d1s:
            rho = [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            for r, d in zip(rho, d1s):
                out -= d * (bh * float(r))
    else:
        rho = [0.5] if p == 1 else np.linalg.solve(R, b)
        for r, d in zip(rho[:-1], d1s):
            out -= d * (bh * float(r))
        out -= (m_t - m0) * (bh * float(rho[-1]))
    return out


def sample_unipc(denoise, x, sigmas, *, callback=None, variant="bh2", order=2, orders=None, correct=None):
    """UniPC (Zhao et al. 2023), data prediction, multistep: every step first corrects the
    previous one with the new output (UniC, no extra evaluation), then predicts (UniP).

    Default orders: min(order, i + 1, steps - i) (warm-up and lower order at the end);
    ``correct[i]`` False skips the correction of step i."""
    x = np.array(x, copy=True)
    n = len(sigmas) - 1
    hist: list = []
    x_last, p_last = None, 0
    keep = max(order, max(orders) if orders is not None and len(orders) else 1)
    for i in range(n):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = _own(denoise(x, s), x)
        if x_last is not None and (correct is None or correct[i - 1]):
            x = _unipc_update(x_last, float(sigmas[i - 1]), s, hist, p_last, variant, m_t=den)
        hist.append((_lam(s), den))
        del hist[:-keep]
        p = min(order, i + 1, n - i) if orders is None else int(orders[i])
        x_last = x
        x = _unipc_update(x, s, sn, hist, min(p, len(hist)), variant)
        x = _done(callback, i, x, s, sn, den)
        p_last = min(p, len(hist))
    return x


# PLMS: pseudo Adams-Bashforth coefficients on eps, by the number of outputs combined.
_AB = {1: (1.0,), 2: (-0.5, 1.5), 3: (5 / 12, -16 / 12, 23 / 12), 4: (-9 / 24, 37 / 24, -59 / 24, 55 / 24)}


def plms_weights(calls: int):
    """Combination weights of the standard PLMS schedule of `calls` model calls (the first step
    takes two calls: a DDIM step and a pseudo-Heun average at its end; the second of those
    outputs stays out of the later Adams-Bashforth history). Row j: {call index: weight}."""
    rows, history = [], []
    for j in range(calls):
        if j == 1:
            rows.append({0: 0.5, 1: 0.5})
            continue
        history = (history + [j])[-4:]
        rows.append(dict(zip(history, _AB[len(history)])))
    return rows


def sample_plms(denoise, x, sigmas, *, callback=None, weights=None, bases=None, sigmas_from=None,
                sigmas_to=None, combine="eps"):
    """Pseudo linear multistep (PLMS / PNDM without Runge-Kutta warm-up), one model call per step.

    ``sigmas`` holds the level of every call (the first step's second call repeats the second
    level), then the final level. Call j combines earlier outputs with ``weights[j]`` and makes a
    DDIM-form update of the latent of call ``bases[j]`` from ``sigmas_from[j]`` to
    ``sigmas_to[j]``; the defaults give the standard schedule. Where the update's levels differ
    from the levels of the calls (diffusers' img2img and non-"leading" spacings), the latent is
    carried over unchanged in the VP parameterisation. ``combine="v"`` combines v-predictions and
    converts the combination to eps at the base latent (diffusers' PNDM for v models)."""
    x = np.array(x, copy=True)
    m = len(sigmas) - 1
    sig = [float(s) for s in sigmas]
    weights = plms_weights(m) if weights is None else weights
    bases = [0 if j == 1 else j for j in range(m)] if bases is None else list(bases)
    if sigmas_from is None:
        s_from = [sig[0] if j == 1 else sig[j] for j in range(m)]
    else:
        s_from = [float(v) for v in sigmas_from]
    s_to = sig[1:] if sigmas_to is None else [float(v) for v in sigmas_to]
    last_use: dict[int, int] = {}
    for j, row in enumerate(weights):
        for k in row:
            last_use[k] = j
    base_use = {b: j for j, b in enumerate(bases)}
    outs: dict[int, np.ndarray] = {}
    inputs: dict[int, np.ndarray] = {}
    for j in range(m):
        L, Ln = sig[j], sig[j + 1]
        if base_use.get(j, -1) > j:
            inputs[j] = x.copy()
        den = _own(denoise(x, L), x)
        if combine == "v":
            out = x * (1.0 / (1.0 + L * L)) - den
            out *= math.sqrt(1.0 + L * L) / L
        else:
            out = x - den
            out *= 1.0 / L
        outs[j] = out
        comb = None
        for k, w in weights[j].items():
            comb = outs[k] * w if comb is None else comb + outs[k] * w
        b = bases[j]
        xb = x if b == j else inputs[b]
        lb, sf, st = sig[b], s_from[j], s_to[j]
        cf = math.sqrt(1.0 + sf * sf)
        if combine == "v":
            comb *= 1.0 / cf
            comb += xb * (sf / (cf * math.sqrt(1.0 + lb * lb)))
        x_new = xb * (cf / math.sqrt(1.0 + lb * lb))
        comb *= st - sf
        x_new += comb
        if st != Ln:
            x_new *= math.sqrt((1.0 + Ln * Ln) / (1.0 + st * st))
        x = _done(callback, j, x_new, L, Ln, den)
        for k in [k for k, last in last_use.items() if last <= j and k in outs]:
            del outs[k]
        for k in [k for k in inputs if base_use[k] <= j]:
            del inputs[k]
    return x


# --------------------------------------------------------------- DPM-Solver (fast, adaptive)
def _dpm_solver_step(denoise, x, t, t_next, order, eps0, r1=None, r2=2 / 3, cache=None):
    """One DPM-Solver-1/2/3 step in t = -log(sigma) (Lu et al. 2022; k-diffusion's DPMSolver),
    from x at t with its eps `eps0`. Returns the new latent. `cache` keeps the first stage's eps
    for a second step from the same point (k-diffusion's eps_cache: the adaptive solver's two
    orders share it)."""
    cache = {} if cache is None else cache

    def sig(tt):
        return math.exp(-tt)

    def eps(u, tt, key):
        if key not in cache:
            den = denoise(u, sig(tt))
            out = u - den
            out *= 1.0 / sig(tt)
            cache[key] = out
        return cache[key]

    h = t_next - t
    out = x - eps0 * (sig(t_next) * math.expm1(h))
    if order == 1:
        return out
    if order == 2:
        r1 = 0.5 if r1 is None else r1
        s1 = t + r1 * h
        u1 = x - eps0 * (sig(s1) * math.expm1(r1 * h))
        out -= (eps(u1, s1, "r1") - eps0) * (sig(t_next) / (2 * r1) * math.expm1(h))
        return out
    r1 = 1 / 3 if r1 is None else r1
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - eps0 * (sig(s1) * math.expm1(r1 * h))
    e1 = eps(u1, s1, "r1")
    u2 = x - eps0 * (sig(s2) * math.expm1(r2 * h))
    u2 -= (e1 - eps0) * (sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1))
    out -= (eps(u2, s2, "r2") - eps0) * (sig(t_next) / r2 * (math.expm1(h) / h - 1))
    return out


def _dpm_ancestral(t, t_next, t_end, eta):
    """(t actually stepped to, noise level to add) of an ancestral DPM-Solver step."""
    if not eta:
        return t_next, 0.0
    sd, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_ = min(t_end, -math.log(sd))
    return t_, math.sqrt(max(math.exp(-t_next) ** 2 - math.exp(-t_) ** 2, 0.0))


def dpm_fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-Fast's orders for `nfe` model evaluations: third order, then 2, 1 or what is left."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def sample_dpm_fast(denoise, x, sigmas, *, callback=None, noise_sampler=None, orders=None, eta=0.0, s_noise=1.0):
    """DPM-Solver-Fast (fixed steps uniform in log-sigma, orders 3, ..., 3, then 2 and 1 or
    the rest). `sigmas`: the step boundaries, exp(-linspace(-log sigma_max, -log sigma_min,
    len(orders) + 1)); the run ends at sigma_min, not 0."""
    x = np.array(x, copy=True)
    ts = [-math.log(float(v)) for v in sigmas]
    orders = dpm_fast_orders(3 * (len(ts) - 1) - 2) if orders is None else orders
    t_end = ts[-1]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_, su = _dpm_ancestral(t, t_next, t_end, eta)
        s = math.exp(-t)
        den = _own(denoise(x, s), x)
        eps0 = (x - den) * (1.0 / s)
        x = _dpm_solver_step(denoise, x, t, t_, order, eps0)
        if su > 0:
            x += noise_sampler(s, math.exp(-t_next)) * (su * s_noise)
        x = _done(callback, i, x, s, math.exp(-t_next), den)
    return x


def sample_dpm_adaptive(denoise, x, sigmas, *, callback=None, noise_sampler=None, order=3, rtol=0.05, atol=0.0078,
                        h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-12 / 23 with adaptive step size (a PID controller on the difference of the
    two orders' results) from sigmas[0] down to sigmas[-1] (not 0). Every attempt, accepted or
    not, costs `order` model evaluations; callback runs after each attempt."""
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    x = np.array(x, copy=True)
    s, t_end = -math.log(float(sigmas[0])), -math.log(float(sigmas[-1]))
    b1 = (pcoeff + icoeff + dcoeff) / (1.5 if eta else order)
    b2 = -(pcoeff + 2 * dcoeff) / (1.5 if eta else order)
    b3 = dcoeff / (1.5 if eta else order)
    h, errs = abs(h_init), []
    x_prev = x
    i = 0
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        t_, su = _dpm_ancestral(s, t, t_end, eta)
        sig = math.exp(-s)
        den = _own(denoise(x, sig), x)
        eps0 = (x - den) * (1.0 / sig)
        cache: dict = {}
        if order == 2:
            low = _dpm_solver_step(denoise, x, s, t_, 1, eps0, cache=cache)
            high = _dpm_solver_step(denoise, x, s, t_, 2, eps0, cache=cache)
        else:
            low = _dpm_solver_step(denoise, x, s, t_, 2, eps0, r1=1 / 3, cache=cache)
            high = _dpm_solver_step(denoise, x, s, t_, 3, eps0, cache=cache)
        delta = np.maximum(atol, rtol * np.maximum(np.abs(low), np.abs(x_prev)))
        error = float(np.linalg.norm(((low - high) / delta).ravel()) / math.sqrt(x.size))
        inv = 1.0 / (error + 1e-8)
        if not errs:
            errs = [inv, inv, inv]
        errs[0] = inv
        factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
        accept = factor >= accept_safety
        if accept:
            errs[2], errs[1] = errs[1], errs[0]
        h *= factor
        if accept:
            x_prev = low
            x = high
            if su > 0:
                x += noise_sampler(sig, math.exp(-t)) * (su * s_noise)
            s = t
        x = _done(callback, i, x, sig, math.exp(-s), den)
        i += 1
    return x


# --------------------------------------------------------------------------------- Restart
def restart_pairs(sigmas, karras):
    """A1111's Restart sampler's steps (Xu et al. 2023) for a schedule `sigmas` (ending at 0):
    (sigma, sigma_next) pairs, where a pair starting above the previous one's end is a restart
    (noise is added up to its level). With 20 or more steps the schedule is remade as Karras
    with room for restarts: 9 restart steps once (steps // 4 twice from 36 steps) from sigma 2
    down to sigma 0.1, inserted where the schedule reaches 0.1. `karras(n, smin, smax)` makes a
    Karras schedule with a final 0."""
    sig = np.asarray(sigmas, np.float64)
    steps = len(sig) - 1
    restart = None
    if steps >= 20:
        r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sig = karras(steps - r_steps * r_times, float(sig[-2]), float(sig[0]))
        restart = (int(np.argmin(np.abs(sig - 0.1))), r_steps + 1, r_times, int(np.argmin(np.abs(sig - 2.0))))
    pairs = []
    for i in range(len(sig) - 1):
        pairs.append((float(sig[i]), float(sig[i + 1])))
        if restart is not None and i + 1 == restart[0] and restart[3] < restart[0]:
            seg = karras(restart[1], float(sig[restart[0]]), float(sig[restart[3]]))[:-1]
            for _ in range(restart[2]):
                pairs.extend((float(a), float(b)) for a, b in zip(seg[:-1], seg[1:]))
    return pairs


def sample_restart(denoise, x, sigmas, *, callback=None, noise_sampler=None, pairs=None, s_noise=1.0, substep=None):
    """Restart sampling: Heun steps (Euler to 0) over `pairs` (see restart_pairs); before a pair
    that starts above where the last one ended, fresh noise lifts x to its level."""
    x = np.array(x, copy=True)
    buf = np.empty_like(x)
    pairs = [(float(a), float(b)) for a, b in zip(sigmas[:-1], sigmas[1:])] if pairs is None else pairs
    last = None
    for i, (s, sn) in enumerate(pairs):
        if last is not None and last < s:
            x += noise_sampler(last, s) * (s_noise * math.sqrt(s * s - last * last))
        den = _own(denoise(x, s), x)
        _heun_step(denoise, x, den, s, sn, buf, substep, i, s)
        last = sn
        x = _done(callback, i, x, s, sn, den)
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_multistep": sample_dpmpp_multistep,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "restart": sample_restart,
}
