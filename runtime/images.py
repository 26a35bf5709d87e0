"""Image and mask processing for img2img and inpainting. NumPy and Pillow only.

Conventions: images are PIL RGB, masks PIL L with 255 = repaint, arrays are float32 NCHW.
The functions follow AUTOMATIC1111's processing (resize modes, mask blur, fill, "only masked"
crop and paste-back, overlay) and diffusers' VaeImageProcessor where the two agree; where they
differ both flavours are here under distinct names (latent_mask / latent_mask_diffusers).
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from . import resample
from .errors import InputError

__all__ = [
    "InputError",
    "MAX_INPUT_PIXELS",
    "open_image",
    "oriented_size",
    "RESIZE_MODES",
    "DEFAULT_BACKGROUND",
    "load_image",
    "load_mask",
    "flatten",
    "target_size",
    "resize_image",
    "resize_latents",
    "nearest_resize",
    "to_array",
    "from_array",
    "invert",
    "blur_mask",
    "gaussian_kernel_u8",
    "double_mask",
    "fill_masked",
    "crop_region",
    "expand_crop_region",
    "match_mask",
    "make_overlay",
    "apply_overlay",
    "latent_mask",
    "latent_mask_diffusers",
    "binary_mask_array",
]

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
DEFAULT_BACKGROUND = "#ffffff"  # A1111's img2img_background_color

# Resizing: resampler "a1111" is Pillow 9.5 to 12.3's Lanczos and bicubic whatever Pillow is
# installed (A1111 v1.10.1's pixels: it pins Pillow 9.5); "pillow" is the installed Pillow, as
# diffusers runs it.
RESAMPLERS = ("a1111", "pillow")


def _resize(img, size, kind="lanczos", box=None, resampler="a1111"):
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {', '.join(RESAMPLERS)}, got {resampler!r}")
    return resample.resize(img, size, kind, box, native=True if resampler == "pillow" else None)
_ACCEPTED_SOURCES = "a file path, encoded image bytes, a PIL image or a uint8 array (HxW, HxWx3 or HxWx4)"
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# The largest input image sdrt decodes (checked from the file's header, before decoding): 8192 x
# 8192. Pillow's own decompression-bomb limit (89 Mpx warns, 179 Mpx fails) is above it, so its
# warning never shows and its error is reported in the same words.
MAX_INPUT_PIXELS = 8192 * 8192


# --------------------------------------------------------------------------- loading


def _too_large(name: str, where: str, w: int, h: int) -> InputError:
    return InputError(f"{name}: {where} is {w}x{h} pixels ({w * h / 1e6:.0f} Mpx); sdrt reads images of up to "
                      f"{MAX_INPUT_PIXELS / 1e6:.0f} Mpx (8192x8192): scale it down first")


def _where(img: Image.Image) -> str:
    f = getattr(img, "filename", "")
    return str(f) if f else "the image"


def open_image(src, name: str = "image", allow_bool: bool = False) -> Image.Image:
    """Any accepted source as a PIL image whose size is known and checked against
    MAX_INPUT_PIXELS, without decoding a file or bytes (Pillow reads the header only): the
    memory a request needs can be checked before its images are decoded. load_image and
    load_mask take what this returns. EXIF orientation is not applied yet (see oriented_size)."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = _from_ndarray(src, name, allow_bool)
    elif isinstance(src, (str, os.PathLike)):
        img = _open_file(Path(src), name)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise InputError(f"{name}: got empty bytes; expected the content of an image file (PNG, JPEG, WebP, ...)")
        img = _open_stream(io.BytesIO(bytes(src)), name, "the bytes given")
    else:
        raise InputError(f"{name}: expected {_ACCEPTED_SOURCES}, got {type(src).__name__}")
    if img.width == 0 or img.height == 0:
        raise InputError(f"{name} is empty ({img.width}x{img.height} pixels); it needs at least 1x1 pixel")
    if img.width * img.height > MAX_INPUT_PIXELS:
        raise _too_large(name, _where(img) if not isinstance(src, np.ndarray) else "the array", img.width, img.height)
    return img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied (5 to 8 swap the sides), read from the
    header: no decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: exif_transpose keeps the pixels as stored
        orientation = 1
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)


