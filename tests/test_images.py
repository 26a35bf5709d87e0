"""sdrt.runtime.images against independent references: OpenCV (mask blur), diffusers'
VaeImageProcessor (resize modes, pre/post-processing, crop region, overlay), torch
interpolate (latent resizing, nearest masks), Pillow and plain arithmetic."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from sdrt.runtime import images as im
from sdrt.runtime.errors import InputError



def _torch():
    """torch (a reference only), or skip: the other tests run without it."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def vae_processor():
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8)


@pytest.fixture(scope="module")
def mask_processor():
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def rand_rgb(rng, w, h) -> Image.Image:
    # smooth content plus noise, so resampling differences would show
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    noise = rng.integers(-40, 41, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def rand_mask(rng, w, h, blobs=3) -> Image.Image:
    a = np.zeros((h, w), np.uint8)
    for _ in range(blobs):
        x1, x2 = sorted(rng.integers(0, w, 2))
        y1, y2 = sorted(rng.integers(0, h, 2))
        a[y1 : y2 + 1, x1 : x2 + 1] = 255
    return Image.fromarray(a, "L")


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


# --------------------------------------------------------------------------- load_image


def test_load_image_sources_agree_with_pil(tmp_path):
    rng = np.random.default_rng(0)
    ref = rand_rgb(rng, 37, 23)
    p = tmp_path / "a.png"
    ref.save(p)
    buf = io.BytesIO()
    ref.save(buf, format="PNG")
    for src in (p, str(p), buf.getvalue(), ref, arr(ref)):
        out = im.load_image(src)
        assert out.mode == "RGB" and out.size == (37, 23)
        assert np.array_equal(arr(out), arr(ref))


def test_load_image_flattens_alpha_onto_background():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 16, 3))
    alpha = rng.integers(0, 256, (16, 16))
    alpha[0, 0], alpha[0, 1] = 0, 255
    rgba = np.dstack([rgb, alpha]).astype(np.uint8)
    for bg, bg_rgb in (("#ffffff", (255, 255, 255)), ((10, 200, 30), (10, 200, 30))):
        out = arr(im.load_image(rgba, background=bg)).astype(float)
        a = alpha[..., None] / 255.0
        expect = rgb * a + np.array(bg_rgb) * (1 - a)
        assert np.abs(out - expect).max() <= 1.0
        assert tuple(out[0, 0]) == bg_rgb  # fully transparent -> background
        assert np.array_equal(out[0, 1], rgb[0, 1])  # opaque -> unchanged


def test_load_image_transparent_palette_and_la():
    p = Image.new("P", (4, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1, 0, 1])
    p.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    out = arr(im.load_image(p))
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [255, 0, 0], [255, 255, 255]]
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    assert arr(im.load_image(la))[0].tolist() == [[50, 50, 50], [255, 255, 255]]


def test_load_image_applies_exif_orientation(tmp_path):
    a = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.png"
    Image.fromarray(a).save(p, exif=exif)
    out = arr(im.load_image(p))
    assert np.array_equal(out, np.rot90(a, k=-1))


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match=r"image: file not found: .*nope\.png"):
        im.load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InputError, match=r"init: .*junk\.png is not an image.*PNG, JPEG"):
        im.load_image(junk, "init")
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(InputError, match=r"cut\.png could not be decoded.*truncated or corrupt"):
        im.load_image(cut)
    with pytest.raises(InputError, match=r"image is empty \(0x0 pixels\)"):
        im.load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(InputError, match=r"mask is empty"):
        im.load_mask(np.zeros((0, 5), np.uint8))
    with pytest.raises(InputError, match=r"unsupported array shape \(4, 4, 2\).*HxWx3"):
        im.load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InputError, match=r"unsupported array dtype float32"):
        im.load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match=r"image: expected a file path.*got int"):
        im.load_image(3)
    with pytest.raises(InputError, match=r"is a folder"):
        im.load_image(tmp_path)
    with pytest.raises(InputError, match=r"empty bytes"):
        im.load_image(b"")
    assert issubclass(InputError, ValueError)


# --------------------------------------------------------------------------- load_mask


