"""SDXL's conditioning, without torch: two text encoders, the pooled text, the size/crop micro-conditioning.

The UNet of an SDXL model takes, beside the latents and the timestep,

- encoder_hidden_states (B, 77*k, 768 + 1280): the penultimate hidden states of the CLIP ViT-L
  encoder and of the OpenCLIP ViT-bigG encoder side by side (a refiner has the second one alone);
- text_embeds (B, 1280): the second encoder's projected pooled output, of the first 75-token chunk;
- time_ids (B, 6): original size (h, w), crop top-left (top, left), target size (h, w); a refiner
  takes the aesthetic score instead of the target size (B, 5).

Rules, by the sampler's family (the tool whose semantics the request follows):

- prompts: A1111's chunks of 75 tokens and emphasis for every family (text.py), through each
  encoder on its own (each with its tokenizer; emphasis restores each encoder's own mean), the
  hidden states then joined along the feature axis;
- clip skip: A1111 (default settings) conditions SDXL on the penultimate layers whatever its Clip
  skip (sd_hijack_clip's FrozenCLIPEmbedderForSDXLWithCustomWords: layer_idx unless the "Clip skip
  SDXL" setting is on; the OpenCLIP encoder always "penultimate"), and so does sdrt for A1111 and
  ComfyUI names. For diffusers names clip_skip k is diffusers' clip_skip k - 1: hidden_states[-(k + 1)]
  of both encoders for the prompt, while diffusers' negative prompt stays on hidden_states[-2];
- an empty negative prompt: A1111 conditions on zeros (hidden states and pooled output) for every
  SDXL model; diffusers does when the model's force_zeros_for_empty_prompt says so (SDXL base and
  inpainting: yes, the refiner: no), sdrt's "" being diffusers' negative_prompt=None;
- micro-conditioning: original and target size default to the size worked at (height, width),
  the crop to (0, 0), the aesthetic scores to 6.0 and 2.5 (A1111's and diffusers' defaults).
  The negative time ids follow each diffusers pipeline: txt2img uses the negative sizes and crop
  only when both negative sizes are given, img2img and inpainting take each negative size or the
  positive one and the positive crop (the refiner's form: the negative crop and aesthetic score).
  For A1111 and ComfyUI names each negative value defaults to its positive one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import prompts
from .errors import InputError
from .modelfolder import XLConfig
from .text import ClipTokenizer, common_length, encode_schedules, prompt_chunks

SIZES = ("original_size", "target_size", "negative_original_size", "negative_target_size")
CROPS = ("crops_coords_top_left", "negative_crops_coords_top_left")
SCORES = ("aesthetic_score", "negative_aesthetic_score")
OPTIONS = SIZES + CROPS + SCORES
DEFAULT_SCORES = {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
# diffusers' base-to-refiner hand-off works on latents sdrt's API does not take: refused by name.
REFUSED = ("denoising_start", "denoising_end")
PENULTIMATE = 2  # hidden_states[-2]


def take_options(options: dict[str, Any], sdxl: bool) -> dict[str, Any]:
    """Remove SDXL's micro-conditioning options from `options` (a call's keyword options), checked."""
    for name in REFUSED:
        if name in options:
            raise InputError(f"{name} (diffusers' base-to-refiner hand-off on latents) is not supported; use strength, "
                             "and run a refiner as an img2img model")
    out = {k: options.pop(k) for k in OPTIONS if k in options}
    if out and not sdxl:
        raise InputError(f"{', '.join(out)}: SDXL micro-conditioning, for SDXL models only")
    for k, v in out.items():
        if v is None:
            continue
        if k in SCORES:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise InputError(f"{k} must be a finite number, got {v!r}")
            continue
        lo = 0 if k in CROPS else 1
        if (not isinstance(v, (tuple, list)) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not lo <= x <= 16384 for x in v)):
            what = "(top, left) pixels from 0" if k in CROPS else "(height, width) pixels from 1"
            raise InputError(f"{k} must be two whole numbers, {what} to 16384, got {v!r}")
        out[k] = tuple(int(x) for x in v)
    return out


def time_ids(xl: XLConfig, options: dict[str, Any], height: int, width: int, *, family: str | None,
             mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(cond, uncond) time_ids, each (1, xl.time_ids) float32, by the rules in the module docstring."""
    o = {k: v for k, v in options.items() if v is not None}
    size = (height, width)
    orig, crop, target = o.get("original_size", size), o.get("crops_coords_top_left", (0, 0)), o.get("target_size", size)
    neg_orig, neg_target = o.get("negative_original_size"), o.get("negative_target_size")
    neg_crop = o.get("negative_crops_coords_top_left")
    score = o.get("aesthetic_score", DEFAULT_SCORES["aesthetic_score"])
    neg_score = o.get("negative_aesthetic_score", DEFAULT_SCORES["negative_aesthetic_score"])
    if xl.requires_aesthetics_score:
        cond = (*orig, *crop, score)
        neg_crop = neg_crop or ((0, 0) if family == "diffusers" else crop)  # diffusers' default negative crop
        uncond = (*(neg_orig or orig), *neg_crop, neg_score)
    elif family == "diffusers" and mode == "txt2img":
        both = neg_orig is not None and neg_target is not None
        cond = (*orig, *crop, *target)
        uncond = (*neg_orig, *(neg_crop or (0, 0)), *neg_target) if both else cond
    elif family == "diffusers":
        cond = (*orig, *crop, *target)
        uncond = (*(neg_orig or orig), *crop, *(neg_target or target))
    else:
        cond = (*orig, *crop, *target)
        uncond = (*(neg_orig or orig), *(neg_crop or crop), *(neg_target or target))
    return np.array([cond], np.float32), np.array([uncond], np.float32)


