"""sdrt.schedulers: samplers and sigma schedules in pure NumPy (no torch, no scipy).

Everything works in k-diffusion space, x = x0 + sigma * eps. A caller supplies
``denoise(x, sigma) -> x0 estimate``: the UNet sees ``x / sqrt(sigma^2 + 1)`` at timestep
``plan.timestep(sigma)``, and `denoised_from_output` turns its eps / v output into x0::

    plan = make_plan("DPM++ 2M Karras", steps=20, strength=0.6, config=scheduler_config)
    x = plan.start(init_latents, noise)               # init_latents=None for txt2img
    x = sample(plan, denoise, x, rng=np.random.default_rng(seed))
    latents = plan.finish(x)                          # what the reference decodes

Names decide semantics (`list_samplers` lists them all):

- AUTOMATIC1111: "Euler a", "DPM++ 2M" with schedule "Karras" (labels Automatic, Uniform,
  Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, Align Your Steps, Simple,
  Normal, DDIM, Beta), the legacy "DPM++ 2M Karras" form, k_* aliases. k-diffusion samplers on
  the discrete DDPM denoiser with fractional log-sigma timesteps, each sampler's "Automatic"
  schedule and discarded penultimate sigma; DDIM, PLMS and UniPC on A1111's own timestep grid.
  "DPM fast" and "DPM adaptive" get sigma_min/sigma_max (and n) as A1111 passes them and stop
  at sigma_min; "Restart" adds A1111's restart segments from 20 steps on. A1111's tables are
  its float32 alpha-bar and sigmas.
- ComfyUI: "dpmpp_2m" with "karras", "euler_ancestral", "uni_pc", "lcm", ... with integer
  (nearest) timesteps and ComfyUI's noise scaling.
- A name two tools share: a sampler's own name wins over another's alias, and ComfyUI's names
  over A1111's aliases: "ddim" is ComfyUI's ddim (Euler on ddim_uniform); "DDIM" and
  "a1111:ddim" are A1111's DDIM. A prefix "a1111:", "comfyui:" or "diffusers:" always picks
  that tool's sampler.
- diffusers: scheduler classes, options in the name or as keywords:
  "DPMSolverMultistepScheduler(use_karras_sigmas=True)"; what ``Cls.from_config(config,
  **options)`` computes in StableDiffusionImg2ImgPipeline, float32 quirks included.

img2img (`rule`, by default the name's family): "diffusers" runs int(steps * strength) steps;
"a1111" t_enc + 1 with t_enc = int(min(strength, 0.999) * steps); "a1111_fix_steps" the
requested steps out of steps / strength; "comfyui" the last `steps` of int(steps / strength)
(all of them above 0.9999). Strength 0 gives a plan without steps (start returns x0).

Known choices:

- A1111's DDIM/PLMS/UniPC at strength 1.0 follow its txt2img path (the whole grid); its img2img
  path at full strength is strength=0.999 (A1111 clamps to 0.999 itself).
- diffusers' UniPC with solver_type="bh1" and a final sigma of 0 returns NaN (it multiplies
  -inf by 0); sdrt returns the denoised latent there.
- PNDMScheduler without skip_prk_steps (its Runge-Kutta warm-up) is not supported; Stable
  Diffusion configs set skip_prk_steps=True.
- Callbacks run once per step of `plan.sigmas`; the internal evaluation of 2nd-order samplers
  is not a step (diffusers' interleaved half steps are).
"""

from .names import UnknownSamplerError, family_of, list_samplers, list_schedules
from .plan import Plan, batch_noise_sampler, denoised_from_output, make_plan, sample, sampler_options
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
    "sampler_options",
]