def test_load_mask_alpha_rule():
    rng = np.random.default_rng(2)
    alpha = rng.integers(0, 256, (8, 9)).astype(np.uint8)
    alpha[0, :3] = [128, 129, 255]
    rgba = np.dstack([rng.integers(0, 256, (8, 9, 3)), alpha]).astype(np.uint8)
    rounded = arr(im.load_mask(rgba))
    assert np.array_equal(rounded, np.where(alpha > 128, 255, 0))
    assert rounded[0, :3].tolist() == [0, 255, 255]
    assert np.array_equal(arr(im.load_mask(rgba, round=False)), alpha)
    # an opaque RGBA mask, an RGB mask: their luminance, as PIL's convert("L")
    opaque = rgba.copy()
    opaque[..., 3] = 255
    assert np.array_equal(arr(im.load_mask(opaque)), arr(Image.fromarray(opaque).convert("L")))
    assert np.array_equal(arr(im.load_mask(opaque[..., :3])), arr(Image.fromarray(opaque[..., :3]).convert("L")))
    b = rng.random((5, 6)) > 0.5
    assert np.array_equal(arr(im.load_mask(b)), b * 255)
    assert im.load_mask(b).mode == "L"


def test_load_mask_16_bit_grey_is_scaled(tmp_path):
    a = np.array([[0, 257, 32896, 65535]], np.uint16)
    p = tmp_path / "m16.png"
    Image.fromarray(a).save(p)
    assert arr(im.load_mask(p))[0].tolist() == [0, 1, 128, 255]


# --------------------------------------------------------------------------- target_size


@pytest.mark.parametrize(
    "size, w, h, factor, expect",
    [
        ((640, 480), None, None, 8, (640, 480)),
        ((641, 487), None, None, 8, (640, 480)),
        ((640, 480), 512, None, 8, (512, 480)),
        ((640, 480), 512, 0, 8, (512, 384)),  # 480 * 512 / 640
        ((640, 480), 0, 300, 8, (400, 296)),  # 640 * 300 / 480 = 400
        ((300, 200), 0, 0, 8, (296, 200)),
        ((1000, 3), 0, 250, 8, (83328, 248)),
        ((5, 5), None, None, 8, (8, 8)),  # at least one factor
        ((10, 10), 3, 0, 8, (8, 8)),
        ((640, 480), 700, 500, 64, (640, 448)),  # factor is a parameter
        ((100, 100), 0, 250, 1, (250, 250)),
    ],
)
def test_target_size(size, w, h, factor, expect):
    assert im.target_size(size, w, h, factor) == expect


def test_target_size_rounds_like_comfyui():
    # ComfyUI ImageScale: max(1, round(other * new / old)) with Python's round (half to even)
    for iw, ih, h in [(3, 2, 5), (5, 2, 3), (7, 2, 1), (1, 2, 1), (1000, 2, 1)]:
        w, _ = im.target_size((iw, ih), 0, h, 1)
        assert w == max(1, round(iw * h / ih))


def test_target_size_errors():
    with pytest.raises(InputError, match="width must not be negative, got -8"):
        im.target_size((64, 64), -8, 64, 8)
    with pytest.raises(InputError, match="height must be a whole number of pixels, got 1.5"):
        im.target_size((64, 64), 64, 1.5, 8)
    with pytest.raises(InputError, match="whole number"):
        im.target_size((64, 64), True, 64, 8)


# --------------------------------------------------------------------------- resize_image


RESIZE_CASES = [(37, 23, 64, 64), (64, 64, 48, 96), (100, 40, 64, 64), (40, 100, 64, 64), (512, 512, 256, 384),
                (20, 300, 64, 32), (300, 20, 32, 64), (64, 48, 64, 48), (3, 3, 96, 64), (255, 129, 64, 72)]


