"""Reference resizes from a Pillow that computes as A1111's Pillow 9.5 (10.0 to 12.3 do), for
tests/test_images.py: run it with such a Pillow (numpy and Pillow only) to rewrite the fixture.

    python scripts/pillow_reference.py tests/data/pillow-resize-reference.npz
"""

from __future__ import annotations

import sys

import numpy as np


def cases():
    """(name, uint8 array, (width, height), "lanczos" | "bicubic", box or None), deterministic."""
    rng = np.random.default_rng(2024)
    out = []
    for i in range(48):
        w, h = (int(v) for v in rng.integers(1, 40, 2))
        dw, dh = (int(v) for v in rng.integers(1, 44, 2))
        kind = ("lanczos", "bicubic")[i % 2]
        rgb = (i // 2) % 2 == 1
        if i % 3 == 0:  # a hard-edged mask: where resamplers overshoot and clip
            a = np.zeros((h, w), np.uint8)
            a[h // 4: h // 2 + 1, w // 3: w // 2 + 1] = 255
            a = np.stack([a, 255 - a, a], -1) if rgb else a
        else:
            a = rng.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
        box = [(0, 0, w, 0), (0, h, w, h), (0, 0, 0, h), (w, 0, w, h), None][i % 5] if i % 4 == 0 else None
        out.append((f"case{i}", a, (dw, dh), kind, box))
    return out


def main(path: str) -> None:
    import PIL
    from PIL import Image

    filters = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
    arrays = {name: np.asarray(Image.fromarray(a).resize(size, filters[kind], box=box))
              for name, a, size, kind, box in cases()}
    np.savez_compressed(path, pillow_version=np.array(PIL.__version__), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
