#!/usr/bin/env python3
"""Per-step cost of sdrt's sampler arithmetic (no UNet): a 1x4x64x64 float32 latent and a
trivial denoiser, whose own cost is measured separately and subtracted.

    python scripts/bench_samplers.py [--steps 50] [--repeat 5] [--shape 1,4,64,64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sdrt.schedulers import make_plan, sample

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}

DETERMINISTIC = ["Euler", "Heun", "DPM2", "LMS", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC", "uni_pc_bh2",
                 "EulerDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler",
                 "PNDMScheduler", "UniPCMultistepScheduler"]
STOCHASTIC = ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE Karras", "DPM++ 2M SDE", "DPM++ 3M SDE", "LCM",
              "DPMSolverSDEScheduler", "LCMScheduler"]


def trivial(x, sigma):
    return x * 0.5


def bench(name, steps, shape, repeat):
    plan = make_plan(name, min(steps, 8) if "LCM" in name else steps, config=SD15)
    x = plan.start(None, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    best = best_den = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = sample(plan, trivial, x, rng=np.random.default_rng(1))
        best = min(best, time.perf_counter() - t)
        assert out.dtype == np.float32
        t = time.perf_counter()
        for s in plan.sigmas[: plan.unet_calls]:
            trivial(x, float(s))
        best_den = min(best_den, time.perf_counter() - t)
    n = len(plan.sigmas) - 1
    return plan, n, best / n * 1e3, (best - best_den) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shape", default="1,4,64,64")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"latent {shape} float32, {args.steps} steps, best of {args.repeat}; trivial denoiser x * 0.5 subtracted")
    print(f"{'sampler':32s} {'family':9s} {'steps':>5s} {'calls':>5s} {'ms/step':>8s} {'sampler ms/step':>16s}")
    groups = (("deterministic", DETERMINISTIC), ("stochastic (noise drawn from a NumPy Generator)", STOCHASTIC))
    for group, names in groups:
        print(f"-- {group}")
        for name in names:
            plan, n, total, own = bench(name, args.steps, shape, args.repeat)
            print(f"{name:32s} {plan.family:9s} {n:5d} {plan.unet_calls:5d} {total:8.3f} {own:16.3f}")


if __name__ == "__main__":
    main()
