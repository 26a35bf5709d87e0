"""img2img, inpainting and txt2img do what users mean, on the embedded `shapes` model.

The model (models/shapes) draws simple shapes in named colours on plain backgrounds. Outputs are
judged by plain pixel arithmetic, independent of sdrt: each pixel is given the nearest named
colour, the background is the commonest colour along the border, and the shape is every pixel far
from the background colour. Generation is stochastic, so each property is measured over 20 seeds
(60 images for img2img's colour and shape, three places x 20 seeds) and must hold in at least 8
in 10 of them; the rates are printed (pytest -s shows them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes"
EXAMPLES = ROOT / "models" / "examples"
SEEDS = range(20)
MIN_RATE = 0.8
# Quick settings: the model is tiny, 64x64 images in 16x16 latents.
FAST = dict(steps=20, guidance=7.5, sampler="Euler a")

# The named colours of the model's training data (sRGB), from its dataset script.
sys.path.insert(0, str(ROOT / "scripts"))
from shapes_data import PALETTE  # noqa: E402

NAMES = list(PALETTE)
COLOURS = np.array([PALETTE[n] for n in NAMES], np.float32)
# A pixel belongs to a shape when it is this far (Euclidean, 0-255 RGB) from the background colour.
# The closest pair of named colours an image can hold is about 95 apart (red/orange), so a pixel
# beyond 80 is not a shade of the background.
SHAPE_DISTANCE = 80.0


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float32)


def colour_names(rgb: np.ndarray) -> np.ndarray:
    """Index into NAMES of the nearest named colour, per pixel."""
    d = ((rgb[..., None, :] - COLOURS) ** 2).sum(-1)
    return d.argmin(-1)


def background(rgb: np.ndarray) -> np.ndarray:
    """The mean colour of the border pixels that carry the border's commonest colour name."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    names = colour_names(border)
    return border[names == np.bincount(names).argmax()].mean(0)


def shape_mask(rgb: np.ndarray) -> np.ndarray:
    return np.sqrt(((rgb - background(rgb)) ** 2).sum(-1)) > SHAPE_DISTANCE


def interior(mask: np.ndarray) -> np.ndarray:
    """`mask` without its rim (pixels with a 4-neighbour outside it); `mask` itself if nothing is left."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner if inner.any() else mask


def dominant(rgb: np.ndarray, mask: np.ndarray) -> tuple[str | None, float]:
    """The commonest colour name among the interior pixels of `mask`, and its share of them.

    A shape's colour is judged inside it: its anti-aliased rim blends the shape's colour with the
    background's, and those blends are often nearest to a third name (yellow on blue: gray)."""
    if mask.sum() == 0:
        return None, 0.0
    counts = np.bincount(colour_names(rgb[interior(mask)]), minlength=len(NAMES))
    return NAMES[counts.argmax()], float(counts.max() / counts.sum())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def circle(colour: str, bg: str = "white", centre=(32, 32), r: float = 16, size: int = 64) -> Image.Image:
    """An anti-aliased disc (drawn at 4x and reduced)."""
    s = 4
    im = Image.new("RGB", (size * s, size * s), PALETTE[bg])
    cx, cy = centre
    ImageDraw.Draw(im).ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=PALETTE[colour])
    return im.reduce(s)


def report(name: str, outcomes: list[bool], details: list) -> float:
    rate = sum(outcomes) / len(outcomes)
    print(f"\n{name}: {sum(outcomes)}/{len(outcomes)} = {rate:.0%}  {details}")
    return rate


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    """The embedded model quantized by `sdrt export models/shapes OUT --precision int8`."""
    from sdrt.export import export_model

    return export_model(MODEL, tmp_path_factory.mktemp("shapes") / "int8", precision="int8", log=lambda _: None)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def pipe(request):
    """The embedded model as shipped (fp32), and in int8: the int8 path must keep what users mean
    on a trained model."""
    from sdrt.runtime import load

    if request.param == "fp32":
        return load(MODEL, provider="cpu")
    pipe = load(request.getfixturevalue("int8_model"), provider="cpu")
    assert pipe.info.precision["unet"] == "int8" and pipe.info.manifest["fused_operators"]["unet"]["QLinearConv"] > 0
    return pipe