def _open(src, name: str, allow_bool: bool = False) -> Image.Image:
    """Any accepted source -> a decoded PIL image, EXIF orientation applied (not arrays)."""
    from_array = isinstance(src, np.ndarray)
    img = open_image(src, name, allow_bool)
    if from_array:
        return img
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings about damaged metadata: the pixels are what counts
            img.load()
    except Exception as e:  # truncated or corrupt data fails here, not later in the pipeline
        raise InputError(f"{name}: {_where(img)} could not be decoded ({e}); the file is truncated or corrupt") from None
    return _exif_transpose(img, name)


def _open_file(path: Path, name: str) -> Image.Image:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{name}: file not found: {path}") from None
    except OSError as e:  # a name too long, a path through a file, no permission on a folder, ...
        raise InputError(f"{name}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # an embedded NUL
        raise InputError(f"{name}: {str(path)!r} is not a usable file name ({e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{name}: {path} is a folder; expected an image file (PNG, JPEG, WebP, ...)")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{name}: {path} is not a regular file (a device, pipe or socket); expected an image file")
    if st.st_size == 0:
        raise InputError(f"{name}: {path} is an empty file (0 bytes); expected an image file (PNG, JPEG, WebP, ...)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InputError(f"{name}: cannot read {path}: {e.strerror or e}") from None
    return _open_stream(str(path), name, str(path))  # Pillow opens it, and closes it once decoded


def _open_stream(fp, name: str, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # damaged metadata: the pixels are what counts
            return Image.open(fp)
    except Image.DecompressionBombError:
        raise InputError(f"{name}: {where} is over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx; sdrt reads images of up "
                         f"to {MAX_INPUT_PIXELS / 1e6:.0f} Mpx (8192x8192): scale it down first") from None
    except Exception:
        raise InputError(
            f"{name}: {where} is not an image Pillow can read; accepted: PNG, JPEG, WebP, BMP, TIFF, GIF "
            "and the other formats Pillow opens"
        ) from None


def _exif_transpose(img: Image.Image, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: keep the pixels as stored
        return img
    return img if out is None else out


def _from_ndarray(a: np.ndarray, name: str, allow_bool: bool) -> Image.Image:
    accepted = "uint8 arrays of shape HxW (grey), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)"
    if allow_bool:
        accepted += ", or a bool HxW array"
    if a.dtype == np.bool_ and allow_bool and a.ndim == 2:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise InputError(f"{name}: unsupported array dtype {a.dtype} (shape {a.shape}); accepted: {accepted}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise InputError(f"{name}: unsupported array shape {a.shape}; accepted: {accepted}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"{name} is empty (array shape {a.shape}); it needs at least 1x1 pixel")
    if a.shape[0] * a.shape[1] > MAX_INPUT_PIXELS:
        raise _too_large(name, "the array", a.shape[1], a.shape[0])
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit greyscale (PNG 16-bit grey, TIFF) -> L, scaled, not clipped."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if a.size and float(a.max()) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    a = a.astype(np.int64)
    if a.size and (a.max() > 255 or img.mode.startswith("I;16")):
        a = (a * 255 + 32767) // 65535  # 0..65535 -> 0..255, rounded
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def flatten(img: Image.Image, background=DEFAULT_BACKGROUND) -> Image.Image:
    """Composite any transparency onto `background` and return RGB (A1111's images.flatten, also
    for LA, P/L/RGB with a transparency key and premultiplied modes)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _high_depth_to_8bit(img)
    if _has_transparency(img):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        try:
            base = Image.new("RGBA", img.size, background)
        except (ValueError, TypeError):
            raise InputError(f"background colour {background!r} is not a colour Pillow understands (e.g. '#ffffff', 'white', (255, 255, 255))") from None
        base.paste(img, mask=img)
        img = base
    return img.convert("RGB")


def load_image(src, name: str = "image", background=DEFAULT_BACKGROUND) -> Image.Image:
    """Read an image as PIL RGB.

    src: a path, encoded bytes, a PIL image, or a uint8 array HxW / HxWx3 / HxWx4. EXIF
    orientation is applied (files, bytes and PIL images); transparency (RGBA, LA, P or RGB with a
    transparency key) is flattened onto `background` (A1111's img2img_background_color, white).
    Raises InputError naming `name` for a missing, unreadable, corrupt, truncated or empty input.
    """
    return flatten(_open(src, name), background)


def load_mask(src, name: str = "mask", round: bool = True) -> Image.Image:
    """Read an inpainting mask as PIL L (255 = repaint), as A1111's create_binary_mask.

    A mask with an alpha channel that is not fully opaque is taken from its alpha channel,
    thresholded at > 128 when `round`; any other mask is converted to greyscale. Same sources and
    errors as load_image; a bool HxW array is accepted too (True = repaint).
    """
    img = _open(src, name, allow_bool=True)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _high_depth_to_8bit(img)
    if _has_transparency(img):
        img = img.convert("RGBA")
    if img.mode == "RGBA" and img.getextrema()[3] != (255, 255):
        alpha = img.getchannel("A")
        if round:
            alpha = alpha.point(lambda v: 255 if v > 128 else 0)
        return alpha
    return img.convert("L")


# --------------------------------------------------------------------------- sizes and resizing


def _whole(name: str, v, allow_none: bool = True) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InputError(f"{name} must be a whole number of pixels, got {v!r}")
    if v < 0:
        raise InputError(f"{name} must not be negative, got {v}")
    return int(v)


def target_size(image_size: Sequence[int], width=None, height=None, factor: int = 8) -> tuple[int, int]:
    """The (width, height) a request works at.

    width/height None: the image's own; 0: from the other one keeping the image's aspect ratio
    (ComfyUI ImageScale: max(1, round(...))); both 0: the image's size. The result is floored to
    a multiple of `factor` (the VAE's downscale factor) and is at least `factor`.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    iw, ih = (int(v) for v in image_size)
    if iw <= 0 or ih <= 0:
        raise InputError(f"image size must be positive, got {iw}x{ih}")
    w = _whole("width", width)
    h = _whole("height", height)
    w = iw if w is None else w
    h = ih if h is None else h
    if w == 0 and h == 0:
        w, h = iw, ih
    elif w == 0:
        w = max(1, round(iw * h / ih))
    elif h == 0:
        h = max(1, round(ih * w / iw))
    return max(factor, w // factor * factor), max(factor, h // factor * factor)


def _check_mode(mode) -> str:
    if mode == "latent_upscale":
        raise InputError("resize mode 'latent_upscale' resizes the latents, not the image: use resize_latents")
    if mode not in RESIZE_MODES:
        raise InputError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return mode


def resize_image(img: Image.Image, width: int, height: int, mode: str = "just_resize", resampler: str = "a1111") -> Image.Image:
    """A1111's resize_image modes 0-2 with Lanczos (= diffusers' VaeImageProcessor.resize modes
    default / crop / fill).

    just_resize: stretch to width x height. crop_and_resize: scale to cover, centre-crop.
    resize_and_fill: scale to fit, centre, and fill the borders by stretching the edge rows or
    columns. The result keeps the input's mode (L stays L). resampler: "a1111" (Pillow 9.5's
    arithmetic, whatever Pillow is installed) or "pillow" (the installed Pillow, as diffusers).
    """
    _check_mode(mode)
    width = _whole("width", width, allow_none=False)
    height = _whole("height", height, allow_none=False)
    if width == 0 or height == 0:
        raise InputError(f"cannot resize to {width}x{height}: both sides must be at least 1 pixel")
    if mode == "just_resize":
        return _resize(img, (width, height), resampler=resampler)

    ratio = width / height
    src_ratio = img.width / img.height
    if mode == "crop_and_resize":
        src_w = width if ratio > src_ratio else img.width * height // img.height
        src_h = height if ratio <= src_ratio else img.height * width // img.width
    else:
        src_w = width if ratio < src_ratio else img.width * height // img.height
        src_h = height if ratio >= src_ratio else img.height * width // img.width
    src_w, src_h = max(1, src_w), max(1, src_h)
    resized = _resize(img, (src_w, src_h), resampler=resampler)
    out = Image.new(img.mode if img.mode in ("L", "RGB") else "RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "resize_and_fill":
        if ratio < src_ratio:  # bands above and below
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(_resize(resized, (width, fill), "bicubic", box=(0, 0, width, 0), resampler=resampler), box=(0, 0))
                out.paste(_resize(resized, (width, fill), "bicubic", box=(0, src_h, width, src_h), resampler=resampler), box=(0, fill + src_h))
        elif ratio > src_ratio:  # bands left and right
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(_resize(resized, (fill, height), "bicubic", box=(0, 0, 0, height), resampler=resampler), box=(0, 0))
                out.paste(_resize(resized, (fill, height), "bicubic", box=(src_w, 0, src_w, height), resampler=resampler), box=(fill + src_w, 0))
    return out


def _linear_taps(in_size: int, out_size: int):
    """Source indices and weights of a 1-D linear resize, align_corners=False, computed as
    PyTorch's CPU kernel does: float32 scale in / out, source index scale * (i + 0.5) - 0.5
    rounded once to float32 (a fused multiply-add), clamped at 0; float32 weights."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    w0 = f32(1.0) - w1
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, w0.astype(np.float64), w1.astype(np.float64)


def resize_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (..., H, W) arrays to (..., height, width), align_corners=False: the same
    as torch.nn.functional.interpolate(mode="bilinear") (A1111's latent upscale, resize mode 3)."""
    x = np.asarray(latents)
    if x.ndim < 2:
        raise ValueError(f"expected an array of shape (..., H, W), got {x.shape}")
    height = _whole("height", height, allow_none=False)
    width = _whole("width", width, allow_none=False)
    if height == 0 or width == 0:
        raise InputError(f"cannot resize latents to {width}x{height}")
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    y = x.astype(np.float64)
    i0, i1, a0, a1 = _linear_taps(x.shape[-2], height)
    y = y[..., i0, :] * a0[:, None] + y[..., i1, :] * a1[:, None]
    j0, j1, b0, b1 = _linear_taps(x.shape[-1], width)
    y = y[..., j0] * b0 + y[..., j1] * b1
    return y.astype(dtype)


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch's "nearest" (not "nearest-exact"): floor(dst * (in / out)) in float32, clamped.
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def nearest_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of (..., H, W) arrays, equal to
    torch.nn.functional.interpolate(mode="nearest") (diffusers' mask to latent size)."""
    x = np.asarray(x)
    return x[..., _nearest_index(x.shape[-2], height)[:, None], _nearest_index(x.shape[-1], width)[None, :]]


# --------------------------------------------------------------------------- arrays


def to_array(images) -> np.ndarray:
    """PIL image(s) -> float32 (N, 3, H, W) in [-1, 1], as diffusers' preprocess and A1111
    (x / 255 * 2 - 1 in float32)."""
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("to_array needs at least one image")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise InputError(f"images in one batch must have the same size, got {sorted(sizes)}")
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / np.float32(255.0)
    a = a * np.float32(2.0) - np.float32(1.0)
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def from_array(x: np.ndarray, rounding: str = "round") -> list[Image.Image]:
    """(N, 3, H, W) or (3, H, W) in [-1, 1] -> PIL RGB images.

    rounding="round": diffusers' postprocess, clamp(x/2 + 0.5, 0, 1) then (v*255).round() in
    float32 (round half to even). rounding="floor": A1111's clamp((x+1)/2, 0, 1) * 255 then a
    truncating cast. NaN becomes 0.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"expected an array of shape (N, 3, H, W), got {np.asarray(x).shape}")
    if rounding == "round":
        v = np.clip(a / np.float32(2.0) + np.float32(0.5), 0.0, 1.0)
        v = np.nan_to_num(v, nan=0.0)
        u8 = (v * np.float32(255.0)).round().astype(np.uint8)
    elif rounding == "floor":
        v = np.clip((a + np.float32(1.0)) / np.float32(2.0), 0.0, 1.0)
        v = np.nan_to_num(v, nan=0.0)
        u8 = (np.float32(255.0) * v).astype(np.uint8)
    else:
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
    return [Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)), mode="RGB") for im in u8]


# --------------------------------------------------------------------------- masks


def invert(mask: Image.Image) -> Image.Image:
    """255 - mask (A1111's inpainting_mask_invert)."""
    return ImageOps.invert(mask.convert("L"))


def double_mask(mask: Image.Image) -> Image.Image:
    """clip(mask * 2, 0, 255): A1111's mask_for_overlay in "whole picture" mode."""
    a = np.asarray(mask.convert("L"), dtype=np.uint16) * 2
    return Image.fromarray(np.minimum(a, 255).astype(np.uint8), mode="L")


def _check_blur(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise InputError(f"{name} must be a number of pixels (0 = no blur), got {v!r}")
    if v < 0:
        raise InputError(f"{name} must not be negative, got {v}")
    return float(v)


def gaussian_kernel_u8(sigma: float) -> np.ndarray:
    """A1111's mask blur kernel in OpenCV's 8-bit fixed point: k = 2*int(2.5*sigma + 0.5) + 1
    taps of a Gaussian normalised to 1, turned into integers summing to 256 (8 fraction bits)
    with error diffusion from the outside in, the centre tap taking the remainder."""
    n = 2 * int(2.5 * sigma + 0.5) + 1
    if n == 1:  # sigma below 0.2: one tap, no blur (as OpenCV; 1/sigma^2 would overflow for tiny sigmas)
        return np.array([256], dtype=np.int64)
    half = (n - 1) // 2
    scale2 = -0.125 / (sigma * sigma)  # exp(-(x/2)^2 / (2 sigma^2)) for x = 2*(i - half)
    values = []
    total = 0.0
    for i in range(half):
        x = 1 - n + 2 * i
        t = math.exp(float(x * x) * scale2)
        values.append(t)
        total += t
    total = total * 2.0 + 1.0
    inv = 1.0 / total
    taps = np.zeros(n, dtype=np.int64)
    err = 0.0
    acc = 0
    for i in range(half):
        adj = values[i] * inv * 256.0 + err
        v = round(adj)  # half to even, as cvRound
        err = adj - v
        taps[i] = taps[n - 1 - i] = v
        acc += v
    taps[half] = 256 - 2 * acc
    return taps


def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    taps = gaussian_kernel_u8(sigma)
    n = taps.size
    r = n // 2
    length = a.shape[axis]
    if n == 1:
        return a
    p = np.take(a, _reflect101(np.arange(-r, length + r), length), axis=axis).astype(np.int32)
    p = np.moveaxis(p, axis, 0)
    acc = p[r : r + length] * np.int32(taps[r])
    for t in range(r):
        acc += (p[t : t + length] + p[n - 1 - t : n - 1 - t + length]) * np.int32(taps[t])
    out = (acc + 128) >> 8  # the other pass is the 1-tap kernel: round half up to 8 bits
    return np.moveaxis(out, 0, axis).astype(np.uint8)


def blur_mask(mask: Image.Image, blur_x: float = 4, blur_y: float = 4) -> Image.Image:
    """A1111's mask blur: cv2.GaussianBlur with kernel (k, 1), sigma blur_x, then (1, k), sigma
    blur_y, k = 2*int(2.5*sigma + 0.5) + 1, BORDER_REFLECT_101, reproduced bit for bit in NumPy
    (OpenCV's 8-bit path is fixed point). 0 skips a direction."""
    bx = _check_blur("mask_blur_x", blur_x)
    by = _check_blur("mask_blur_y", blur_y)
    a = np.asarray(mask.convert("L"))
    if bx > 0:
        a = _blur_axis(a, bx, axis=1)
    if by > 0:
        a = _blur_axis(a, by, axis=0)
    return Image.fromarray(np.ascontiguousarray(a), mode="L")


_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masking.fill ("Masked content: fill"): remove the masked pixels, then composite
    Gaussian blurs (PIL, premultiplied alpha) of what remains at decreasing radii, so the hole
    takes the smeared colours around it. Pixels where the mask is 0 are unchanged."""
    if image.size != mask.size:
        raise ValueError(f"image {image.size} and mask {mask.size} differ in size")
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in _FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def _as_l_array(mask) -> np.ndarray:
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"))
    a = np.asarray(mask)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {a.shape}")
    return a


def crop_region(mask, padding: int = 0) -> tuple[int, int, int, int] | None:
    """A1111's get_crop_region_v2: the box (x1, y1, x2, y2) around the mask's nonzero pixels,
    grown by `padding` on every side and clamped to the mask; None for a blank mask."""
    if isinstance(padding, (float, np.floating)) and float(padding).is_integer():
        padding = int(padding)
    padding = _whole("padding", padding, allow_none=False)
    a = _as_l_array(mask)
    rows = np.flatnonzero(a.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(a.any(axis=0))
    h, w = a.shape
    x1, y1, x2, y2 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)


def expand_crop_region(box, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """A1111's expand_crop_region: widen (or heighten) `box` to the width:height ratio of the
    processing size, around its centre, shifting it back inside image_w x image_h."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"crop box {box} is empty")
    want = width / height
    if (x2 - x1) / (y2 - y1) > want:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / want - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * want - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    """[lo, hi) widened by `grow` around its centre, shifted back inside [0, limit) (A1111's rule)."""
    lo -= grow // 2
    hi += grow - grow // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def check_mask_size(mask_size, image_size, name: str = "mask") -> None:
    """A mask must have the image's proportions (within one pixel): A1111 resizes it to the image
    with Lanczos; other proportions are an InputError. Sizes only: this runs before decoding."""
    mw, mh = (int(v) for v in mask_size)
    iw, ih = (int(v) for v in image_size)
    # |mh/mw - ih/iw| within one pixel at the larger of the two resolutions
    if (mw, mh) != (iw, ih) and abs(mh * iw - ih * mw) > max(mw, mh, iw, ih):
        raise InputError(
            f"{name} is {mw}x{mh} but the image is {iw}x{ih}: their aspect ratios differ; "
            f"give a mask of the image's size ({iw}x{ih}) or of the same proportions"
        )


def match_mask(mask: Image.Image, image, name: str = "mask", resampler: str = "a1111") -> Image.Image:
    """The mask at the image's size. A mask of the same proportions (within one pixel) is
    resized with Lanczos, as A1111 does; one of other proportions is an InputError."""
    iw, ih = image.size if isinstance(image, Image.Image) else (int(v) for v in image)
    check_mask_size(mask.size, (iw, ih), name)
    if mask.size == (iw, ih):
        return mask
    return _resize(mask, (iw, ih), resampler=resampler)


# --------------------------------------------------------------------------- overlay / paste-back


def make_overlay(original: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The original as RGBA with alpha = 255 - mask (A1111's overlay_images): composited over the
    output, it restores the original outside the mask, feathered where the mask is soft."""
    if original.size != mask_for_overlay.size:
        raise ValueError(f"image {original.size} and mask {mask_for_overlay.size} differ in size")
    out = Image.new("RGBa", original.size)
    out.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return out.convert("RGBA")


def apply_overlay(output: Image.Image, overlay: Image.Image | None, paste_box=None, size=None,
                  resampler: str = "a1111") -> Image.Image:
    """Put a generated image back over the original (A1111's apply_overlay).

    paste_box (x1, y1, x2, y2), "only masked" mode: the output is resized with crop_and_resize to
    the box and pasted on a transparent canvas of the overlay's size (or `size` when there is no
    overlay; the canvas outside the box is then black). The overlay, when given, is
    alpha-composited on top. Returns RGB.
    """
    if paste_box is not None:
        x1, y1, x2, y2 = (int(v) for v in paste_box)
        canvas = overlay.size if overlay is not None else size
        if canvas is None:
            raise ValueError("apply_overlay needs the overlay or size to paste into")
        base = Image.new("RGBA", tuple(canvas))
        base.paste(resize_image(output.convert("RGB"), x2 - x1, y2 - y1, "crop_and_resize", resampler), (x1, y1))
        output = base
    if overlay is None:
        return output.convert("RGB")
    if output.size != overlay.size:
        raise ValueError(f"output {output.size} and overlay {overlay.size} differ in size")
    out = output.convert("RGBA")
    out.alpha_composite(overlay.convert("RGBA"))
    return out.convert("RGB")


# --------------------------------------------------------------------------- masks for the loop


def latent_mask(mask: Image.Image, height: int, width: int, round: bool = True) -> np.ndarray:
    """A1111's latent mask: the mask resized to latent size (PIL's default bicubic, as A1111's
    `latmask.resize(...)`), / 255, rounded when `round`. float32 (1, 1, height, width), 1 = repaint."""
    m = _resize(mask.convert("L"), (width, height), "bicubic")
    a = np.asarray(m, dtype=np.float32) / np.float32(255.0)
    if round:
        a = np.around(a)
    return a[None, None].astype(np.float32)


def latent_mask_diffusers(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """diffusers' inpainting mask: binarized in pixel space (>= 0.5 -> 1) and brought to latent size
    with nearest interpolation (F.interpolate default). float32 (1, 1, height, width), 1 = repaint.
    `mask` must already be at the processing size (diffusers resizes it with Lanczos first)."""
    a = np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255.0)
    a = (a >= 0.5).astype(np.float32)
    return nearest_resize(a[None, None], height, width)


def binary_mask_array(mask: Image.Image, round: bool = True) -> np.ndarray:
    """The mask at pixel size as float32 (1, 1, H, W): / 255, rounded to 0/1 when `round`
    (A1111's conditioning mask for inpainting models; 1 = repaint)."""
    a = np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255.0)
    if round:
        a = np.around(a)
    return a[None, None].astype(np.float32)
