"""Sampler and schedule names of AUTOMATIC1111, ComfyUI and diffusers, and what each one means."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .diffusers_compat import DEFAULTS as DIFFUSERS_CLASSES
from .diffusers_compat import parse_name

FAMILIES = ("a1111", "comfyui", "diffusers")
RULES = ("diffusers", "a1111", "a1111_fix_steps", "comfyui")


class UnknownSamplerError(ValueError):
    """A sampler or schedule name sdrt does not know; the message lists the valid ones."""


@dataclass(frozen=True)
class Spec:
    """What a sampler name means: its family, the sdrt sampler that runs it, its default
    schedule (A1111's "Automatic" choice; ComfyUI's usual one) and fixed options."""

    name: str
    family: str
    sampler: str
    aliases: tuple = ()
    schedule: str | None = None
    options: dict = field(default_factory=dict)
    discard_penultimate: bool = False
    brownian: bool = False


def _a(name, sampler, aliases, schedule="uniform", **kw):
    return Spec(name, "a1111", sampler, tuple(aliases), schedule, **kw)


_MULTI = "dpmpp_multistep"
A1111 = [
    _a("DPM++ 2M", _MULTI, ["k_dpmpp_2m"], "karras", options={"eta": 0.0, "order": 2}),
    _a("DPM++ SDE", "dpmpp_sde", ["k_dpmpp_sde"], "karras", brownian=True),
    _a("DPM++ 2M SDE", _MULTI, ["k_dpmpp_2m_sde"], "exponential", options={"order": 2, "solver_type": "midpoint"},
       brownian=True),
    _a("DPM++ 2M SDE Heun", _MULTI, ["k_dpmpp_2m_sde_heun"], "exponential",
       options={"order": 2, "solver_type": "heun"}, brownian=True),
    _a("DPM++ 2S a", "dpmpp_2s_ancestral", ["k_dpmpp_2s_a"], "karras"),
    _a("DPM++ 3M SDE", _MULTI, ["k_dpmpp_3m_sde"], "exponential", options={"order": 3, "solver_type": "heun"},
       discard_penultimate=True, brownian=True),
    _a("Euler a", "euler_ancestral", ["k_euler_a", "k_euler_ancestral"]),
    _a("Euler", "euler", ["k_euler"]),
    _a("LMS", "lms", ["k_lms"]),
    _a("Heun", "heun", ["k_heun"]),
    _a("DPM2", "dpm_2", ["k_dpm_2"], "karras", discard_penultimate=True),
    _a("DPM2 a", "dpm_2_ancestral", ["k_dpm_2_a"], "karras", discard_penultimate=True),
    _a("DPM fast", "dpm_fast", ["k_dpm_fast"]),
    _a("DPM adaptive", "dpm_adaptive", ["k_dpm_ad"]),
    _a("Restart", "restart", ["restart"], "karras"),
    _a("DDIM", "a1111_ddim", ["ddim"], None),
    _a("PLMS", "a1111_plms", ["plms"], None),
    _a("UniPC", "a1111_unipc", ["unipc"], None),
    _a("LCM", "lcm", ["k_lcm"]),
]

# A1111 samplers sdrt knows by name but does not run (its CFG++ variant needs the unconditional
# prediction inside the sampler).
NOT_SUPPORTED = {"ddim cfg++": "A1111's DDIM CFG++", "ddim_cfgpp": "A1111's DDIM CFG++"}

# The combined "<sampler> <schedule>" names of A1111 before v1.9 (any such pair is accepted).
A1111_LEGACY = {
    "LMS Karras": ["k_lms_ka"],
    "DPM2 Karras": ["k_dpm_2_ka"],
    "DPM2 a Karras": ["k_dpm_2_a_ka"],
    "DPM++ 2S a Karras": ["k_dpmpp_2s_a_ka"],
    "DPM++ 2M Karras": ["k_dpmpp_2m_ka"],
    "DPM++ SDE Karras": ["k_dpmpp_sde_ka"],
    "DPM++ 2M SDE Karras": ["k_dpmpp_2m_sde_ka"],
    "DPM++ 2M SDE Exponential": ["k_dpmpp_2m_sde_exp"],
    "DPM++ 2M SDE Heun Karras": ["k_dpmpp_2m_sde_heun_ka"],
    "DPM++ 2M SDE Heun Exponential": ["k_dpmpp_2m_sde_heun_exp"],
    "DPM++ 3M SDE Karras": ["k_dpmpp_3m_sde_ka"],
    "DPM++ 3M SDE Exponential": ["k_dpmpp_3m_sde_exp"],
}


def _c(name, sampler, aliases=(), schedule="normal", **kw):
    return Spec(name, "comfyui", sampler, tuple(aliases), schedule, **kw)


COMFY = [
    _c("euler", "euler"),
    _c("euler_ancestral", "euler_ancestral"),
    _c("heun", "heun"),
    _c("dpm_2", "dpm_2", discard_penultimate=True),
    _c("dpm_2_ancestral", "dpm_2_ancestral", discard_penultimate=True),
    _c("lms", "lms", options={"denoise_to_zero": True}),
    _c("dpmpp_2s_ancestral", "dpmpp_2s_ancestral"),
    _c("dpmpp_sde", "dpmpp_sde", ["dpmpp_sde_gpu"], brownian=True),
    _c("dpmpp_2m", _MULTI, options={"eta": 0.0, "order": 2}),
    _c("dpmpp_2m_sde", _MULTI, ["dpmpp_2m_sde_gpu"], options={"order": 2, "solver_type": "midpoint"}, brownian=True),
    _c("dpmpp_2m_sde_heun", _MULTI, ["dpmpp_2m_sde_heun_gpu"], options={"order": 2, "solver_type": "heun"},
       brownian=True),
    _c("dpmpp_3m_sde", _MULTI, ["dpmpp_3m_sde_gpu"], options={"order": 3, "solver_type": "heun"}, brownian=True),
    _c("ddim", "euler", schedule="ddim_uniform"),
    _c("uni_pc", "comfy_unipc", options={"variant": "bh1"}, discard_penultimate=True),
    _c("uni_pc_bh2", "comfy_unipc", options={"variant": "bh2"}, discard_penultimate=True),
    _c("lcm", "lcm"),
]

# Class names also without the "Scheduler" suffix, where that does not name another tool's sampler.
DIFFUSERS = [Spec(cls, "diffusers", cls, tuple(a for a in (cls[: -len("Scheduler")],) if a not in ("DDIM", "LCM")))
             for cls in DIFFUSERS_CLASSES]

# Schedules: key -> (display label, other accepted spellings).
A1111_SCHEDULES = {
    "automatic": ("Automatic", ()),
    "uniform": ("Uniform", ()),
    "karras": ("Karras", ()),
    "exponential": ("Exponential", ()),
    "polyexponential": ("Polyexponential", ()),
    "sgm_uniform": ("SGM Uniform", ("SGMUniform",)),
    "kl_optimal": ("KL Optimal", ()),
    "align_your_steps": ("Align Your Steps", ()),
    "simple": ("Simple", ()),
    "normal": ("Normal", ()),
    "ddim": ("DDIM", ()),
    "beta": ("Beta", ()),
}
COMFY_SCHEDULES = {k: (k, ()) for k in
                   ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "kl_optimal")}
# For diffusers classes a schedule name sets the matching option.
DIFFUSERS_SCHEDULES = {
    "karras": ("Karras", {"use_karras_sigmas": True}),
    "exponential": ("Exponential", {"use_exponential_sigmas": True}),
    "beta": ("Beta", {"use_beta_sigmas": True}),
}

_PREFIXES = {"a1111": "a1111", "comfyui": "comfyui", "comfy": "comfyui", "diffusers": "diffusers"}


def _table():
    out: dict[str, Spec] = {}
    # The rule for a name two tools share: a sampler's own name wins over another's alias, and
    # ComfyUI's names over A1111's aliases: "ddim" is ComfyUI's ddim (Euler on ddim_uniform),
    # "DDIM" and "a1111:ddim" are A1111's DDIM.
    for spec in COMFY + A1111 + DIFFUSERS:
        for n in (spec.name, *spec.aliases):
            out.setdefault(n, spec)
    return out


_BY_NAME = _table()


def _lookup(text: str):
    """Exact name or alias, else a case-insensitive match if only one sampler has it."""
    spec = _BY_NAME.get(text)
    if spec is None:
        found = {id(s): s for n, s in _BY_NAME.items() if n.lower() == text.lower()}
        spec = next(iter(found.values())) if len(found) == 1 else None
    return spec


class SamplerName(NamedTuple):
    """One entry of `list_samplers`."""

    name: str
    family: str
    aliases: tuple
    schedule: str | None  # the schedule the name implies by default (display label)


def list_samplers() -> list[SamplerName]:
    """Every sampler name sdrt accepts (AUTOMATIC1111, its legacy combined names, ComfyUI,
    diffusers classes), with aliases and default schedule."""
    out = [SamplerName(s.name, s.family, s.aliases, A1111_SCHEDULES[s.schedule][0] if s.schedule else "Automatic")
           for s in A1111]
    for name, aliases in A1111_LEGACY.items():
        out.append(SamplerName(name, "a1111", tuple(aliases), name.rsplit(" ", 1)[1]))
    out += [SamplerName(s.name, s.family, s.aliases, s.schedule) for s in COMFY]
    out += [SamplerName(s.name, s.family, s.aliases, None) for s in DIFFUSERS]
    return out


def list_schedules() -> dict[str, list[str]]:
    """Schedule names accepted with each family's samplers."""
    return {
        "a1111": [label for label, _ in A1111_SCHEDULES.values()],
        "comfyui": list(COMFY_SCHEDULES),
        "diffusers": [label for label, _ in DIFFUSERS_SCHEDULES.values()],
    }