@pytest.mark.parametrize("mode, theirs", [("just_resize", "default"), ("crop_and_resize", "crop"), ("resize_and_fill", "fill")])
def test_resize_modes_match_diffusers(vae_processor, mode, theirs):
    rng = np.random.default_rng(3)
    for sw, sh, w, h in RESIZE_CASES:
        img = rand_rgb(rng, sw, sh)
        # diffusers resizes with the installed Pillow: sdrt's "pillow" resampler (its diffusers names)
        ours = im.resize_image(img, w, h, mode, resampler="pillow")
        ref = vae_processor.resize(img, height=h, width=w, resize_mode=theirs)
        assert ours.size == (w, h)
        assert np.array_equal(arr(ours), arr(ref.convert("RGB"))), (sw, sh, w, h)
        mask = rand_mask(rng, sw, sh)
        ours_m = im.resize_image(mask, w, h, mode, resampler="pillow")
        ref_m = vae_processor.resize(mask, height=h, width=w, resize_mode=theirs)
        assert ours_m.mode == "L"
        assert np.array_equal(arr(ours_m), arr(ref_m.convert("L"))), (sw, sh, w, h)


def test_resize_modes_geometry():
    # crop_and_resize of a 2:1 image to a square keeps the centre; resize_and_fill keeps all of it
    a = np.zeros((50, 100, 3), np.uint8)
    a[:, :25] = 255  # left quarter white
    img = Image.fromarray(a)
    crop = arr(im.resize_image(img, 50, 50, "crop_and_resize"))
    assert crop.max() == 0  # the left quarter was cut away
    fill = arr(im.resize_image(img, 50, 50, "resize_and_fill"))
    assert fill[12:38, :10].min() == 255  # the white quarter survives, and the edge rows are stretched
    assert np.array_equal(fill[0], fill[12]) and np.array_equal(fill[-1], fill[37])


def test_resize_extreme_aspect_ratio():
    # the scaled side would round to 0 pixels: kept at 1 and stretched over the frame
    line = Image.new("RGB", (300, 7), (200, 10, 10))
    for mode in ("crop_and_resize", "resize_and_fill"):
        for w, h in ((32, 64), (64, 32)):
            out = im.resize_image(line, w, h, mode)
            assert out.size == (w, h)
    out = arr(im.resize_image(line, 32, 64, "resize_and_fill"))
    assert np.abs(out.astype(int) - [200, 10, 10]).max() <= 2


def test_resize_mode_errors():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(InputError, match="resize mode must be one of just_resize, crop_and_resize, resize_and_fill"):
        im.resize_image(img, 8, 8, "stretch")
    with pytest.raises(InputError, match="resize_latents"):
        im.resize_image(img, 8, 8, "latent_upscale")


# --------------------------------------------------------------------------- latents / nearest


@pytest.mark.parametrize("src, dst", [((64, 64), (96, 80)), ((64, 48), (32, 24)), ((7, 5), (13, 29)),
                                      ((40, 33), (17, 9)), ((1, 3), (4, 4)), ((8, 8), (8, 8))])
def test_resize_latents_matches_torch_bilinear(src, dst):
    torch = _torch()
    F = torch.nn.functional
    x = np.random.default_rng(4).standard_normal((2, 4, *src)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False).numpy()
    ours = im.resize_latents(x, *dst)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_resize_latents_many_sizes():
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(18)
    for _ in range(60):
        sh, sw, dh, dw = (int(v) for v in rng.integers(1, 150, 4))
        x = rng.standard_normal((1, 4, sh, sw)).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(x), size=(dh, dw), mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(im.resize_latents(x, dh, dw), ref, rtol=0, atol=1e-5)


def test_nearest_resize_matches_torch():
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    for _ in range(40):
        sh, sw, dh, dw = rng.integers(1, 200, 4)
        x = rng.standard_normal((1, 1, sh, sw)).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(x), size=(int(dh), int(dw))).numpy()
        assert np.array_equal(im.nearest_resize(x, dh, dw), ref), (sh, sw, dh, dw)


# --------------------------------------------------------------------------- arrays


def test_to_array_matches_diffusers_preprocess(vae_processor):
    rng = np.random.default_rng(6)
    imgs = [rand_rgb(rng, 48, 40) for _ in range(2)]
    ref = vae_processor.preprocess(imgs, height=40, width=48).numpy()
    ours = im.to_array(imgs)
    assert ours.dtype == np.float32 and ours.shape == (2, 3, 40, 48)
    assert np.array_equal(ours, ref)
    assert im.to_array(imgs[0]).shape == (1, 3, 40, 48)


