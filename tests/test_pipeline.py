"""sdrt's pipelines beyond the diffusers parity tests (test_pipeline_parity.py): threads, input
errors, txt2img, batches and seeds, CFG batching, sizes, inpainting options, prompt features and
output kinds, on the tiny test models.

References are independent of sdrt: diffusers/PyTorch on the same diffusers folder (txt2img with
the same `latents`, the VAE, the text encoder), Pillow for image conversions, or plain arithmetic
(sizes, noise levels, counts). Images are 32x32 (the tiny VAE has factor 2: 16x16 latents) with
few steps, so the whole file runs in about a minute on a CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from sdrt import schedulers
from sdrt.runtime import InputError, load
from sdrt.runtime.sessions import Graph

PROMPT = "a red circle on a white background"
NEGATIVE = "blurry"
SIZE = 32
LAT = SIZE // 2


def _image(seed: int = 0, size=(SIZE, SIZE)) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.float32)
    img += rng.normal(0, 20, img.shape)
    img[(xx - w // 3) ** 2 + (yy - h // 2) ** 2 < (min(w, h) // 4) ** 2] = [30, 60, 220]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _mask(size=(SIZE, SIZE), box=(10, 6, 28, 22)) -> Image.Image:
    m = np.zeros(size[::-1], np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


def _px(r, i: int = 0) -> np.ndarray:
    return np.asarray(r.images[i], dtype=np.int16)


def _maxdiff(a, b) -> int:
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def sd1(models):
    return load(models.exported("tiny-sd1"), provider="cpu")


@pytest.fixture(scope="module")
def inp(models):
    return load(models.exported("tiny-inpaint"), provider="cpu")


class UnetSpy:
    """Wraps a pipeline's UNet graph: records the batch size and embeddings of every call."""

    def __init__(self, pipe):
        self.graph = pipe.graphs["unet"]
        self.calls: list[dict] = []
        self._run = self.graph.run

    def __enter__(self):
        def run(feeds, outputs=None, **kw):
            self.calls.append({k: np.array(v) for k, v in feeds.items()})
            return self._run(feeds, outputs, **kw)

        self.graph.run = run
        return self

    def __exit__(self, *exc):
        del self.graph.run  # back to the class's method


# ------------------------------------------------------------------------------ 1. threads
def _jobs():
    img, mask = _image(1), _mask()
    return [
        lambda p: p.img2img(img, PROMPT, strength=0.6, steps=5, sampler="Euler a", seed=11, output="np"),
        lambda p: p.inpaint(img, mask, "a blue square", NEGATIVE, strength=0.8, steps=5, sampler="DPM++ 2M Karras", seed=12,
                            output="np"),
        lambda p: p.txt2img("a green triangle", steps=5, sampler="EulerAncestralDiscreteScheduler", seed=13, width=SIZE,
                            height=SIZE, output="np"),
        lambda p: p.img2img(img, "a yellow star", strength=0.7, steps=5, sampler="DPM++ SDE", seed=14, batch_size=2,
                            output="np"),
    ]


def test_threads_give_the_sequential_results(models):
    """One Pipeline object used by 4 threads at once (sessions created and the prompt cache filled
    concurrently) gives exactly the images of the same calls run one after another."""
    path = models.exported("tiny-sd1")
    sequential = [job(load(path, provider="cpu")).arrays for job in _jobs()]
    shared = load(path, provider="cpu")
    for _ in range(2):
        start = threading.Barrier(len(_jobs()))

        def call(job):
            start.wait()
            return job(shared).arrays

        with ThreadPoolExecutor(len(_jobs())) as pool:
            threaded = list(pool.map(call, _jobs()))
        for i, (a, b) in enumerate(zip(sequential, threaded)):
            assert a.shape == b.shape and np.array_equal(a, b), f"job {i} differs when run in a thread"


# ------------------------------------------------------------------------- 2. input errors
@pytest.fixture()
def no_model_runs(monkeypatch):
    """Fail the test if any graph of any pipeline runs."""
    calls = []

    def run(self, feeds, outputs=None):
        calls.append(self.name)
        raise AssertionError(f"the {self.name} graph ran before the input was checked")

    monkeypatch.setattr(Graph, "run", run)
    return calls