def test_int8_images_stay_close_to_fp32(int8_model):
    """On the same seeds, the int8 UNet's images differ from the fp32 ones by little next to what
    the prompt changes (img2img blue -> red circle at strength 0.7, where the image changes most).

    Yardstick: D = mean |red circle - blue circle|, what recolouring the circle moves the image by
    (about 28 on the 0-255 scale). int8 may move the images by a fifth of D on average, and no image
    by more than half of it. (Measured: 2.4 and 7.3 with int8 weights within +-64.)"""
    from sdrt.runtime import load

    fp32, int8 = load(MODEL, provider="cpu"), load(int8_model, provider="cpu")
    src, prompt = circle("blue"), "a red circle on a white background"
    diffs = []
    for seed in SEEDS:
        a = _rgb(fp32.img2img(src, prompt, strength=0.7, seed=seed, **FAST).images[0])
        b = _rgb(int8.img2img(src, prompt, strength=0.7, seed=seed, **FAST).images[0])
        diffs.append(float(np.abs(a - b).mean()))
    print(f"\nint8 vs fp32, mean abs pixel difference over {len(diffs)} seeds: {np.mean(diffs):.2f}/255 "
          f"(largest image {max(diffs):.2f})")
    d_recolour = float(np.abs(_rgb(circle("red")) - _rgb(src)).mean())
    assert 0 < np.mean(diffs) < d_recolour / 5 and max(diffs) < d_recolour / 2


# ---- the measuring stick itself ------------------------------------------------------------------


def test_measures_on_drawn_images():
    img = _rgb(circle("blue", centre=(30, 34), r=15))
    m = shape_mask(img)
    colour, share = dominant(img, m)
    assert colour == "blue" and share == 1.0
    # The rim's anti-aliased pixels blend yellow and blue, and about half of them are nearest to
    # another name (gray); inside the rim, every pixel of a drawn yellow disc is yellow.
    disc = _rgb(circle("yellow", "blue", r=10))
    rim = shape_mask(disc) & ~interior(shape_mask(disc))
    assert (colour_names(disc[rim]) != NAMES.index("yellow")).mean() > 0.4
    assert dominant(disc, shape_mask(disc)) == ("yellow", 1.0)
    assert abs(m.sum() - np.pi * 15**2) < 0.05 * np.pi * 15**2
    assert iou(m, shape_mask(_rgb(circle("red", centre=(30, 34), r=15)))) > 0.95
    assert iou(m, shape_mask(_rgb(circle("blue", centre=(40, 34), r=15)))) < 0.6


# ---- img2img ------------------------------------------------------------------------------------


def test_img2img_changes_colour_and_keeps_the_shape(pipe):
    """A blue circle, prompted as a red one at strength 0.7: the shape turns red, and it stays where
    the circle was (overlap with the source circle).

    The circle sits at three places (centre, lower left, upper right) and each of the two
    properties is measured over all 60 images: strength trades one against the other (at 0.75
    every image is red and half the circles move; at 0.6 most stay purple), and 0.7 is where both
    hold in most images, so a failure of one property in an image says nothing about the other.
    The same prompt in txt2img on the same seeds puts its circle elsewhere or at another size, so
    the overlap criterion is checked to fail there, at every place: the shape comes from the init
    image.
    """
    prompt = "a red circle on a white background"

    def measure(image, src_mask) -> tuple[bool, bool, tuple]:
        out = _rgb(image)
        m = shape_mask(out)
        colour, share = dominant(out, m)
        overlap = iou(m, src_mask)
        return colour == "red" and share > 0.5, overlap >= 0.6, (colour, round(share, 2), round(overlap, 2))

    red, kept, details = [], [], []
    for centre, r in [((32, 32), 16), ((24, 38), 14), ((40, 26), 13)]:
        src = circle("blue", centre=centre, r=r)
        src_mask = shape_mask(_rgb(src))
        here_red, here_kept, baseline = [], [], []
        for seed in SEEDS:
            is_red, is_kept, detail = measure(pipe.img2img(src, prompt, strength=0.7, seed=seed, **FAST).images[0], src_mask)
            here_red.append(is_red)
            here_kept.append(is_kept)
            details.append((centre, seed, *detail))
            baseline.append(measure(pipe.txt2img(prompt, width=64, height=64, seed=seed, **FAST).images[0], src_mask)[1])
        print(f"\nimg2img blue->red circle at {centre} r {r}: red {sum(here_red)}/20, kept {sum(here_kept)}/20, "
              f"txt2img kept {sum(baseline)}/20")
        assert sum(baseline) / len(baseline) <= 0.3, f"txt2img meets the overlap criterion too at {centre}: {baseline}"
        red += here_red
        kept += here_kept
    assert report("img2img blue->red circle, strength 0.7: the shape is red", red, details) >= MIN_RATE
    assert report("img2img blue->red circle, strength 0.7: the shape stays (overlap >= 0.6)", kept, []) >= MIN_RATE