def test_from_array_matches_diffusers_postprocess(vae_processor):
    torch = _torch()
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 3, 24, 16)) * 0.8).astype(np.float32)
    # exact halves after scaling, where rounding modes differ
    x[0, 0, 0, :6] = np.array([-1.0, 1.0, -2.0, 3.0, 2 * (0.5 / 255) - 1, 2 * (254.5 / 255) - 1], np.float32)
    ref = vae_processor.postprocess(torch.from_numpy(x), output_type="pil")
    ours = im.from_array(x)
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.mode == "RGB" and np.array_equal(arr(a), arr(b))


def test_from_array_floor_is_a1111():
    torch = _torch()
    x = (np.random.default_rng(8).standard_normal((1, 3, 8, 8)) * 0.8).astype(np.float32)
    t = torch.clamp((torch.from_numpy(x) + 1.0) / 2.0, min=0.0, max=1.0)[0]
    ref = (255.0 * np.moveaxis(t.numpy(), 0, 2)).astype(np.uint8)  # processing.py's conversion
    assert np.array_equal(arr(im.from_array(x, rounding="floor")[0]), ref)
    nan = np.full((3, 2, 2), np.nan, np.float32)
    assert arr(im.from_array(nan)[0]).max() == 0


# --------------------------------------------------------------------------- blur


def _cv2_blur(cv2, a, sx, sy):
    # A1111 processing.py: two separable cv2.GaussianBlur calls
    if sx > 0:
        a = cv2.GaussianBlur(a, (2 * int(2.5 * sx + 0.5) + 1, 1), sx)
    if sy > 0:
        a = cv2.GaussianBlur(a, (1, 2 * int(2.5 * sy + 0.5) + 1), sy)
    return a


def test_blur_mask_matches_opencv_exactly():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(9)
    sigmas = [0, 0.2, 0.5, 1, 1.5, 2, 2.7, 3, 4, 5, 6.5, 8, 11.3, 16, 24, 32, 64]
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        kind = trial % 3
        if kind == 0:
            a = np.asarray(rand_mask(rng, w, h))
        elif kind == 1:
            a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        else:
            a = (rng.random((h, w)) > 0.85).astype(np.uint8) * 255
        sx = float(rng.choice(sigmas)) if trial % 4 else float(rng.uniform(0, 40))
        sy = float(rng.choice(sigmas)) if trial % 5 else float(rng.uniform(0, 40))
        ours = arr(im.blur_mask(Image.fromarray(a), sx, sy))
        ref = _cv2_blur(cv2, a, sx, sy)
        assert np.array_equal(ours, ref), (h, w, sx, sy, np.abs(ours.astype(int) - ref).max())


def test_blur_mask_zero_is_identity_and_errors():
    a = rand_mask(np.random.default_rng(10), 20, 10)
    assert np.array_equal(arr(im.blur_mask(a, 0, 0)), arr(a))
    with pytest.raises(InputError, match="mask_blur_x must not be negative"):
        im.blur_mask(a, -1, 4)
    with pytest.raises(InputError, match="mask_blur_y must be a number"):
        im.blur_mask(a, 4, "4")


def test_blur_below_a_fifth_of_a_pixel_is_identity():
    """OpenCV's kernel for sigma < 0.2 has one tap (2*int(2.5*sigma + 0.5) + 1 = 1): no blur, also
    for sigmas whose square underflows to 0 (1e-300 once divided by zero)."""
    a = rand_mask(np.random.default_rng(11), 20, 10)
    for s in (1e-300, 5e-324, 1e-8, 0.19):
        assert im.gaussian_kernel_u8(s).tolist() == [256]
        assert np.array_equal(arr(im.blur_mask(a, s, s)), arr(a))
    cv2 = pytest.importorskip("cv2")
    assert np.array_equal(arr(im.blur_mask(a, 1e-300, 0.1)), _cv2_blur(cv2, arr(a), 1e-300, 0.1))


