"""Reference helpers for the sampler tests: k-diffusion without its training modules, a
deterministic nonlinear test "UNet" in torch float64 with its NumPy twin, and noise providers
that hand the same noise to sdrt and to a reference.

k-diffusion's package __init__ imports training code and its utils import torchvision (no CPU
build here): register empty torchvision modules and a bare `k_diffusion` package whose __path__
is the installed folder, then import only `sampling` and `external`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import torch


def load_kdiffusion():
    """(sampling, external) modules of the installed k-diffusion."""
    if "k_diffusion.sampling" in sys.modules and "k_diffusion.external" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    stubs = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    added = [name for name in stubs if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        return _import_kdiffusion()
    finally:
        # Only k-diffusion's utils needed them (bound at import); others probe for torchvision.
        for name in added:
            sys.modules.pop(name, None)


def _import_kdiffusion():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise ImportError("k-diffusion is not installed")
    pkg = sys.modules.get("k_diffusion")
    if pkg is None or not hasattr(pkg, "sampling"):
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    sampling = importlib.import_module("k_diffusion.sampling")
    external = importlib.import_module("k_diffusion.external")
    return sampling, external


# The test "UNet": output(x_in, t) with x_in the scaled latent and t the timestep it is given.
# Nonlinear in x_in and t, and mixing neighbouring pixels (so that what happens to one region,
# e.g. inpainting blends, reaches the others); its t-dependence is steep enough that a timestep
# off by 0.05 moves the final latents far more than the 1e-5 tolerance.
def model_np(x_in: np.ndarray, t: float) -> np.ndarray:
    t = float(t)
    return (0.6 * np.tanh(1.3 * x_in + 0.004 * t) + 0.25 * math.sin(0.021 * t) * x_in
            + 0.1 * np.cos(1.7 * x_in - 0.011 * t) + 0.15 * np.roll(x_in, 1, axis=-1))


def model_torch(x_in: torch.Tensor, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[0]
    return (0.6 * torch.tanh(1.3 * x_in + 0.004 * t) + 0.25 * torch.sin(0.021 * t) * x_in
            + 0.1 * torch.cos(1.7 * x_in - 0.011 * t) + 0.15 * torch.roll(x_in, 1, dims=-1))


class TorchInner(torch.nn.Module):
    """The test model as a k-diffusion inner model (called with (x_in, t))."""

    def forward(self, x_in, t, **kwargs):
        return model_torch(x_in, t)


def sdrt_denoiser(plan, prediction_type):
    """What the pipeline does: feed x / sqrt(sigma^2 + 1) at plan.timestep(sigma), convert to x0.
    Records (sigma, t) of every call."""
    from sdrt.schedulers import denoised_from_output

    calls = []

    def denoise(x, sigma):
        t = plan.timestep(sigma)
        calls.append((float(sigma), t))
        out = model_np(x / math.sqrt(sigma * sigma + 1.0), t)
        return denoised_from_output(out, x, sigma, prediction_type)

    denoise.calls = calls
    return denoise


class SequenceNoise:
    """The i-th call returns the i-th of a fixed sequence of standard normals, as NumPy (for
    sdrt) or torch (for a reference); both sides consume the same sequence."""

    def __init__(self, shape, seed=0, count=400):
        rng = np.random.default_rng(seed)
        self.items = [rng.standard_normal(shape) for _ in range(count)]
        self.i = 0
        self.pairs = []

    def reset(self):
        self.i = 0
        self.pairs = []
        return self

    def _next(self):
        v = self.items[self.i]
        self.i += 1
        return v

    def numpy(self, sigma=None, sigma_next=None):
        self.pairs.append((sigma, sigma_next))
        return self._next().copy()

    def torch(self, sigma=None, sigma_next=None):
        self.pairs.append((sigma, sigma_next))
        return torch.from_numpy(self._next().copy())


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