def test_img2img_low_strength_stays_close(pipe):
    """At strength 0.2 the image barely moves, whatever the prompt asks.

    Bound: recolouring the circle red would move the image by D = mean |red circle - blue circle|
    (about 28 on the 0-255 scale, all of it inside the circle); strength 0.2 may move it by at most
    a quarter of that. The VAE round trip alone (strength 0) costs about a tenth of D.
    Sampler: A1111's default, DPM++ 2M Karras. An ancestral sampler (Euler a) adds fresh noise at
    every step and moves the image further at the same strength (17 of 20 seeds within the bound).
    """
    src = circle("blue")
    d_recolour = float(np.abs(_rgb(circle("red")) - _rgb(src)).mean())
    bound = 0.25 * d_recolour
    outcomes, details = [], []
    for seed in SEEDS:
        out = _rgb(
            pipe.img2img(src, "a red circle on a white background", strength=0.2, seed=seed, **{**FAST, "sampler": "DPM++ 2M Karras"}).images[0]
        )
        diff = float(np.abs(out - _rgb(src)).mean())
        colour, _ = dominant(out, shape_mask(out))
        outcomes.append(diff < bound and colour == "blue")
        details.append((seed, round(diff, 2), colour))
    assert report(f"img2img strength 0.2, mean abs diff < {bound:.1f}", outcomes, details) >= MIN_RATE


@pytest.mark.parametrize("colour,strength", [("blue", 0.6), ("red", 0.75)])
def test_img2img_turns_a_sketch_into_a_clean_shape(pipe, colour, strength):
    """The rough hand-drawn blue circle of models/examples becomes a solid circle of the prompted
    colour over the sketch (red at 0.75 is the README's first command). Turning blue into red
    needs a higher strength than keeping blue: at 0.6 most red outputs are still purple."""
    src = Image.open(EXAMPLES / "sketch.png").convert("RGB")
    src_mask = shape_mask(_rgb(src))
    outcomes, details = [], []
    for seed in SEEDS:
        out = _rgb(pipe.img2img(src, f"a {colour} circle on a white background", strength=strength, seed=seed, **FAST).images[0])
        m = shape_mask(out)
        got, share = dominant(out, m)
        overlap = iou(m, src_mask)
        outcomes.append(got == colour and share > 0.8 and overlap >= 0.25)
        details.append((seed, got, round(share, 2), round(overlap, 2)))
    assert report(f"img2img sketch -> {colour} circle, strength {strength}", outcomes, details) >= MIN_RATE


# ---- inpainting ---------------------------------------------------------------------------------


def test_inpaint_recolours_the_masked_shape_only(pipe):
    """Two shapes, the blue square masked, prompted green: the masked region turns green, and with
    overlay and no mask blur not one pixel outside the mask changes."""
    img = Image.open(EXAMPLES / "two-shapes.png").convert("RGB")
    mask = np.asarray(Image.open(EXAMPLES / "two-shapes-mask.png").convert("L")) > 127
    src = _rgb(img)
    prompt = "a red circle and a green square on a white background"
    outcomes, details = [], []
    for seed in SEEDS:
        out = _rgb(
            pipe.inpaint(img, Image.fromarray(mask), prompt, strength=0.85, seed=seed, mask_blur=0, overlay=True, fill="original", **FAST).images[0]
        )
        assert np.array_equal(out[~mask], src[~mask]), f"seed {seed}: pixels outside the mask changed"
        region = shape_mask(out) & mask
        colour, share = dominant(out, region)
        outcomes.append(colour == "green" and share > 0.5 and region.sum() >= 0.3 * (shape_mask(src) & mask).sum())
        details.append((seed, colour, round(share, 2), int(region.sum())))
    assert report("inpaint blue square -> green", outcomes, details) >= MIN_RATE


# ---- txt2img ------------------------------------------------------------------------------------


@pytest.mark.parametrize("colour,shape,bg", [("red", "circle", "white"), ("green", "square", "black"), ("yellow", "triangle", "blue")])
def test_txt2img_draws_the_named_colour(pipe, colour, shape, bg):
    prompt = f"a {colour} {shape} on a {bg} background"
    outcomes, details = [], []
    for seed in SEEDS:
        out = _rgb(pipe.txt2img(prompt, seed=seed, width=64, height=64, **FAST).images[0])
        got, share = dominant(out, shape_mask(out))
        outcomes.append(got == colour and share > 0.5)
        details.append((seed, got, round(share, 2)))
    assert report(f"txt2img {prompt!r}", outcomes, details) >= MIN_RATE


def test_default_model_is_shapes():
    from sdrt.models import default_model_path

    assert default_model_path() == MODEL
