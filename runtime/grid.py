"""X/Y/Z grids, as A1111's "X/Y/Z plot" script makes them: one image per combination of axis values,
assembled into one labelled picture.

    axes = [parse_axis("strength=0.3,0.5,0.7"), parse_axis("lora:style=0.4,0.8")]
    g = run_grid(pipe, "img2img", {"image": "in.png", "prompt": "a cat <lora:style:1>", "seed": 1}, axes)
    g.image.save("grid.png")   # labels on the top (X) and left (Y); Z values side by side

Axes: strength, cfg, steps, sampler, schedule, seed, clip_skip, `lora:NAME` (the LoRA's weight:
its <lora:NAME:...> tag in the prompt gets each value, or the LoRA is added with it), and
`prompt S/R` (search/replace: the first value is searched in the prompt and replaced by each
value in turn, the first cell keeping the prompt as written). Values are comma-separated, quoted
when they hold commas ("DPM++ 2M Karras"). Every cell has the same seed unless seed is an axis.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import InputError

# axis name -> (keyword argument, value type, label as A1111 writes it)
AXES: dict[str, tuple[str, type, str]] = {
    "strength": ("strength", float, "Denoising"),
    "cfg": ("guidance", float, "CFG Scale"),
    "steps": ("steps", int, "Steps"),
    "sampler": ("sampler", str, "Sampler"),
    "schedule": ("schedule", str, "Schedule type"),
    "seed": ("seed", int, "Seed"),
    "clip_skip": ("clip_skip", int, "Clip skip"),
}
MAX_CELLS = 1000
_TAG = re.compile(r"<lora:([^:>]+)((?::[^>]*)?)>")


@dataclass(frozen=True)
class Axis:
    kind: str  # a key of AXES, "lora" or "prompt S/R"
    values: tuple
    name: str = ""  # the LoRA's name for kind "lora"

    @property
    def title(self) -> str:
        if self.kind == "lora":
            return f"LoRA {self.name}"
        return "Prompt S/R" if self.kind == "prompt S/R" else AXES[self.kind][2]

    def label(self, value) -> str:
        return str(value) if self.kind == "prompt S/R" else f"{self.title}: {value:g}" if isinstance(value, float) \
            else f"{self.title}: {value}"

    def apply(self, kwargs: dict, value) -> dict:
        """`kwargs` of a call with this axis at `value`."""
        out = dict(kwargs)
        if self.kind == "prompt S/R":
            out["prompt"] = out.get("prompt", "").replace(self.values[0], value)
        elif self.kind == "lora":
            prompt = out.get("prompt", "")
            if any(m.group(1) == self.name for m in _TAG.finditer(prompt)):
                out["prompt"] = _TAG.sub(lambda m: f"<lora:{self.name}:{value:g}>" if m.group(1) == self.name
                                         else m.group(0), prompt)
            else:
                out["loras"] = {**(out.get("loras") or {}), self.name: value}
        else:
            out[AXES[self.kind][0]] = value
        return out


def parse_axis(spec: str) -> Axis:
    """`KIND=V1,V2,...` -> Axis; an InputError naming the axis and what is accepted."""
    kinds = ", ".join([*AXES, "lora:NAME", "prompt S/R"])
    if not isinstance(spec, str) or "=" not in spec:
        raise InputError(f"grid axis {spec!r} must be KIND=VALUE,VALUE,... (kinds: {kinds})")
    kind, _, text = spec.partition("=")
    kind = kind.strip()
    try:
        values = [v.strip() for v in next(csv.reader([text], skipinitialspace=True, strict=True))]
    except (csv.Error, StopIteration):
        values = []
    if not values or any(v == "" for v in values):
        raise InputError(f"grid axis {kind!r}: values must be a comma-separated list without empty items, got {text!r}")
    if len(values) > MAX_CELLS:
        raise InputError(f"grid axis {kind!r}: at most {MAX_CELLS} values, got {len(values)}")
    name = ""
    if kind.lower().startswith("lora:"):
        kind, name, typ = "lora", kind[5:].strip(), float
        if not name:
            raise InputError(f"grid axis {spec!r}: lora:NAME needs the LoRA's name")
    elif kind.lower().replace(" ", "") in ("prompts/r", "promptsr"):
        kind, typ = "prompt S/R", str
    elif kind.lower() in AXES:
        kind = kind.lower()
        typ = AXES[kind][1]
    else:
        raise InputError(f"grid axis kind {kind!r} is not known; accepted: {kinds}")
    try:
        parsed = tuple(typ(float(v)) if typ is int and float(v) == int(float(v)) else typ(v) for v in values)
    except ValueError:
        raise InputError(f"grid axis {kind!r}: every value must be {'a whole number' if typ is int else 'a number'}, "
                         f"got {text!r}") from None
    if typ is float and not all(np.isfinite(parsed)):
        raise InputError(f"grid axis {kind!r}: values must be finite numbers, got {text!r}")
    return Axis(kind, parsed, name)


@dataclass
class Grid:
    image: Any  # PIL image with the labels
    cells: list  # [(Result, (x, y, z) indices)]
    infotext: str
    axes: list[Axis] = field(default_factory=list)


def cell_kwargs(base: dict, axes: list[Axis]) -> list[tuple[tuple[int, int, int], dict]]:
    """((x, y, z), keyword arguments) of every cell, X fastest."""
    axes = list(axes) + [None] * (3 - len(axes))
    sizes = [len(a.values) if a is not None else 1 for a in axes]
    out = []
    for z in range(sizes[2]):
        for y in range(sizes[1]):
            for x in range(sizes[0]):
                kw = dict(base)
                for a, i in zip(axes, (x, y, z)):
                    if a is not None:
                        kw = a.apply(kw, a.values[i])
                out.append(((x, y, z), kw))
    return out


def run_grid(pipe, mode: str, base: dict, axes: list[Axis],
             progress: Callable[[int, int], None] | None = None) -> Grid:
    """Run every cell (each checked first, nothing runs when one is refused) and assemble the grid."""
    from .infotext import format_infotext, parse_infotext

    if not 1 <= len(axes) <= 3:
        raise InputError(f"a grid takes 1 to 3 axes (X, Y, Z), got {len(axes)}")
    kinds = [a.kind + a.name for a in axes]
    if len(set(kinds)) != len(kinds):
        raise InputError(f"grid axes must differ, got {', '.join(kinds)}")
    cells = cell_kwargs(base, axes)
    if len(cells) > MAX_CELLS:
        raise InputError(f"a grid has at most {MAX_CELLS} cells, this one {len(cells)}")
    run = getattr(pipe, mode)
    base = dict(base)
    if base.get("seed") in (None, -1) and not any(a.kind == "seed" for a in axes):
        base["seed"] = run(**base, dry_run=True).seeds[0]  # one seed for every cell
        cells = cell_kwargs(base, axes)
    for _, kw in cells:
        run(**kw, dry_run=True)
    results = []
    for i, (idx, kw) in enumerate(cells):
        results.append((run(**kw), idx))
        if progress is not None:
            progress(i + 1, len(cells))
    image = assemble([r.images[0] for r, _ in results], axes)
    prompt, negative, params = parse_infotext(results[0][0].infotexts[0])
    params["Script"] = "X/Y/Z plot"
    for letter, a in zip("XYZ", axes):
        params[f"{letter} Type"] = a.title
        params[f"{letter} Values"] = ", ".join(f'"{v}"' if "," in str(v) else str(v) for v in a.values)
    return Grid(image, results, format_infotext(prompt, negative, params), list(axes))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1
        return ImageFont.load_default()


def _layout(axes: list[Axis], w: int, h: int) -> tuple[int, Any, int, int]:
    """(font size, font, top margin, left margin) of a grid of w x h cells."""
    from PIL import Image, ImageDraw

    size = max(12, min(w, h) // 8)
    font = _font(size)
    top = 2 * size + 8 + (2 * size + 8 if len(axes) > 2 and len(axes[2].values) > 1 else 0)
    left = 0
    if len(axes) > 1:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left = max(int(probe.textlength(axes[1].label(v), font=font)) for v in axes[1].values) + 16
    return size, font, top, left


def assemble(images: list, axes: list[Axis]):
    """The cells (X fastest, then Y, then Z) in a grid with X labels above, Y labels on the left,
    and Z sub-grids side by side, each under its own title."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    nx = len(axes[0].values)
    ny = len(axes[1].values) if len(axes) > 1 else 1
    nz = len(axes[2].values) if len(axes) > 2 else 1
    size, font, top, left = _layout(axes, w, h)
    sub_w = left + nx * w
    out = Image.new("RGB", (nz * sub_w + (nz - 1) * size, top + ny * h), "white")
    draw = ImageDraw.Draw(out)
    for z in range(nz):
        x0 = z * (sub_w + size)
        if nz > 1:
            draw.text((x0 + left + nx * w / 2, size), axes[2].label(axes[2].values[z]), fill="black", font=font, anchor="mm")
        for x in range(nx):
            draw.text((x0 + left + x * w + w / 2, top - size), axes[0].label(axes[0].values[x]), fill="black", font=font,
                      anchor="mm")
        for y in range(ny):
            if len(axes) > 1:
                draw.text((x0 + left - 8, top + y * h + h / 2), axes[1].label(axes[1].values[y]), fill="black",
                          font=font, anchor="rm")
            for x in range(nx):
                out.paste(images[(z * ny + y) * nx + x], (x0 + left + x * w, top + y * h))
    return out
