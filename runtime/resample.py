"""Lanczos and bicubic image resizing exactly as Pillow 9.5 to 12.3 do it, whatever Pillow is
installed (Pillow 13 resamples differently; A1111 v1.10.1 pins Pillow 9.5).

Pillow's algorithm (libImaging/Resample.c): a separable convolution, horizontal pass first, each
into 8 bits. Per output pixel the filter is centred at in0 + (x + 0.5) * scale, stretched by the
scale when downscaling, its taps normalised to sum 1 in double precision and rounded to 22-bit
fixed point; a pass adds 2**21 to the sum of taps * pixels and shifts it back, clipped to 0..255.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL
from PIL import Image

PRECISION_BITS = 22  # 32 - 8 - 2


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


def _bicubic(x: float) -> float:  # Keys' cubic convolution, a = -0.5
    a = -0.5
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


FILTERS = {"lanczos": (_lanczos, 3.0), "bicubic": (_bicubic, 2.0)}


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, in0: float, in1: float, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(source index, fixed-point weight) of every tap of every output pixel, both (out, taps)."""
    filt, base_support = FILTERS[kind]
    in0, in1 = np.float32(in0), np.float32(in1)  # Pillow takes the box as C floats
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.int64)
    one = 1 << PRECISION_BITS
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = float(in0) + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        w = [filt((x + xmin - center + 0.5) * ss) for x in range(count)]
        total = 0.0
        for v in w:
            total += v
        for x, v in enumerate(w):
            v = v / total if total != 0.0 else v
            weight[xx, x] = int(-0.5 + v * one) if v < 0 else int(0.5 + v * one)
        index[xx, :count] = np.arange(xmin, xmin + count)
        index[xx, count:] = xmin  # taps past the last carry weight 0
    index.flags.writeable = weight.flags.writeable = False
    return index, weight


@functools.lru_cache(maxsize=64)
def _matrix(in_size: int, in0: float, in1: float, out_size: int, kind: str) -> np.ndarray:
    """The pass as a dense (in_size, out_size) matrix of fixed-point weights (float64: every
    product and sum is an integer below 2**53, so the matrix product is exact)."""
    index, weight = coefficients(in_size, in0, in1, out_size, kind)
    m = np.zeros((in_size, out_size), np.float64)
    np.add.at(m, (index, np.arange(out_size)[:, None]), weight)
    m.flags.writeable = False
    return m


def _pass(a: np.ndarray, m: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(a, axis, -1)
    flat = np.ascontiguousarray(moved, dtype=np.float64).reshape(-1, moved.shape[-1])
    acc = flat @ m  # one matrix product
    acc += 1 << (PRECISION_BITS - 1)
    acc *= 1.0 / (1 << PRECISION_BITS)
    out = np.clip(np.floor(acc), 0, 255).astype(np.uint8).reshape(moved.shape[:-1] + (m.shape[1],))
    return np.moveaxis(out, -1, axis)


def resize_array(a: np.ndarray, size: tuple[int, int], kind: str = "lanczos", box=None) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) resized to size = (width, height) from the region box =
    (x0, y0, x1, y1) of the source (default: all of it), as Pillow <= 12.3's Image.resize."""
    h_in, w_in = a.shape[:2]
    w, h = (int(v) for v in size)
    box = (0, 0, w_in, h_in) if box is None else tuple(box)
    if (w, h) == (w_in, h_in) and box == (0, 0, w_in, h_in):
        return a.copy()
    out = a
    if w != w_in or box[0] or box[2] != w:
        out = _pass(out, _matrix(w_in, box[0], box[2], w, kind), axis=1)
    if h != h_in or box[1] or box[3] != h:
        out = _pass(out, _matrix(h_in, box[1], box[3], h, kind), axis=0)
    return out


# Pillow 10.0 to 12.3 compute the same as 9.5 (checked); from 13 on, this module does the work.
PILLOW_MATCHES = 10 <= int(PIL.__version__.split(".")[0]) < 13
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}


def resize(img: Image.Image, size: tuple[int, int], kind: str = "lanczos", box=None, *, native=None) -> Image.Image:
    """A PIL image (L or RGB; other modes are converted to RGB) resized as Pillow <= 12.3 does:
    by the installed Pillow where it computes the same (faster), else by resize_array."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if PILLOW_MATCHES if native is None else native:
        return img.resize(tuple(size), resample=_PIL_FILTERS[kind], box=box)
    return Image.fromarray(resize_array(np.asarray(img), size, kind, box), mode=img.mode)