def test_gaussian_kernel_sums_to_one_in_fixed_point():
    cv2 = pytest.importorskip("cv2")
    for s in (0.5, 1, 4, 9.5, 33):
        k = im.gaussian_kernel_u8(s)
        assert k.sum() == 256 and np.array_equal(k, k[::-1]) and k.size == 2 * int(2.5 * s + 0.5) + 1
        # close to OpenCV's floating-point kernel
        np.testing.assert_allclose(k / 256, cv2.getGaussianKernel(k.size, s)[:, 0], atol=1 / 256)


# --------------------------------------------------------------------------- fill


def _reference_fill(image, mask):
    """A1111's masking.fill computed independently of Pillow's image modes: the image
    premultiplied by alpha = 255 - mask (in NumPy), each premultiplied channel blurred on its own
    (Pillow's GaussianBlur of an L image, the only Pillow operation used), un-premultiplied, and
    the layers at (radius, repeats) (256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1) stacked
    with the "over" operator in floating point, starting from transparent black."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    alpha = 255.0 - np.asarray(mask.convert("L"), dtype=np.float64)
    premul = np.concatenate([np.floor(rgb * alpha[..., None] / 255.0 + 0.5), alpha[..., None]], axis=-1)
    out_c = np.zeros(rgb.shape)
    out_a = np.zeros(alpha.shape)
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        bands = [np.asarray(Image.fromarray(premul[..., k].astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(radius)),
                            dtype=np.float64) for k in range(4)]
        a = bands[3] / 255.0
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(a[..., None] > 0, np.stack(bands[:3], -1) / np.maximum(a, 1e-12)[..., None], 0.0)
        c = np.clip(c, 0, 255)
        for _ in range(repeats):
            new_a = a + out_a * (1 - a)
            with np.errstate(invalid="ignore", divide="ignore"):
                out_c = np.where(new_a[..., None] > 0,
                                 (c * a[..., None] + out_c * (out_a * (1 - a))[..., None]) / np.maximum(new_a, 1e-12)[..., None],
                                 0.0)
            out_a = new_a
    return out_c


def test_fill_masked():
    rng = np.random.default_rng(11)
    img = rand_rgb(rng, 64, 48)
    mask = rand_mask(rng, 64, 48, blobs=2)
    out = im.fill_masked(img, mask)
    m = arr(mask) > 0
    assert np.array_equal(arr(out)[~m], arr(img)[~m])  # unmasked pixels untouched
    # Pillow stores every layer and every composite in 8 bits: at most 1/2 level of rounding per
    # conversion, over the 2 conversions and 10 composites of the stack
    ref = _reference_fill(img, mask)
    assert np.abs(arr(out).astype(np.float64) - ref).max() <= 6
    assert np.abs(arr(out).astype(np.float64) - ref)[m].mean() <= 1.0
    # a flat image fills its hole with its own colour
    flat = Image.new("RGB", (40, 30), (12, 130, 250))
    hole = Image.new("L", (40, 30))
    hole.paste(255, (10, 5, 30, 25))
    diff = np.abs(arr(im.fill_masked(flat, hole)).astype(int) - [12, 130, 250])
    assert diff.max() <= 12 and diff.mean() < 1  # up to Pillow's premultiplied-alpha quantisation


# --------------------------------------------------------------------------- crop regions


def test_crop_region_is_the_padded_bbox():
    rng = np.random.default_rng(12)
    for _ in range(100):
        w, h = (int(v) for v in rng.integers(1, 60, 2))
        a = (rng.random((h, w)) > 0.97).astype(np.uint8) * int(rng.integers(1, 256))
        pad = int(rng.integers(0, 10))
        box = im.crop_region(Image.fromarray(a), pad)
        ys, xs = np.nonzero(a)
        if ys.size == 0:
            assert box is None
            continue
        assert box == (max(xs.min() - pad, 0), max(ys.min() - pad, 0), min(xs.max() + 1 + pad, w), min(ys.max() + 1 + pad, h))
    assert im.crop_region(Image.new("L", (9, 9), 255), 2.0) == (0, 0, 9, 9)
    with pytest.raises(InputError, match="padding must be a whole number of pixels, got 2.5"):
        im.crop_region(Image.new("L", (4, 4), 255), 2.5)
    with pytest.raises(InputError, match="padding must not be negative"):
        im.crop_region(Image.new("L", (4, 4), 255), -1)


def test_crop_region_expanded_matches_diffusers(vae_processor):
    rng = np.random.default_rng(13)
    for _ in range(200):
        iw, ih = (int(v) for v in rng.integers(8, 200, 2))
        mask = rand_mask(rng, iw, ih, blobs=int(rng.integers(1, 3)))
        pw, ph = (int(v) * 8 for v in rng.integers(1, 96, 2))
        pad = int(rng.integers(0, 40))
        box = im.crop_region(mask, pad)
        ours = im.expand_crop_region(box, pw, ph, iw, ih)
        ref = vae_processor.get_crop_region(mask, pw, ph, pad=pad)
        assert ours == tuple(int(v) for v in ref), (iw, ih, pw, ph, pad)


# --------------------------------------------------------------------------- mask vs image


def test_match_mask():
    img = Image.new("RGB", (512, 384))
    same = Image.new("L", (512, 384), 7)
    assert im.match_mask(same, img) is same
    small = Image.new("L", (128, 96), 200)
    out = im.match_mask(small, img)
    assert out.size == (512, 384) and arr(out).min() == 200 == arr(out).max()
    assert im.match_mask(Image.new("L", (512, 385)), img).size == (512, 384)  # one pixel off
    assert im.match_mask(Image.new("L", (3, 2)), (512, 340)).size == (512, 340)
    with pytest.raises(InputError, match=r"mask is 512x512 but the image is 512x384: their aspect ratios differ"):
        im.match_mask(Image.new("L", (512, 512)), img)
    with pytest.raises(InputError, match=r"mask is 1000x10 but the image is 2000x10"):
        im.match_mask(Image.new("L", (1000, 10)), (2000, 10))


def test_invert_and_double_mask():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    m = Image.fromarray(a)
    assert np.array_equal(arr(im.invert(m)), 255 - a)
    assert np.array_equal(arr(im.double_mask(m)), np.clip(a.astype(int) * 2, 0, 255))


# --------------------------------------------------------------------------- overlay


def test_overlay_matches_diffusers_apply_overlay(vae_processor):
    rng = np.random.default_rng(14)
    for trial in range(12):
        iw, ih = (int(v) for v in rng.integers(40, 120, 2))
        original = rand_rgb(rng, iw, ih)
        mask = im.blur_mask(rand_mask(rng, iw, ih, blobs=1), 3, 3)
        if trial % 2:  # whole picture: the output has the image's size
            output = rand_rgb(rng, iw, ih)
            ours = im.apply_overlay(output, im.make_overlay(original, mask))
            ref = vae_processor.apply_overlay(mask, original, output)
        else:  # only masked: the output covers the crop box
            box = im.expand_crop_region(im.crop_region(mask, 4), 64, 48, iw, ih)
            output = rand_rgb(rng, 64, 48)
            ours = im.apply_overlay(output, im.make_overlay(original, mask), box)
            ref = vae_processor.apply_overlay(mask, original, output, crop_coords=box)
        assert ours.mode == "RGB" and ours.size == (iw, ih)
        assert np.array_equal(arr(ours), arr(ref)), trial


def test_overlay_with_a_binary_mask_restores_the_original_exactly():
    rng = np.random.default_rng(15)
    original, output = rand_rgb(rng, 50, 30), rand_rgb(rng, 50, 30)
    mask = rand_mask(rng, 50, 30)
    m = arr(mask) > 0
    out = arr(im.apply_overlay(output, im.make_overlay(original, mask)))
    assert np.array_equal(out[~m], arr(original)[~m])
    assert np.array_equal(out[m], arr(output)[m])
    # pasted back from a crop box: outside the mask still the original, inside the resized output
    box = im.crop_region(mask)
    crop_out = rand_rgb(rng, box[2] - box[0], box[3] - box[1])
    out = arr(im.apply_overlay(crop_out, im.make_overlay(original, mask), box))
    assert np.array_equal(out[~m], arr(original)[~m])
    inner = np.zeros_like(m)
    inner[box[1] : box[3], box[0] : box[2]] = True
    assert np.array_equal(out[m & inner], arr(crop_out)[m[box[1] : box[3], box[0] : box[2]]])


def test_paste_without_overlay():
    out = im.apply_overlay(Image.new("RGB", (4, 4), (9, 9, 9)), None, (2, 2, 6, 6), size=(8, 8))
    a = arr(out)
    assert a[2:6, 2:6].min() == 9 == a[2:6, 2:6].max() and a[:2].max() == 0


# --------------------------------------------------------------------------- latent masks


def test_latent_mask_a1111():
    rng = np.random.default_rng(16)
    mask = im.blur_mask(rand_mask(rng, 96, 64), 4, 4)
    for rnd in (True, False):
        ours = im.latent_mask(mask, 8, 12, round=rnd)
        # processing.py: latmask = mask.convert('RGB').resize((w, h)) (Pillow's default filter), / 255
        ref = np.moveaxis(np.array(mask.convert("RGB").resize((12, 8)), dtype=np.float32), 2, 0) / 255
        ref = ref[0]
        if rnd:
            ref = np.around(ref)
        assert ours.shape == (1, 1, 8, 12) and ours.dtype == np.float32
        assert np.array_equal(ours[0, 0], ref)


def test_latent_mask_diffusers(mask_processor):
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(17)
    for w, h in [(96, 64), (64, 64), (120, 48)]:
        mask = im.blur_mask(rand_mask(rng, w, h), 5, 5)
        ref = mask_processor.preprocess(mask, height=h, width=w)
        ref = F.interpolate(ref, size=(h // 8, w // 8)).numpy()
        assert np.array_equal(im.latent_mask_diffusers(mask, h // 8, w // 8), ref)


def test_binary_mask_array():
    torch = _torch()
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ref = torch.round(torch.from_numpy(a.astype(np.float32) / 255.0))[None, None].numpy()
    assert np.array_equal(im.binary_mask_array(Image.fromarray(a)), ref)
    assert np.array_equal(im.binary_mask_array(Image.fromarray(a), round=False)[0, 0], a.astype(np.float32) / 255)


def test_no_heavy_imports_at_run_time():
    import subprocess
    import sys

    code = (
        "import sys, sdrt.runtime.images, sdrt.runtime.infotext; "
        "bad = [m for m in ('cv2', 'scipy', 'torch', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- resampling


def _pillow_reference_cases():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pillow_reference", root / "scripts" / "pillow_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cases(), np.load(root / "tests" / "data" / "pillow-resize-reference.npz")


def test_resize_is_pillow_9_5_whatever_pillow_is_installed():
    """A1111 v1.10.1 resizes with Pillow 9.5; Pillow 10.0 to 12.3 compute the same, Pillow 13
    does not. The fixture holds Pillow 12.3.0's results (identical to 9.5.0's) for hard-edged
    masks and noise, Lanczos and bicubic, up and down, with boxes of zero width or height (A1111's
    resize-and-fill bands); sdrt's resampler must give them bit for bit."""
    from sdrt.runtime import resample

    cases, ref = _pillow_reference_cases()
    assert str(ref["pillow_version"]).split(".")[0] in ("9", "10", "11", "12")
    for name, a, size, kind, box in cases:
        np.testing.assert_array_equal(resample.resize_array(a, size, kind, box), ref[name], err_msg=name)
        out = resample.resize(Image.fromarray(a), size, kind, box)  # the path sdrt takes here
        np.testing.assert_array_equal(np.asarray(out), ref[name], err_msg=name)
    # the installed Pillow is used only where it computes the same
    filters = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
    native_same = all(np.array_equal(np.asarray(Image.fromarray(a).resize(size, filters[kind], box=box)), ref[name])
                      for name, a, size, kind, box in cases)
    assert native_same or not resample.PILLOW_MATCHES
