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
    """A Brownian motion W on [t0, t1], W(t0) = 0, that can be queried at any points in any order.

    W is a fixed function of t for a given seed: its values come from a binary tree of Brownian
    bridges, each node with its own random stream (a SeedSequence of the seed and the node's
    position). The tree first splits at `points` (the noise levels a run will query, by median
    rank, one draw per point) and then halves intervals down to `tol`; below that the last bridge
    is sampled at t itself on a stream keyed by t. Without points it is the plain halving tree.
    Node values are cached (least recently used first out). With t0 == t1 (a run with a single
    noise level, e.g. one step to 0) W is 0, as torchsde's BrownianTree has it.
    """

    def __init__(self, t0: float, t1: float, shape, seed: int, *, points=(), tol: float = 1e-6, cache: int = 128):
        if not t1 >= t0:
            raise ValueError(f"BrownianTree needs t0 <= t1, got {t0}, {t1}")
        self.t0, self.t1 = float(t0), float(t1)
        self.shape = tuple(shape)
        self.seed = int(seed)
        self.tol = float(tol)
        inner = sorted({float(p) for p in points if self.t0 < float(p) < self.t1})
        self.points = [self.t0, *inner, self.t1]
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache
        self._w1 = self._normal((0,)) * math.sqrt(self.t1 - self.t0)

    def _normal(self, key) -> np.ndarray:
        ss = np.random.SeedSequence(self.seed, spawn_key=tuple(int(k) for k in key))
        return np.random.Generator(np.random.PCG64(ss)).standard_normal(self.shape)

    def _bridge(self, key, s, u, ws, wu, m) -> np.ndarray:
        """W(m) given W(s) = ws and W(u) = wu (cached under key)."""
        w = self._cache.get(key)
        if w is None:
            w = ws + (wu - ws) * ((m - s) / (u - s)) + math.sqrt((m - s) * (u - m) / (u - s)) * self._normal(key)
            self._cache[key] = w
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return w

    def __call__(self, t: float) -> np.ndarray:
        """W(t) (float64); t is clamped to [t0, t1]."""
        t = min(max(float(t), self.t0), self.t1)
        pts = self.points
        lo, hi = 0, len(pts) - 1
        wl, wh = np.zeros(self.shape), self._w1
        # Split by rank at the given points.
        while hi - lo > 1:
            m = (lo + hi) // 2
            wm = self._bridge((1, lo, hi), pts[lo], pts[hi], wl, wh, pts[m])
            if t == pts[m]:
                return wm
            if t < pts[m]:
                hi, wh = m, wm
            else:
                lo, wl = m, wm
        s, u = pts[lo], pts[hi]
        if t == s:
            return wl
        if t == u:
            return wh
        # Halve the interval between neighbouring points.
        depth, index = 0, 0
        while u - s > self.tol:
            m = 0.5 * (s + u)
            wm = self._bridge((2, lo, depth, index), s, u, wl, wh, m)
            if t == m:
                return wm
            depth += 1
            if t < m:
                u, wh, index = m, wm, 2 * index
            else:
                s, wl, index = m, wm, 2 * index + 1
        tbits = int(np.float64(t).view(np.uint64))
        key = (3, tbits >> 32, tbits & 0xFFFFFFFF)
        return wl + (wh - wl) * ((t - s) / (u - s)) + math.sqrt((t - s) * (u - t) / (u - s)) * self._normal(key)


def brownian_sampler(seed: int, sigma_min: float, sigma_max: float, shape, dtype=np.float32, points=()):
    """Noise sampler of normalised Brownian increments over [sigma_min, sigma_max]; `points`
    are the noise levels the run will query (cheap, exact tree nodes)."""
    tree = BrownianTree(sigma_min, sigma_max, shape, seed, points=points)
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
