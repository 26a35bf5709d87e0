"""Procedural dataset of the embedded `shapes` model: simple shapes in named colours, with captions.

    from shapes_data import sample, make_dataset, PALETTE
    img, caption = sample(np.random.default_rng(0))        # (64, 64, 3) uint8, "a red circle on a white background"

Each image has one or two shapes (circle, square, triangle, star) in a named colour on a plain
background of another colour, at a random position and size. Shapes are drawn at 4x the size and
reduced with a box filter, so edges are anti-aliased. Everything derives from the NumPy generator
passed in, so a seed fixes the dataset. No downloads.

Run as a script to write the example inputs that ship with sdrt (models/examples/):

    python scripts/shapes_data.py models/examples
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SUPERSAMPLE = 4

# Named colours (sRGB). Shapes take any of them but gray; backgrounds any of them, mostly white.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 175),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
SHAPE_COLOURS = [c for c in PALETTE if c != "gray"]
SHAPES = ["circle", "square", "triangle", "star"]
# Background weights: white is the common case, the others appear often enough to be learnt.
BACKGROUNDS = {"white": 0.40, "black": 0.12, "gray": 0.12, "yellow": 0.06, "blue": 0.06, "green": 0.06, "red": 0.06, "purple": 0.06, "orange": 0.06}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # equilateral, pointing up, centred on its bounding circle
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    if shape == "star":  # five points, inner radius 0.45 r
        pts = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw `shape` centred at (cx, cy) with half-size r, in the coordinates of `draw`."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _jitter(rgb, rng: np.random.Generator):
    """A colour near `rgb`: shared brightness shift of up to 10, per-channel shift of up to 4."""
    common = rng.integers(-10, 11)
    return tuple(int(np.clip(v + common + rng.integers(-4, 5), 0, 255)) for v in rgb)


def render(bg: str, shapes: list[tuple[str, str, float, float, float]], rng: np.random.Generator | None = None) -> np.ndarray:
    """Render shapes [(shape, colour, cx, cy, r), ...] (64-pixel coordinates) on `bg`; uint8 (64, 64, 3)."""
    s = SUPERSAMPLE
    jit = (lambda c: _jitter(PALETTE[c], rng)) if rng is not None else (lambda c: PALETTE[c])
    im = Image.new("RGB", (SIZE * s, SIZE * s), jit(bg))
    d = ImageDraw.Draw(im)
    for shape, colour, cx, cy, r in shapes:
        draw_shape(d, shape, cx * s, cy * s, r * s, jit(colour))
    return np.asarray(im.reduce(s))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(bg: str, shapes: list[tuple[str, str, float, float, float]]) -> str:
    """"a red circle on a white background"; two shapes are named left to right."""
    parts = [f"{_article(colour)} {colour} {shape}" for shape, colour, *_ in sorted(shapes, key=lambda t: t[2])]
    return f"{' and '.join(parts)} on {_article(bg)} {bg} background"


def sample(rng: np.random.Generator, two_shape_prob: float = 0.35):
    """One random (image uint8 (64, 64, 3), caption) pair."""
    bgs = list(BACKGROUNDS)
    bg = bgs[rng.choice(len(bgs), p=np.array(list(BACKGROUNDS.values())) / sum(BACKGROUNDS.values()))]
    colours = [c for c in SHAPE_COLOURS if c != bg]
    if rng.random() < two_shape_prob:
        # Two shapes side by side (left/right halves, or top/bottom), not overlapping.
        r1, r2 = rng.uniform(7, 14, size=2)
        horizontal = rng.random() < 0.7
        shapes = []
        for i, r in enumerate((r1, r2)):
            lo, hi = (i * 32 + r + 1, (i + 1) * 32 - r - 1)
            a = rng.uniform(lo, hi)
            b = rng.uniform(r + 2, SIZE - r - 2)
            cx, cy = (a, b) if horizontal else (b, a)
            shapes.append((SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))], cx, cy, r))
    else:
        r = rng.uniform(8, 24)
        cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
        shapes = [(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))], cx, cy, r)]
    return render(bg, shapes, rng), caption(bg, shapes)


def make_dataset(n: int, seed: int):
    """n images (n, 64, 64, 3) uint8 and their captions, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        images[i], c = sample(rng)
        captions.append(c)
    return images, captions


# ---- example inputs that ship with sdrt ---------------------------------------------------------


def sketch_circle(colour: str = "blue", bg: str = "white", seed: int = 3) -> Image.Image:
    """A hand-drawn-looking circle: a wobbly outline scribbled in several strokes, filled unevenly."""
    rng = np.random.default_rng(seed)
    s = SUPERSAMPLE
    im = Image.new("RGB", (SIZE * s, SIZE * s), PALETTE[bg])
    d = ImageDraw.Draw(im)
    cx, cy, r = 32 * s, 30 * s, 17 * s
    # Uneven fill: a slightly squashed, wobbly blob in a lighter tint, then hatching strokes.
    tint = tuple(int(v + (255 - v) * 0.35) for v in PALETTE[colour])
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    wob = 1 + 0.06 * np.sin(3 * t + 1.0) + 0.04 * np.sin(5 * t)
    d.polygon(list(zip(cx + r * 0.95 * wob * np.cos(t), cy + r * 0.9 * wob * np.sin(t))), fill=tint)
    for k in range(-4, 5):
        y = cy + k * r / 5 + rng.uniform(-2, 2) * s
        half = math.sqrt(max(r * r - (y - cy) ** 2, 0)) * 0.85
        d.line([(cx - half, y + rng.uniform(-3, 3) * s), (cx + half, y + rng.uniform(-3, 3) * s)], fill=PALETTE[colour], width=2 * s)
    # Outline: two loose passes that do not quite close.
    for p in range(2):
        t = np.linspace(0.2 * p, 2 * np.pi + 0.35, 60)
        rr = r * (1 + 0.05 * np.sin(2 * t + p) + rng.normal(0, 0.015, t.shape))
        d.line(list(zip(cx + rr * np.cos(t), cy + rr * np.sin(t))), fill=PALETTE[colour], width=int(1.5 * s))
    return im.filter(ImageFilter.GaussianBlur(0.6 * s)).reduce(s)


TWO_SHAPES = ("white", [("circle", "red", 18.0, 32.0, 11.0), ("square", "blue", 46.0, 32.0, 10.0)])


def two_shapes() -> tuple[Image.Image, Image.Image]:
    """A red circle and a blue square on white, and a mask (white = repaint) covering the square."""
    bg, shapes = TWO_SHAPES
    img = Image.fromarray(render(bg, shapes))
    _, _, cx, cy, r = shapes[1]
    mask = Image.new("L", (SIZE, SIZE), 0)
    m = 4  # margin around the square
    ImageDraw.Draw(mask).rectangle([cx - r - m, cy - r - m, cx + r + m - 1, cy + r + m - 1], fill=255)
    return img, mask


def write_examples(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sketch_circle().save(out / "sketch.png")
    img, mask = two_shapes()
    img.save(out / "two-shapes.png")
    mask.save(out / "two-shapes-mask.png")
    Image.fromarray(render("white", [("circle", "blue", 32.0, 32.0, 16.0)])).save(out / "blue-circle.png")


if __name__ == "__main__":
    write_examples(Path(sys.argv[1] if len(sys.argv) > 1 else "models/examples"))
