"""Noise for ancestral and SDE samplers, drawn only from NumPy generators.

A noise sampler is a callable ``noise_sampler(sigma, sigma_next) -> array`` (k-diffusion's
convention). `randn_sampler` draws fresh standard normals from a Generator at every call;
`brownian_sampler` returns normalised increments of one Brownian motion W over sigma,
``(W(b) - W(a)) / sqrt|b - a|``, so noise is a function of the interval rather than of the call
order (DPM++ SDE, DPM++ 2M/3M SDE).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np


def randn_sampler(rng: np.random.Generator, shape, dtype=np.float32):
    """Fresh standard-normal noise of `shape` from `rng` at every call."""
    dtype = np.dtype(dtype)
    draw = np.float32 if dtype == np.float32 else np.float64

    def sample(sigma, sigma_next):
        return rng.standard_normal(shape, dtype=draw).astype(dtype, copy=False)

    return sample


class BrownianTree:
    """A Brownian motion on [t0, t1] that can be queried at any points, in any order.

    W(t0) = 0 and W(t1) ~ N(0, t1 - t0). Between known points the path is refined by Brownian
    bridges at interval midpoints; every midpoint has its own random stream (SeedSequence of
    the seed and the node's position), so W is a fixed function of t for a given seed. Below
    `tol` the last bridge is sampled at t itself from a stream keyed by t. Recent nodes are
    cached (queries of a sampler walk nearby paths).
    """

    def __init__(self, t0: float, t1: float, shape, seed: int, *, tol: float = 1e-6, cache: int = 256):
        if not t1 > t0:
            raise ValueError(f"BrownianTree needs t0 < t1, got {t0}, {t1}")
        self.t0, self.t1 = float(t0), float(t1)
        self.shape = tuple(shape)
        self.seed = int(seed)
        self.tol = float(tol)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache
        self._w1 = self._normal((0, 0)) * math.sqrt(self.t1 - self.t0)

    def _normal(self, key) -> np.ndarray:
        ss = np.random.SeedSequence(self.seed, spawn_key=tuple(int(k) for k in key))
        return np.random.Generator(np.random.PCG64(ss)).standard_normal(self.shape)

    def _midpoint(self, depth: int, index: int, s: float, u: float, ws, wu) -> np.ndarray:
        key = (depth, index)
        w = self._cache.get(key)
        if w is None:
            w = 0.5 * (ws + wu) + math.sqrt((u - s) / 4.0) * self._normal((1, depth, index))
            self._cache[key] = w
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return w

    def __call__(self, t: float) -> np.ndarray:
        """W(t) (float64); t is clamped to [t0, t1]."""
        t = min(max(float(t), self.t0), self.t1)
        s, u = self.t0, self.t1
        ws, wu = 0.0, self._w1
        if t == s:
            return np.zeros(self.shape)
        if t == u:
            return wu
        depth, index = 0, 0
        while u - s > self.tol:
            m = 0.5 * (s + u)
            wm = self._midpoint(depth, index, s, u, ws, wu)
            if t == m:
                return wm
            depth += 1
            if t < m:
                u, wu, index = m, wm, 2 * index
            else:
                s, ws, index = m, wm, 2 * index + 1
        # Within tol: bridge from W(s) and W(u) to W(t), on a stream keyed by t's bits.
        tbits = int(np.float64(t).view(np.uint64))
        var = (t - s) * (u - t) / (u - s)
        mean = ws + (wu - ws) * ((t - s) / (u - s))
        return mean + math.sqrt(var) * self._normal((2, tbits >> 32, tbits & 0xFFFFFFFF))


def brownian_sampler(seed: int, sigma_min: float, sigma_max: float, shape, dtype=np.float32):
    """Noise sampler of normalised Brownian increments over [sigma_min, sigma_max]."""
    tree = BrownianTree(sigma_min, sigma_max, shape, seed)
    dtype = np.dtype(dtype)

    def sample(sigma, sigma_next):
        a, b = float(sigma), float(sigma_next)
        return ((tree(b) - tree(a)) / math.sqrt(abs(b - a))).astype(dtype)

    return sample


def batched(samplers):
    """One noise sampler per batch item, their draws stacked along a new first axis."""

    def sample(sigma, sigma_next):
        return np.stack([s(sigma, sigma_next) for s in samplers])

    return sample
