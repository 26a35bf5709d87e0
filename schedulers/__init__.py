"""sdrt.schedulers: samplers and sigma schedules in pure NumPy (no torch, no scipy).

Everything works in k-diffusion space, x = x0 + sigma * eps. A caller supplies
``denoise(x, sigma) -> x0 estimate`` (the UNet sees ``x / sqrt(sigma^2 + 1)`` at timestep
``plan.timestep(sigma)``; `denoised_from_output` turns its eps / v output into x0)::

    plan = make_plan("DPM++ 2M Karras", steps=20, strength=0.6, config=scheduler_config)
    x = plan.start(init_latents, noise)          # None for txt2img
    x = sample(plan, denoise, x, rng=np.random.default_rng(seed))
    latents = plan.finish(x)

A sampler's name decides whose semantics the run follows: AUTOMATIC1111 names ("Euler a",
"DPM++ 2M" with schedule "Karras", legacy "DPM++ 2M Karras", k_* aliases), ComfyUI names
(``dpmpp_2m`` with ``karras``, ``euler_ancestral``, ``uni_pc``, ...) or diffusers scheduler
classes ("DPMSolverMultistepScheduler(use_karras_sigmas=True)"). `list_samplers` lists them.
"""

from .names import UnknownSamplerError, family_of, list_samplers, list_schedules
from .plan import Plan, batch_noise_sampler, denoised_from_output, make_plan, sample
from .samplers import SAMPLERS

__all__ = [
    "Plan",
    "SAMPLERS",
    "UnknownSamplerError",
    "batch_noise_sampler",
    "denoised_from_output",
    "family_of",
    "list_samplers",
    "list_schedules",
    "make_plan",
    "sample",
]