@dataclass
class Encoder:
    """One text encoder graph of an SDXL folder, as the conditioning reads it."""

    tokenizer: ClipTokenizer
    run: Callable[[np.ndarray, list[str]], list[np.ndarray]]  # (ids (M, 77), output names) -> outputs
    hidden_states: int  # its hidden_states.* outputs (layers + 1: the embeddings first)
    pooled: str | None = None  # the output the UNet takes as text_embeds (the second encoder's)

    def layer(self, from_end: int) -> str:
        """The output of hidden_states[-from_end]."""
        if not 1 <= from_end <= self.hidden_states:
            raise InputError(f"clip_skip must be from 1 to {self.hidden_states - 1} for this model, got {from_end - 1}")
        return f"hidden_states.{self.hidden_states - from_end}"


def layers(family: str | None, clip_skip: int) -> tuple[int, int]:
    """hidden_states[-k] for the prompt and for the negative prompt (see the module docstring)."""
    if family == "diffusers":
        return clip_skip + 1, PENULTIMATE
    return PENULTIMATE, PENULTIMATE


def zero_negative(family: str | None, xl: XLConfig, negative_prompt: str) -> bool:
    """Whether the negative side conditions on zeros (A1111 always for "", diffusers by the model's flag)."""
    return negative_prompt == "" and (family != "diffusers" or xl.force_zeros_for_empty_prompt)


def encode_texts(encoders: Sequence[Encoder], schedules: list[list[str]], from_end: list[int],
                 emphasis: bool = True) -> tuple[list[list[np.ndarray]], dict[str, np.ndarray]]:
    """Every text of every schedule through every encoder: (hidden states (77*k, sum D) per text
    per schedule, pooled output per text). Schedule s reads hidden_states[-from_end[s]]; each
    encoder runs once per distinct layer, on the distinct chunks of the schedules that read it."""
    pooled_rows: dict[bytes, np.ndarray] = {}
    per_encoder = []
    for e in encoders:
        def te(ids: np.ndarray, k: int, e=e) -> np.ndarray:
            names = [e.layer(k)] + ([e.pooled] if e.pooled else [])
            outs = e.run(ids, names)
            if e.pooled:
                pooled_rows.update((row.tobytes(), p) for row, p in zip(ids, np.asarray(outs[1], np.float32)))
            return np.asarray(outs[0], np.float32)

        out: list = [None] * len(schedules)
        for k in sorted(set(from_end)):
            idx = [s for s in range(len(schedules)) if from_end[s] == k]
            for s, enc in zip(idx, encode_schedules([schedules[s] for s in idx], e.tokenizer, te, clip_skip=k,
                                                    emphasis=emphasis)):
                out[s] = enc
        per_encoder.append(out)
    hidden = [[np.concatenate([enc[s][j] for enc in per_encoder], axis=-1) for j in range(len(schedules[s]))]
              for s in range(len(schedules))]
    last = next(e for e in reversed(encoders) if e.pooled)
    pooled = {}
    for t in {t for sched in schedules for t in sched}:
        first = prompt_chunks(t, last.tokenizer, emphasis=emphasis).ids[0]
        pooled[t] = pooled_rows[first.tobytes()]
    return hidden, pooled


def conditioning(encoders: Sequence[Encoder], xl: XLConfig, cond_schedule, uncond_schedule, negative_prompt: str, *,
                 family: str | None, clip_skip: int, ids: tuple[np.ndarray, np.ndarray]):
    """call index -> (key, cond, uncond): the UNet's text-side inputs of each model call, as
    dicts (encoder_hidden_states (1, L, D), text_embeds (1, P), time_ids (1, n)); the entry of a
    prompt schedule chosen per call as for SD (prompts.entry_at_call)."""
    cond_texts = [t for _, t in cond_schedule]
    uncond_texts = [t for _, t in uncond_schedule]
    k_cond, k_uncond = layers(family, clip_skip)
    (conds, unconds), pooled = encode_texts(encoders, [cond_texts, uncond_texts], [k_cond, k_uncond])
    if zero_negative(family, xl, negative_prompt):
        unconds = [np.zeros_like(u) for u in unconds]
        zeros = np.zeros_like(next(iter(pooled.values())))
    pairs: dict = {}

    def at(call: int):
        i = prompts.entry_at_call(cond_schedule, call)
        j = prompts.entry_at_call(uncond_schedule, call)
        if (i, j) not in pairs:
            c, u = common_length(conds[i][None], unconds[j][None])
            u_pooled = zeros if zero_negative(family, xl, negative_prompt) else pooled[uncond_texts[j]]
            pairs[i, j] = (
                {"encoder_hidden_states": c, "text_embeds": pooled[cond_texts[i]][None], "time_ids": ids[0]},
                {"encoder_hidden_states": u, "text_embeds": u_pooled[None], "time_ids": ids[1]},
            )
        return ((i, j), *pairs[i, j])

    return at