def _valid_names() -> str:
    groups = {}
    for s in list_samplers():
        groups.setdefault(s.family, []).append(s.name)
    return "; ".join(f"{fam}: {', '.join(names)}" for fam, names in groups.items())


def _legacy_alias(name: str):
    for full, aliases in A1111_LEGACY.items():
        if name in aliases:
            return full
    return None


def resolve(name: str, schedule: str | None = None) -> tuple[Spec, str | None, dict]:
    """(spec, schedule key or None, options written into the name) for a sampler name."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownSamplerError(f"sampler name must be a non-empty string; valid names are {_valid_names()}")
    text = name.strip()
    family = None
    head, sep, rest = text.partition(":")
    if sep and head.strip().lower() in _PREFIXES:
        family, text = _PREFIXES[head.strip().lower()], rest.strip()
    options: dict = {}
    if "(" in text:
        try:
            text, options = parse_name(text)
        except ValueError as e:
            raise UnknownSamplerError(f"{e}; valid names are {_valid_names()}") from None
    text = _legacy_alias(text) or text
    spec = _lookup(text)
    if spec is not None and family is not None and spec.family != family:
        spec = next((s for s in {"a1111": A1111, "comfyui": COMFY, "diffusers": DIFFUSERS}[family]
                     if text == s.name or text in s.aliases), None)
    name_schedule = None
    if spec is None and family in (None, "a1111"):
        for key, (label, others) in sorted(A1111_SCHEDULES.items(), key=lambda kv: -len(kv[1][0])):
            for suffix in (label, key, *others):
                if text.lower().endswith(" " + suffix.lower()):
                    base = _lookup(text[: -len(suffix) - 1])
                    if base is not None and base.family == "a1111":
                        spec, name_schedule = base, key
                        break
            if spec is not None:
                break
    if spec is None and text.lower() in NOT_SUPPORTED:
        raise UnknownSamplerError(f"sampler {name!r} ({NOT_SUPPORTED[text.lower()]}) is not supported; "
                                  f"valid names are {_valid_names()}")
    if spec is None:
        raise UnknownSamplerError(f"unknown sampler {name!r}; valid names are {_valid_names()}")
    if options and spec.family != "diffusers":
        raise UnknownSamplerError(f"options in the sampler name are for diffusers classes only: {name!r}")
    key = resolve_schedule(spec, schedule)
    if name_schedule is not None:
        if key not in (None, "automatic", name_schedule):
            raise ValueError(f"sampler {name!r} implies schedule {A1111_SCHEDULES[name_schedule][0]!r}, "
                             f"but schedule {schedule!r} was given")
        key = name_schedule
    return spec, key, options


def resolve_schedule(spec: Spec, schedule: str | None) -> str | None:
    """The schedule key for `schedule` among the family's names (case-insensitive), or None."""
    if schedule is None:
        return None
    if not isinstance(schedule, str):
        raise UnknownSamplerError(f"schedule must be a string, got {type(schedule).__name__}")
    table = {"a1111": A1111_SCHEDULES, "comfyui": COMFY_SCHEDULES,
             "diffusers": {k: (v[0], ()) for k, v in DIFFUSERS_SCHEDULES.items()}}[spec.family]
    want = schedule.strip().lower()
    if spec.family == "diffusers" and want in ("automatic", "default", ""):
        return None
    for key, (label, others) in table.items():
        if want in (key, label.lower(), *(o.lower() for o in others)):
            return key
    valid = [label for label, _ in table.values()]
    raise UnknownSamplerError(f"unknown schedule {schedule!r} for {spec.family} sampler {spec.name!r}; "
                              f"valid schedules are {', '.join(valid)}")


def family_of(name: str) -> str:
    """"a1111", "comfyui" or "diffusers": whose semantics a sampler name follows."""
    return resolve(name)[0].family


def default_rule(family: str) -> str:
    return {"a1111": "a1111", "comfyui": "comfyui", "diffusers": "diffusers"}[family]