@pytest.fixture()
def bad_files(tmp_path):
    buf = io.BytesIO()
    _image().save(buf, "PNG")
    png = buf.getvalue()
    files = {"empty": b"", "garbage": b"this is not an image\n" * 20, "truncated": png[: len(png) // 2]}
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    return tmp_path


IMG = _image()
BAD_INPUTS = {
    # name: (call, pattern the message must match)
    "mask aspect ratio": (lambda p, d: p.inpaint(IMG, Image.new("L", (32, 16)), PROMPT), r"^mask is 32x16 .*aspect ratio"),
    "mask aspect ratio (tall)": (lambda p, d: p.inpaint(IMG, Image.new("L", (20, 40)), PROMPT), r"^mask is 20x40"),
    "empty file": (lambda p, d: p.img2img(d / "empty.png", PROMPT), r"^image: .*empty\.png.*empty"),
    "corrupt file": (lambda p, d: p.img2img(d / "garbage.png", PROMPT), r"^image: .*garbage\.png is not an image"),
    "truncated file": (lambda p, d: p.img2img(d / "truncated.png", PROMPT), r"^image: .*truncated or corrupt"),
    "corrupt mask": (lambda p, d: p.inpaint(IMG, d / "garbage.png", PROMPT), r"^mask: .*not an image"),
    "missing file": (lambda p, d: p.img2img(d / "nope.png", PROMPT), r"^image: file not found: .*nope\.png"),
    "missing mask": (lambda p, d: p.inpaint(IMG, d / "nope.png", PROMPT), r"^mask: file not found"),
    "empty bytes": (lambda p, d: p.img2img(b"", PROMPT), r"^image: got empty bytes"),
    "strength -0.1": (lambda p, d: p.img2img(IMG, PROMPT, strength=-0.1), r"^strength must be from 0\.0 to 1\.0, got -0\.1"),
    "strength 1.5": (lambda p, d: p.inpaint(IMG, _mask(), PROMPT, strength=1.5), r"^strength .* got 1\.5"),
    "strength nan": (lambda p, d: p.img2img(IMG, PROMPT, strength=float("nan")), r"^strength .* got nan"),
    "steps 0": (lambda p, d: p.img2img(IMG, PROMPT, steps=0), r"^steps must be from 1"),
    "steps 2.5": (lambda p, d: p.txt2img(PROMPT, steps=2.5, width=SIZE, height=SIZE), r"^steps must be an integer"),
    "unknown sampler": (lambda p, d: p.img2img(IMG, PROMPT, sampler="Euler x"),
                        r"^unknown sampler 'Euler x'; valid names .*Euler a.*DPM\+\+ 2M Karras.*EulerDiscreteScheduler"),
    "guidance -1": (lambda p, d: p.img2img(IMG, PROMPT, guidance=-1), r"^guidance must be from 0\.0 .* got -1"),
    "guidance nan": (lambda p, d: p.txt2img(PROMPT, guidance=float("nan"), width=SIZE, height=SIZE), r"^guidance .* got nan"),
    "noise shape": (lambda p, d: p.img2img(IMG, PROMPT, noise=np.zeros((1, 4, 8, 8))),
                    r"^noise must have shape \(1, 4, 16, 16\) for this request, got \(1, 4, 8, 8\)"),
    "noise batch": (lambda p, d: p.txt2img(PROMPT, width=32, height=32, batch_size=2, noise=np.zeros((1, 4, 16, 16))),
                    r"^noise must have shape \(2, 4, 16, 16\)"),
    "too large for memory": (lambda p, d: p.img2img(IMG, PROMPT, width=8192, height=8192, batch_size=16),
                             r"8192x8192 request with batch_size 16 needs about .* GiB of memory"),
    "txt2img too large": (lambda p, d: p.txt2img(PROMPT, width=8192, height=8192, batch_size=8), r"8192x8192 .*GiB of memory"),
    "output kind": (lambda p, d: p.img2img(IMG, PROMPT, output="jpeg"), r"^output must be one of pil, np, latent, got 'jpeg'"),
    "clip_skip beyond the encoder": (lambda p, d: p.img2img(IMG, PROMPT, clip_skip=5), r"^clip_skip must be from 1 to 3"),
    "seed": (lambda p, d: p.img2img(IMG, PROMPT, seed=-5), r"^seed must be"),
    "batch_size": (lambda p, d: p.img2img(IMG, PROMPT, batch_size=0), r"^batch_size must be"),
    "resize_mode": (lambda p, d: p.img2img(IMG, PROMPT, resize_mode="stretch"), r"^resize_mode must be one of"),
    "fill": (lambda p, d: p.inpaint(IMG, _mask(), PROMPT, fill="grey"), r"^fill must be one of fill, original"),
    "negative width": (lambda p, d: p.img2img(IMG, PROMPT, width=-8), r"^width must be"),
    "prompt type": (lambda p, d: p.img2img(IMG, None), r"^prompt must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_model_runs(sd1, bad_files, no_model_runs, case):
    call, pattern = BAD_INPUTS[case]
    with pytest.raises(InputError, match=pattern):
        call(sd1, bad_files)
    assert no_model_runs == []


def test_memory_refusal_is_real(sd1):
    """The 8192x8192 requests above are refused because they would need more than this machine has:
    the UNet's top-level activations alone, (2B, channels, h, w) float32, are larger."""
    from sdrt.runtime import prepare

    unet = sd1.info.configs["unet"]
    f = sd1.info.vae_scale_factor
    one_activation = 2 * 16 * unet["block_out_channels"][0] * (8192 // f) ** 2 * 4
    e = prepare.estimate_memory(sd1.info, 8192, 8192, 16, cfg=True)
    assert e.stages["unet"] >= one_activation > prepare.available_memory("cpu")
    assert e.total > e.stages["unet"] + e.weights


def test_thread_counts_up_to_the_logical_cores(models):
    """threads=1 and threads=<logical cores> load and run; the session uses the count given."""
    from sdrt.runtime import load
    from sdrt.runtime.sessions import logical_cores, session_options

    for n in sorted({1, logical_cores()}):
        p = load(models.exported("tiny-sd1"), provider="cpu", threads=n)
        assert p.txt2img(PROMPT, width=32, height=32, steps=1, seed=1).images[0].size == (32, 32)
        assert session_options("cpu", p.graphs["unet"].threads).intra_op_num_threads == n
    with pytest.raises(InputError, match=rf"threads must be a whole number from 1 to {logical_cores()}"):
        load(models.exported("tiny-sd1"), provider="cpu", threads=logical_cores() + 1)


def test_mask_of_the_same_aspect_ratio_is_resized(sd1):
    small = _mask().resize((16, 16), Image.Resampling.NEAREST)  # blocky: exact at half size
    opts = dict(strength=0.7, steps=4, seed=5, mask_blur=0)
    r = sd1.inpaint(IMG, small, PROMPT, **opts)
    assert r.images[0].size == (SIZE, SIZE)
    # as A1111: the mask is brought to the image's size with Lanczos
    ref = sd1.inpaint(IMG, small.resize((SIZE, SIZE), Image.Resampling.LANCZOS), PROMPT, **opts)
    assert np.array_equal(_px(r), _px(ref))


# --------------------------------------------------------------------------- 3. txt2img
TXT2IMG_SAMPLERS = {
    "EulerDiscreteScheduler": ("EulerDiscreteScheduler", {}),
    "EulerAncestralDiscreteScheduler": ("EulerAncestralDiscreteScheduler", {}),
    "DPMSolverMultistepScheduler(use_karras_sigmas=True)": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


@pytest.mark.parametrize("sampler", list(TXT2IMG_SAMPLERS))
def test_txt2img_matches_diffusers(sd1, models, sampler):
    """sdrt's txt2img against StableDiffusionPipeline with the same `latents` and step noise."""
    pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    import diffusers

    steps, seed = 6, 21
    noise = np.random.default_rng(4).standard_normal((1, 4, LAT, LAT)).astype(np.float32)
    ours = sd1.txt2img(PROMPT, NEGATIVE, steps=steps, guidance=7.5, sampler=sampler, seed=seed, width=SIZE, height=SIZE,
                       noise=noise).images[0]

    cls_name, opts = TXT2IMG_SAMPLERS[sampler]
    dp = diffusers.StableDiffusionPipeline.from_pretrained(models.source("tiny-sd1"), safety_checker=None,
                                                           requires_safety_checker=False)
    dp.scheduler = getattr(diffusers, cls_name).from_config(dp.scheduler.config, **opts)
    dp.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)  # sdrt's per-step noise for image 0: Generator(seed), in order

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape)[1:], dtype=np.float32)[None])

    module = importlib.import_module(getattr(diffusers, cls_name).__module__)
    with mock.patch.object(module, "randn_tensor", randn_tensor) if hasattr(module, "randn_tensor") else contextlib.nullcontext():
        theirs = dp(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, height=SIZE,
                    width=SIZE, latents=torch.from_numpy(noise)).images[0]
    d = _maxdiff(ours, theirs)
    print(f"txt2img {sampler}: max abs pixel difference {d}/255")
    assert d <= 2


# ----------------------------------------------------------------------- 4. batches, seeds
BATCH_CASES = {
    "img2img Euler a": lambda p, seed, b: p.img2img(IMG, PROMPT, strength=0.7, steps=4, sampler="Euler a", seed=seed,
                                                   batch_size=b),
    "txt2img DPM++ 2M SDE": lambda p, seed, b: p.txt2img(PROMPT, steps=4, sampler="DPM++ 2M SDE", seed=seed, batch_size=b,
                                                         width=SIZE, height=SIZE),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batch_image_i_is_the_single_run_with_seed_plus_i(sd1, case):
    call = BATCH_CASES[case]
    r = call(sd1, 40, 3)
    assert r.seeds == [40, 41, 42] and len(r.images) == 3
    assert [f"Seed: {s}," in t for t, s in zip(r.infotexts, r.seeds)] == [True] * 3
    for i in range(3):
        single = call(sd1, 40 + i, 1)
        assert single.seeds == [40 + i]
        assert _maxdiff(r.images[i], single.images[0]) <= 1, f"image {i}"
    assert _maxdiff(r.images[0], r.images[1]) > 10  # the seeds do differ


def test_batch_inpaint_9_channel(inp):
    call = lambda seed, b: inp.inpaint(IMG, _mask(), PROMPT, strength=0.9, steps=4, sampler="DPM++ SDE", seed=seed,  # noqa: E731
                                       batch_size=b, fill="latent_noise")
    r = call(7, 2)
    for i in range(2):
        assert _maxdiff(r.images[i], call(7 + i, 1).images[0]) <= 1, f"image {i}"


def test_seed_none_picks_a_seed_and_reports_it(sd1):
    opts = dict(strength=0.6, steps=4, sampler="Euler a")
    a = sd1.img2img(IMG, PROMPT, seed=None, **opts)
    b = sd1.img2img(IMG, PROMPT, seed=None, **opts)
    assert len(a.seeds) == 1 and isinstance(a.seeds[0], int) and 0 <= a.seeds[0] < 2**32
    assert a.seeds != b.seeds  # 1 in 4e9 to collide
    assert a.parameters["seed"] == a.seeds[0] and f"Seed: {a.seeds[0]}," in a.infotext
    again = sd1.img2img(IMG, PROMPT, seed=a.seeds[0], **opts)
    assert np.array_equal(_px(a), _px(again))
    assert not np.array_equal(_px(a), _px(b))


# -------------------------------------------------------------------------------- 5. CFG
@pytest.mark.parametrize("guidance, factor", [(1.0, 1), (0.0, 1), (7.5, 2)])
def test_cfg_is_one_unet_call_per_step_on_b_or_2b(sd1, guidance, factor):
    b, steps = 2, 5
    with UnetSpy(sd1) as spy:
        sd1.txt2img(PROMPT, NEGATIVE, steps=steps, guidance=guidance, sampler="EulerDiscreteScheduler", seed=1, batch_size=b,
                    width=SIZE, height=SIZE)
    assert len(spy.calls) == steps  # diffusers' Euler: one model evaluation per step
    cond, uncond = sd1.encode_prompt(PROMPT, NEGATIVE)
    for call in spy.calls:
        assert call["sample"].shape == (factor * b, 4, LAT, LAT)
        emb = call["encoder_hidden_states"]
        assert emb.shape == (factor * b, 77, cond.shape[-1])
        want = [uncond[0]] * b + [cond[0]] * b if factor == 2 else [cond[0]] * b
        np.testing.assert_array_equal(emb, np.stack(want))
        if factor == 2:  # the same latents for both halves
            np.testing.assert_array_equal(call["sample"][:b], call["sample"][b:])


def test_prompt_is_encoded_once(models):
    pipe = load(models.exported("tiny-sd1"), provider="cpu")
    te = pipe.graphs["text_encoder"]
    real = te.run
    seen = []
    te.run = lambda feeds, outputs=None, **kw: seen.append(np.array(feeds["input_ids"])) or real(feeds, outputs, **kw)
    opts = dict(strength=0.5, steps=2, sampler="Euler")
    for seed in range(3):
        pipe.img2img(IMG, PROMPT, NEGATIVE, seed=seed, **opts)
    pipe.txt2img(PROMPT, NEGATIVE, steps=2, width=SIZE, height=SIZE, seed=0)
    assert len(seen) == 1
    assert sorted(map(len, seen)) == [2]  # cond and uncond in one batch
    pipe.img2img(IMG, PROMPT, "low quality", seed=0, **opts)
    assert len(seen) == 2


def test_graphs_load_largest_inline_first(models, monkeypatch):
    """Sessions are created in descending .onnx file size: ONNX Runtime reads a graph with inline
    weights whole, so the big ones load while little else is resident, and graphs with external
    weights (a small .onnx) come last. txt2img does not load the VAE encoder."""
    pipe = load(models.exported("tiny-sd1"), provider="cpu")
    order = []
    real = Graph._create
    monkeypatch.setattr(Graph, "_create", lambda self: order.append(self.name) or real(self))
    pipe.txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, seed=0)
    assert sorted(order) == ["text_encoder", "unet", "vae_decoder"]
    sizes = [pipe.graphs[n].path.stat().st_size for n in order]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    pipe.img2img(IMG, PROMPT, strength=0.5, steps=2, sampler="Euler", seed=0)
    assert order[3:] == ["vae_encoder"]


# ------------------------------------------------------------------------------- 6. sizes
def test_vae_factor_comes_from_the_folder(sd1, models):
    cfg = json.loads((models.source("tiny-sd1") / "vae" / "config.json").read_text())
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    assert factor == 2 and sd1.info.vae_scale_factor == factor


@pytest.mark.parametrize(
    "image_size, width, height, want",
    [
        ((37, 21), None, None, (36, 20)),  # floored to the factor (2), not to 8
        ((32, 32), 33, 45, (32, 44)),
        ((40, 20), 0, 16, (32, 16)),  # width from the aspect ratio
        ((40, 20), 24, 0, (24, 12)),  # height from the aspect ratio
        ((28, 20), 0, 0, (28, 20)),
    ],
)
def test_sizes(sd1, image_size, width, height, want):
    img = _image(size=image_size)
    r = sd1.img2img(img, PROMPT, strength=0.5, steps=2, seed=0, width=width, height=height, output="latent")
    assert r.arrays.shape == (1, 4, want[1] // 2, want[0] // 2)
    r = sd1.inpaint(img, _mask(image_size, (0, 0, image_size[0] // 2, image_size[1] // 2)), PROMPT, strength=0.5, steps=2,
                    seed=0, width=width, height=height)
    assert r.images[0].size == want
    assert (r.parameters["width"], r.parameters["height"]) == want and f"Size: {want[0]}x{want[1]}" in r.infotext


def test_txt2img_size(sd1):
    r = sd1.txt2img(PROMPT, steps=2, seed=0, width=37, height=21)
    assert r.images[0].size == (36, 20)


@pytest.mark.parametrize("size", [(30, 20), (32, 18), (2, 2)])
def test_latent_sizes_the_unet_does_not_divide(sd1, size):
    r = sd1.txt2img(PROMPT, steps=2, seed=0, width=size[0], height=size[1])
    assert r.images[0].size == size


@pytest.mark.parametrize("mode", ["just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale"])
def test_resize_modes_give_the_requested_size(sd1, mode):
    img = _image(size=(40, 24))
    r = sd1.img2img(img, PROMPT, strength=0.5, steps=3, seed=0, width=24, height=32, resize_mode=mode)
    assert r.images[0].size == (24, 32)
    if mode != "latent_upscale":
        m = sd1.inpaint(img, _mask((40, 24), (8, 4, 30, 20)), PROMPT, strength=0.5, steps=3, seed=0, width=24, height=32,
                        resize_mode=mode)
        assert m.images[0].size == (24, 32)


def test_resize_modes_differ(sd1):
    img = _image(size=(48, 24))
    outs = {m: _px(sd1.img2img(img, PROMPT, strength=0.0, steps=3, seed=0, width=32, height=32, resize_mode=m,
                               sample_posterior=False))
            for m in ("just_resize", "crop_and_resize", "resize_and_fill")}
    assert _maxdiff(outs["just_resize"], outs["crop_and_resize"]) > 20
    assert _maxdiff(outs["crop_and_resize"], outs["resize_and_fill"]) > 20


def test_rgba_and_palette_inputs(sd1):
    rgb = _image(3)
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, : SIZE // 2] = 60
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha))
    # reference: composited over white with Pillow
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, rgba).convert("RGB")
    opts = dict(strength=0.5, steps=3, seed=2)
    assert np.array_equal(_px(sd1.img2img(rgba, PROMPT, **opts)), _px(sd1.img2img(flat, PROMPT, **opts)))
    pal = rgb.quantize(32)
    assert pal.mode == "P"
    assert np.array_equal(_px(sd1.img2img(pal, PROMPT, **opts)), _px(sd1.img2img(pal.convert("RGB"), PROMPT, **opts)))
    m = sd1.inpaint(pal, _mask().convert("P"), PROMPT, **opts)
    assert np.array_equal(_px(m), _px(sd1.inpaint(pal.convert("RGB"), _mask(), PROMPT, **opts)))


# ------------------------------------------------------------------- 7. inpainting options
def test_invert_mask_is_the_inverted_mask(sd1):
    opts = dict(strength=0.8, steps=4, seed=3, mask_blur=2)
    a = sd1.inpaint(IMG, _mask(), PROMPT, invert_mask=True, **opts)
    inverted = Image.fromarray(255 - np.asarray(_mask()))
    b = sd1.inpaint(IMG, inverted, PROMPT, **opts)
    assert np.array_equal(_px(a), _px(b))
    c = sd1.inpaint(IMG, _mask(), PROMPT, **opts)
    assert not np.array_equal(_px(a), _px(c))


SAMPLER_STYLES = ["Euler a", "EulerDiscreteScheduler", "euler"]  # A1111, diffusers, ComfyUI semantics


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
@pytest.mark.parametrize("sampler", SAMPLER_STYLES)
def test_fill_modes(models, kind, sampler):
    """Every fill mode runs for 4- and 9-channel models; the latent modes replace the hole's latents."""
    pipe = load(models.exported(kind), provider="cpu")
    opts = dict(strength=0.6, steps=4, seed=8, mask_blur=0, sampler=sampler, output="np")
    out = {f: pipe.inpaint(IMG, _mask(), PROMPT, fill=f, **opts).arrays for f in ("fill", "original", "latent_noise",
                                                                               "latent_nothing")}
    out = {f: a[0] for f, a in out.items()}
    hole = np.asarray(_mask()) > 0
    for f in ("fill", "latent_noise", "latent_nothing"):
        assert np.isfinite(out[f]).all()
        assert np.abs(out[f] - out["original"])[hole].max() > (0.1 if f.startswith("latent") else 0.02), f
    assert np.abs(out["latent_noise"] - out["latent_nothing"])[hole].max() > 0.1


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
def test_fill_modes_ignore_the_hole_content(models, kind):
    """A1111 fills the hole's pixels (masking.fill) for every mode but `original`, so only with
    `original` does the content under the mask reach the output."""
    pipe = load(models.exported(kind), provider="cpu")
    a = IMG
    b_arr = np.asarray(IMG).copy()
    b_arr[np.asarray(_mask()) > 0] = [250, 240, 10]
    b = Image.fromarray(b_arr)
    opts = dict(strength=0.6, steps=4, seed=8, mask_blur=0, sampler="Euler a", output="np")
    for fill in ("fill", "latent_noise", "latent_nothing", "original"):
        ra = pipe.inpaint(a, _mask(), PROMPT, fill=fill, **opts).arrays
        rb = pipe.inpaint(b, _mask(), PROMPT, fill=fill, **opts).arrays
        if fill == "original":
            assert np.abs(ra - rb).max() > 0.1
        else:
            np.testing.assert_array_equal(ra, rb, err_msg=fill)


def test_latent_noise_is_the_seeds_noise(sd1):
    """A1111's latent noise fills the hole with randn(seed), the same draw as the initial noise:
    with a mask covering everything, the start latent is noise * (1 + sigma_max), which is
    txt2img from the noise scaled by (1 + sigma_max) / sigma_max (same sampler, same sigmas)."""
    steps = 5
    noise = np.random.default_rng(2).standard_normal((1, 4, LAT, LAT)).astype(np.float32)
    full = Image.new("L", (SIZE, SIZE), 255)
    r = sd1.inpaint(IMG, full, PROMPT, strength=1.0, steps=steps, sampler="Euler", seed=0, noise=noise, fill="latent_noise",
                    mask_blur=0, overlay=False, output="latent")
    plan = schedulers.make_plan("Euler", steps, 1.0, config=sd1.info.scheduler_config)
    s0 = float(plan.sigmas[0])
    t = sd1.txt2img(PROMPT, steps=steps, sampler="Euler", seed=0, noise=noise * (1 + s0) / s0, width=SIZE, height=SIZE,
                    output="latent")
    np.testing.assert_allclose(r.arrays, t.arrays, atol=1e-3 * np.abs(t.arrays).max())


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
@pytest.mark.parametrize("overlay", [True, False])
def test_only_masked(models, kind, overlay):
    pipe = load(models.exported(kind), provider="cpu")
    big = _image(5, size=(48, 40))
    mask = _mask((48, 40), (20, 12, 28, 20))
    # bounding box (20, 12, 28, 20) + padding 2 = (18, 10, 30, 22): square, as the 32x32 work size
    box = np.zeros((40, 48), bool)
    box[10:22, 18:30] = True
    r = pipe.inpaint(big, mask, PROMPT, strength=0.9, steps=4, seed=6, mask_blur=0, only_masked=True, padding=2,
                     width=SIZE, height=SIZE, overlay=overlay)
    out, src = _px(r), np.asarray(big, np.int16)
    assert r.images[0].size == big.size
    outside = ~box if not overlay else np.asarray(mask) == 0
    assert np.array_equal(out[outside], src[outside])
    assert np.abs(out[box] - src[box]).max() > 10
    assert "Inpaint area: Only masked" in r.infotext and "Masked area padding: 2" in r.infotext


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
def test_only_masked_with_a_blank_mask_is_img2img(models, kind):
    """A1111 (processing.py): a blank mask gives no crop region; it drops the mask and runs
    img2img on the whole image (no fill, no overlay)."""
    pipe = load(models.exported(kind), provider="cpu")
    big = _image(5, size=(48, 40))
    blank = Image.new("L", big.size, 0)
    opts = dict(strength=0.8, steps=4, seed=6, sampler="Euler a", width=SIZE, height=SIZE, sample_posterior=False)
    r = pipe.inpaint(big, blank, PROMPT, mask_blur=4, only_masked=True, padding=2, fill="fill", **opts)
    want = pipe.img2img(big, PROMPT, **opts)
    assert r.images[0].size == (SIZE, SIZE)
    np.testing.assert_array_equal(_px(r), _px(want))
    assert _maxdiff(r.images[0], big.resize((SIZE, SIZE), Image.Resampling.LANCZOS)) > 10
    assert "Inpaint area" not in r.infotext and "Masked content" not in r.infotext


def test_a1111_repaint_weight_is_the_latent_mask(sd1):
    """A1111: latmask = the mask resized to latent size (PIL's default filter) / 255; nmask =
    latmask (repainted), mask = 1 - latmask (kept). Without mask_round the soft values stay,
    and 1 - (1 - latmask) is not latmask in float32."""
    cv2 = pytest.importorskip("cv2")
    from sdrt.runtime import prepare

    mask = _mask()
    blurred = Image.fromarray(cv2.GaussianBlur(np.asarray(mask), (21, 1), 4))  # A1111: k = 2 * int(2.5 * 4 + 0.5) + 1
    job = prepare.inpaint_job(sd1.info, IMG, mask, width=None, height=None, resize_mode="just_resize", batch_size=1,
                              mask_blur_x=4, mask_blur_y=0, invert_mask=False, mask_round=False, fill="original",
                              only_masked=False, padding=0, overlay=True, family="a1111")
    latmask = np.asarray(blurred.convert("RGB").resize((LAT, LAT)), dtype=np.float32)[..., 0] / 255
    assert np.any((1 - (1 - latmask)) != latmask)  # the test can tell the two apart
    np.testing.assert_array_equal(job.latent_repaint[0, 0], latmask)
    np.testing.assert_array_equal(job.latent_keep[0, 0], (1.0 - latmask).astype(np.float32))
    blender = prepare.latent_blender(job, schedulers.make_plan("Euler", 4, 0.5, config=sd1.info.scheduler_config),
                                     np.zeros((1, 4, LAT, LAT), np.float32), np.zeros((1, 4, LAT, LAT), np.float32))
    np.testing.assert_array_equal(blender.repaint[0, 0], latmask)


@pytest.mark.parametrize("sampler,family", [("Euler a", "a1111"), ("euler", "comfyui"),
                                            ("EulerDiscreteScheduler", "diffusers")])
def test_pixels_round_or_truncate_by_family(sd1, sampler, family):
    """8-bit output: A1111 and ComfyUI truncate 255 * clamp((x + 1) / 2) (astype(uint8));
    diffusers' image processor rounds ((x / 2 + 0.5).clamp(0, 1) * 255).round()."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    opts = dict(strength=0.6, steps=3, seed=2, sampler=sampler, sample_posterior=False)
    r = sd1.img2img(IMG, PROMPT, **opts)
    x = torch.from_numpy(sd1.decode_latents(sd1.img2img(IMG, PROMPT, output="latent", **opts).arrays))
    if family == "diffusers":
        want = np.asarray(VaeImageProcessor().postprocess(x, output_type="pil")[0])
    else:
        want = (255.0 * torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)).numpy()[0].transpose(1, 2, 0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(r.images[0]), want)


# ------------------------------------------------------------------- 8. prompt features
@pytest.fixture(scope="module")
def diffusers_text(models):
    """diffusers' StableDiffusionPipeline.encode_prompt on the tiny model's own text encoder."""
    pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    import diffusers
    import transformers

    src = models.source("tiny-sd1")
    te = transformers.CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    if not hasattr(te, "text_model"):  # transformers 5 dropped the level diffusers' clip_skip path reads
        import types

        object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=te, tokenizer=transformers.CLIPTokenizer.from_pretrained(src / "tokenizer"), unet=None,
        scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )

    def encode(prompt, clip_skip=None):
        with torch.no_grad():
            return pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=clip_skip)[0].numpy()

    return encode


def test_plain_prompt_and_clip_skip_match_diffusers(sd1, diffusers_text):
    cond, uncond = sd1.encode_prompt(PROMPT, NEGATIVE)
    assert cond.shape == uncond.shape == (1, 77, 32)
    np.testing.assert_allclose(cond, diffusers_text(PROMPT), atol=1e-4)
    np.testing.assert_allclose(uncond, diffusers_text(NEGATIVE), atol=1e-4)
    # A1111's clip skip 2 (the penultimate layer) is diffusers' clip_skip=1
    cond2, _ = sd1.encode_prompt(PROMPT, NEGATIVE, clip_skip=2)
    np.testing.assert_allclose(cond2, diffusers_text(PROMPT, clip_skip=1), atol=1e-4)
    assert np.abs(cond2 - cond).max() > 0.1
    cond3, _ = sd1.encode_prompt(PROMPT, NEGATIVE, clip_skip=3)
    np.testing.assert_allclose(cond3, diffusers_text(PROMPT, clip_skip=2), atol=1e-4)


def test_long_prompt_and_break(sd1, diffusers_text):
    words = [f"red{i % 7} circle" for i in range(50)]  # > 75 tokens
    long = " ".join(words)
    cond, uncond = sd1.encode_prompt(long, NEGATIVE)
    assert cond.shape == uncond.shape == (1, 154, 32)
    # the first chunk is what diffusers makes of the prompt (truncated at 75 tokens)
    np.testing.assert_allclose(cond[0, :77], diffusers_text(long)[0], atol=1e-4)
    np.testing.assert_allclose(uncond[0, :77], diffusers_text(NEGATIVE)[0], atol=1e-4)
    # BREAK: each part its own chunk
    cond, _ = sd1.encode_prompt("a red circle BREAK on a white background", "")
    assert cond.shape == (1, 154, 32)
    np.testing.assert_allclose(cond[0, :77], diffusers_text("a red circle")[0], atol=1e-4)
    np.testing.assert_allclose(cond[0, 77:], diffusers_text("on a white background")[0], atol=1e-4)
    # and the chunks reach the UNet
    with UnetSpy(sd1) as spy:
        sd1.img2img(IMG, long, NEGATIVE, strength=0.5, steps=2, sampler="Euler", seed=0)
    assert spy.calls and all(c["encoder_hidden_states"].shape == (2, 154, 32) for c in spy.calls)


def test_cond_uncond_of_different_lengths_run_as_separate_calls_would(sd1):
    """A long prompt beside a short negative prompt: the shorter side is repeated to the longer
    one's length, and the UNet's output is what a separate call on its own length gives (A1111
    runs the two lengths as separate model calls by default): cross-attention over a repeated
    sequence equals cross-attention over the sequence."""
    long = " ".join(f"red{i % 7} circle" for i in range(50))
    cond, uncond = sd1.encode_prompt(long, NEGATIVE)
    assert cond.shape == uncond.shape == (1, 154, 32)
    short, _ = sd1.encode_prompt(NEGATIVE, "")  # the negative prompt's own encoding, one chunk
    np.testing.assert_array_equal(uncond[0, :77], short[0])
    np.testing.assert_array_equal(uncond[0, 77:], short[0])
    unet = sd1.graphs["unet"].load()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, LAT, LAT)).astype(np.float32)
    t = np.array(500.0, np.float32)
    alone = unet.run({"sample": x, "timestep": t, "encoder_hidden_states": short}, ["out_sample"])[0]
    tiled = unet.run({"sample": x, "timestep": t, "encoder_hidden_states": uncond}, ["out_sample"])[0]
    np.testing.assert_allclose(tiled, alone, rtol=1e-4, atol=1e-5)
    padded = np.concatenate([short, sd1.encode_prompt("", "")[0]], axis=1)  # padding with the empty prompt instead
    assert np.abs(unet.run({"sample": x, "timestep": t, "encoder_hidden_states": padded}, ["out_sample"])[0] - alone).max() > 1e-3


def test_emphasis_reaches_the_encoding(sd1):
    plain, _ = sd1.encode_prompt("a red circle", "")
    weighted, _ = sd1.encode_prompt("a (red:1.5) circle", "")
    assert weighted.shape == plain.shape and np.abs(weighted - plain).max() > 1e-3
    same, _ = sd1.encode_prompt("a (red:1.5) circle", "", emphasis=False)
    assert not np.array_equal(same, weighted)


def _texts_seen(pipe, spy, cands):
    """For every UNet call, which (cond, uncond) text pair of `cands` its embeddings are."""
    enc = {pair: pipe.encode_prompt(*pair) for pair in cands}
    out = []
    for call in spy.calls:
        emb = call["encoder_hidden_states"]
        hit = [pair for pair, (c, u) in enc.items()
               if emb.shape[1] == c.shape[1] and np.array_equal(emb[1], c[0]) and np.array_equal(emb[0], u[0])]
        assert len(hit) == 1, "each call's embeddings are those of one text pair"
        out.append(hit[0])
    return out


@pytest.mark.parametrize("sampler,strength,steps,calls_red", [
    # [red:blue:0.5] over 10 steps ends "red" after step 5; A1111's denoiser counts model calls from 0,
    # in img2img too: t_enc + 1 = 6 calls (0..5) at strength 0.5 are all "red"
    ("Euler", 1.0, 10, 6), ("Euler", 0.5, 10, 6), ("Euler", 0.8, 10, 6),
    # second-order samplers count both evaluations: 20 schedule steps, end at 10 -> calls 0..10
    ("Heun", 1.0, 10, 11), ("DPM++ 2M", 0.3, 10, 4),
])
def test_prompt_editing_switches_per_model_call(sd1, sampler, strength, steps, calls_red):
    red, blue = ("a red circle", "blurry"), ("a blue circle", "blurry")
    with UnetSpy(sd1) as spy:
        if strength == 1.0:
            sd1.txt2img("a [red:blue:0.5] circle", "blurry", steps=steps, sampler=sampler, seed=1, width=SIZE, height=SIZE)
        else:
            sd1.img2img(IMG, "a [red:blue:0.5] circle", "blurry", strength=strength, steps=steps, sampler=sampler, seed=1)
    seen = _texts_seen(sd1, spy, [red, blue])
    n = len(seen)
    assert seen == [red] * min(calls_red, n) + [blue] * max(0, n - calls_red)


def test_prompt_alternation_and_negative_schedule(sd1):
    with UnetSpy(sd1) as spy:
        sd1.txt2img("a [red|blue] circle", "[blurry:ugly:2]", steps=5, sampler="Euler", seed=1, width=SIZE, height=SIZE)
    seen = _texts_seen(sd1, spy, [(f"a {c} circle", n) for c in ("red", "blue") for n in ("blurry", "ugly")])
    # alternation: step t (= call index here, calls 0 and 1 both take step 1's entry) -> options[(t - 1) % 2]
    colours = ["red", "red", "blue", "red", "blue"]
    negatives = ["blurry", "blurry", "blurry", "ugly", "ugly"]
    assert seen == [(f"a {c} circle", n) for c, n in zip(colours, negatives)]


def test_prompt_schedule_texts_are_encoded_once(models):
    pipe = load(models.exported("tiny-sd1"), provider="cpu")
    te = pipe.graphs["text_encoder"]
    real = te.run
    seen = []
    te.run = lambda feeds, outputs=None: seen.append(np.array(feeds["input_ids"])) or real(feeds, outputs)
    pipe.txt2img("a [red|green|blue] circle", "[x:y:3]", steps=6, sampler="Euler", seed=1, width=SIZE, height=SIZE)
    rows = np.concatenate(seen)
    assert len({r.tobytes() for r in rows}) == len(rows)  # no chunk encoded twice
    assert len(rows) == 3 + 2 + 1  # three cond texts, two negatives, the empty prompt


@pytest.mark.parametrize("prompt", ["a cat AND a dog", "a red circle:1.3"])
def test_composable_prompts_are_refused(sd1, prompt):
    with pytest.raises(InputError, match="composable"):
        sd1.img2img(IMG, prompt, steps=2, seed=0)


def test_infotext_version_is_sdrts(sd1):
    """A1111 ends its infotext with "Version: v1.10.1"; sdrt writes its own, from pyproject.toml."""
    import tomllib
    from pathlib import Path

    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    for r in (sd1.img2img(IMG, PROMPT, steps=2, seed=0, dry_run=True),
              sd1.inpaint(IMG, _mask(), PROMPT, steps=2, seed=0, dry_run=True)):
        assert r.infotext.endswith(f", Version: sdrt {version}"), r.infotext


# ---------------------------------------------------------------------------- 9. outputs
def test_output_kinds_and_infotext(sd1, models):
    opts = dict(strength=0.6, steps=4, sampler="Euler a", seed=9, batch_size=2)
    pil = sd1.img2img(IMG, PROMPT, NEGATIVE, **opts)
    arr = sd1.img2img(IMG, PROMPT, NEGATIVE, output="np", **opts)
    lat = sd1.img2img(IMG, PROMPT, NEGATIVE, output="latent", **opts)
    assert len(pil.images) == 2 and pil.arrays is None
    assert arr.images == [] and arr.arrays.shape == (2, SIZE, SIZE, 3) and arr.arrays.dtype == np.float32
    assert 0.0 <= arr.arrays.min() and arr.arrays.max() <= 1.0
    for i in range(2):
        np.testing.assert_allclose(arr.arrays[i], np.asarray(pil.images[i], np.float32) / 255, atol=1e-6)
    assert lat.images == [] and lat.arrays.shape == (2, 4, LAT, LAT)
    assert pil.seeds == arr.seeds == lat.seeds == [9, 10]

    # the latents decode (diffusers' VAE) to the images
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models.source("tiny-sd1"), subfolder="vae").eval()
    with torch.no_grad():
        dec = vae.decode(torch.from_numpy(lat.arrays) / vae.config.scaling_factor).sample.numpy()
    ref = np.clip(dec / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.abs(ref * 255 - arr.arrays * 255).max() <= 2

    fields = dict(kv.split(": ", 1) for kv in pil.infotext.splitlines()[-1].split(", "))
    assert fields["Steps"] == "4" and fields["Sampler"] == "Euler a" and fields["Seed"] == "9"
    assert fields["Size"] == f"{SIZE}x{SIZE}" and fields["Denoising strength"] == "0.6"
    assert pil.infotext.splitlines()[0] == PROMPT and pil.infotext.splitlines()[1] == f"Negative prompt: {NEGATIVE}"
    assert "Seed: 10," in pil.infotexts[1]
    t = sd1.txt2img(PROMPT, steps=2, seed=1, width=SIZE, height=SIZE)
    assert "Denoising strength" not in t.infotext and "Steps: 2," in t.infotext


# ------------------------------------------------------------------- fp16 overflow in the VAE
def _nan_decoder(graph):
    real = graph.run

    def run(feeds, outputs=None, **kw):
        out = real(feeds, outputs, **kw)
        return [np.full_like(out[0], np.nan)]

    return run


def test_overflowing_decoder_falls_back_to_fp32(models, copy_folder, monkeypatch):
    """An image whose (fp16) decoding gives NaN is decoded again by the folder's fp32 decoder: the
    result is the image a sound decoder gives; without an fp32 decoder it is an error, never a
    black image."""
    import shutil

    from sdrt.runtime.modelfolder import FP32_VAE_DECODER

    folder = copy_folder(models.exported("tiny-sd1"))
    shutil.copytree(folder / "vae_decoder", folder / FP32_VAE_DECODER)
    pipe = load(folder, provider="cpu", verify="none")
    assert FP32_VAE_DECODER in pipe.graphs
    call = dict(prompt=PROMPT, strength=0.6, steps=3, seed=4, batch_size=2)
    want = pipe.img2img(IMG, **call)
    monkeypatch.setattr(pipe.graphs["vae_decoder"], "run", _nan_decoder(pipe.graphs["vae_decoder"]))
    got = pipe.img2img(IMG, **call)
    assert pipe.fp32_decodes == 2
    assert got.parameters["vae_fp32_fallback"] == [0, 1] and "vae_fp32_fallback" not in want.parameters
    for i in range(2):
        assert np.array_equal(_px(got, i), _px(want, i))

    plain = load(models.exported("tiny-sd1"), provider="cpu")
    monkeypatch.setattr(plain.graphs["vae_decoder"], "run", _nan_decoder(plain.graphs["vae_decoder"]))
    with pytest.raises(RuntimeError, match="NaN/Inf.*--fp32-vae-decoder"):
        plain.img2img(IMG, **call)


@pytest.mark.parametrize("bad_row", [0, 1, 2, 3])
def test_unet_overflow_names_the_image(models, monkeypatch, bad_row):
    """NaN/Inf in the UNet's output is caught at the step it appears, per image: row r of a CFG
    batch of 2B rows belongs to image r mod B; the error names it and never yields an image."""
    pipe = load(models.exported("tiny-sd1"), provider="cpu")
    real = pipe.graphs["unet"].run

    def run(feeds, outputs=None, **kw):
        out = real(feeds, outputs, **kw)[0].copy()
        out[bad_row, 0, 0, 0] = np.inf
        return [out]

    monkeypatch.setattr(pipe.graphs["unet"], "run", run)
    with pytest.raises(RuntimeError, match=f"NaN/Inf for image {bad_row % 2} of the batch"):
        pipe.img2img(IMG, PROMPT, NEGATIVE, strength=0.6, steps=3, seed=4, batch_size=2)


def _rewrite(folder: Path, rel: str, **changes) -> None:
    """Change a JSON file of a model folder and record its new size and sha256 in the manifest."""
    import hashlib
    import json

    p = folder / rel
    data = json.loads(p.read_text())
    data.update(changes)
    p.write_text(json.dumps(data))
    if rel != "sdrt.json":
        m = json.loads((folder / "sdrt.json").read_text())
        raw = p.read_bytes()
        m["files"][rel] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
        (folder / "sdrt.json").write_text(json.dumps(m))


def test_a_folder_that_describes_other_graphs_is_refused_by_the_graphs(models, copy_folder):
    """Manifest and configs agree with each other but not with the graphs: 8 latent channels for
    graphs of 4, or a scale factor of 4 for a VAE of 2. The graphs' declared inputs and returned
    shapes refuse it in one line, before any shape error of ONNX Runtime or NumPy."""
    from sdrt.runtime import load
    from sdrt.runtime.modelfolder import ModelFolderError

    folder = copy_folder(models.exported("tiny-sd1"))
    folder = folder.rename(folder.with_name("first"))
    _rewrite(folder, "sdrt.json", latent_channels=8, unet_in_channels=8)
    _rewrite(folder, "unet/config.json", in_channels=8, out_channels=8)
    for d in ("vae_encoder", "vae_decoder"):
        _rewrite(folder, f"{d}/config.json", latent_channels=8)
    pipe = load(folder, provider="cpu")
    with pytest.raises(ModelFolderError, match=r"the unet graph .* has 4 in dimension 1 of 'sample', but the folder's "
                                               r"description says 8"):
        pipe.txt2img(PROMPT, width=32, height=32, steps=1)

    folder = copy_folder(models.exported("tiny-sd1"))
    _rewrite(folder, "sdrt.json", vae_scale_factor=4)
    for d in ("vae_encoder", "vae_decoder"):
        _rewrite(folder, f"{d}/config.json", block_out_channels=[32, 64, 64])
    pipe = load(folder, provider="cpu")
    with pytest.raises(ModelFolderError, match=r"VAE encoder .* returned \(1, 8, 16, 16\) for images of \(1, 3, 32, 32\); "
                                               r"the folder says 4 latent channels and a scale factor of 4, which give "
                                               r"\(1, 8, 8, 8\)"):
        pipe.img2img(IMG, PROMPT, steps=1)
    with pytest.raises(ModelFolderError, match=r"VAE decoder .* returned \(1, 3, 16, 16\) for latents of "
                                               r"\(1, 4, 8, 8\); the folder says a scale factor of 4"):
        pipe.txt2img(PROMPT, width=32, height=32, steps=1)
