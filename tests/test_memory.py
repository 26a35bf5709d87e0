"""Memory: the estimate a request is admitted by, against the peak resident memory a child process
really reaches (ru_maxrss), and the refusals that must come before anything large is allocated."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from sdrt.runtime import InputError, load, prepare

# The child's own peak: VmHWM of its address space. (ru_maxrss would also count the parent's memory
# at fork time: Linux carries it over the exec.)
PEAK = r"""
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""

CHILD = PEAK + r"""
import json, sys
import numpy as np
from PIL import Image
from sdrt.runtime import load
model, mode, w, h, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
p = load(None if model == "-" else model, provider="cpu")
img = Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8))
mask = Image.fromarray(np.tile((np.arange(w) < w // 2).astype(np.uint8) * 255, (h, 1)))
kw = dict(steps=2, seed=1, batch_size=b)
if mode == "txt2img":
    p.txt2img("a red circle", width=w, height=h, **kw)
elif mode == "img2img":
    p.img2img(img, "a red circle", strength=1.0, **kw)
else:
    p.inpaint(img, mask, "a red circle", strength=1.0, **kw)
print("PEAK", peak())
"""

# (model, mode, width, height, batch): the embedded model (whose VAE and UNet self-attention
# materialise tokens x tokens scores), the test models (flash attention everywhere), batches.
CASES = [
    ("default", "txt2img", 256, 256, 1),
    ("default", "txt2img", 512, 512, 1),  # the request the old estimate refused ("needs about 24.0 GiB")
    ("default", "img2img", 384, 384, 1),
    ("default", "txt2img", 256, 256, 4),
    ("default", "inpaint", 320, 256, 1),
    ("tiny-sd1", "txt2img", 256, 256, 1),
    ("tiny-sd1", "img2img", 384, 384, 1),
    ("tiny-sd1", "txt2img", 128, 128, 8),
    ("tiny-inpaint", "inpaint", 256, 256, 1),
]


def _folder(models, name):
    return None if name == "default" else models.exported(name)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_estimate_is_within_2x_of_the_measured_peak(models, case):
    name, mode, w, h, b = case
    folder = _folder(models, name)
    info = load(folder, provider="cpu").info
    e = prepare.estimate_memory(info, w, h, b, cfg=True, input_pixels=0 if mode == "txt2img" else w * h * (1 + (mode == "inpaint")),
                                encodes=mode != "txt2img" or info.is_inpainting_model)
    r = subprocess.run([sys.executable, "-c", CHILD, "-" if folder is None else str(folder), mode, str(w), str(h), str(b)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    peak = int(next(ln for ln in r.stdout.splitlines() if ln.startswith("PEAK ")).split()[1])
    ratio = e.total / peak
    print(f"\n{name} {mode} {w}x{h} batch {b}: estimate {e.total / 2**20:.0f} MiB, measured peak {peak / 2**20:.0f} MiB "
          f"(x{ratio:.2f}; largest stage {e.peak_stage[0]})")
    assert 0.5 <= ratio <= 2.0


def test_estimate_against_the_sd15_benchmark(tmp_path, models):
    """docs/benchmarks.md measured sdrt's peak RSS on SD 1.5 (cpu target, fp32), img2img with CFG:
    4466 MiB at 256x256 and 5275 MiB at 512x512. The same architecture and graph sizes (sparse
    files of the exported sizes) must be estimated within 2x of those."""
    src = models.exported("tiny-sd1")
    from sdrt.export.testmodels import KINDS

    folder = tmp_path / "sd15"
    sizes = {"text_encoder": 492_000_000, "unet": 3_438_000_000, "vae_encoder": 136_700_000, "vae_decoder": 198_000_000}
    for g, n in sizes.items():
        (folder / g).mkdir(parents=True)
        (folder / g / "model.onnx").write_bytes(b"")
        with open(folder / g / ("model.onnx_data" if g == "unet" else "model.onnx"), "wb") as f:
            f.truncate(n)  # sparse: no disk space used
    from dataclasses import replace

    info = load(src, provider="cpu").info
    vae = {**KINDS["sd15"].vae}
    unet = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    manifest = {"fused_operators": {"unet": {"MultiHeadAttention": 32}, "vae_decoder": {"Attention": 1},
                                    "vae_encoder": {"Attention": 1}}}
    sd15 = replace(info, vae_scale_factor=8, configs={"unet": unet, "vae": vae}, manifest=manifest,
                   graph_files={g: folder / g / "model.onnx" for g in sizes})
    for size, measured in ((256, 4466), (512, 5275)):
        e = prepare.estimate_memory(sd15, size, size, 1, cfg=True, input_pixels=size * size)
        ratio = e.total / (measured * 2**20)
        print(f"\nSD 1.5 img2img {size}x{size}: estimate {e.total / 2**20:.0f} MiB, benchmark {measured} MiB (x{ratio:.2f})")
        assert 0.5 <= ratio <= 2.0


# --------------------------------------------------------------------------- refused before allocation


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_memory_is_checked_before_the_image_is_decoded(models, tmp_path, monkeypatch):
    """A 6000x6000 PNG whose pixel data is a stub: the memory refusal comes from its header. Had the
    image been decoded first, the error would be that the file is truncated."""
    pipe = load(models.exported("tiny-sd1"), provider="cpu")
    path = tmp_path / "big.png"
    path.write_bytes(png_header(6000, 6000))
    monkeypatch.setattr(prepare, "available_memory", lambda provider: 1 << 30)
    with pytest.raises(InputError, match=r"6000x6000 request with batch_size 1 needs about .* more than the 1\.0 GiB"):
        pipe.img2img(path, "x", dry_run=True)
    with pytest.raises(InputError, match=r"6000x6000 request .* more than the 1\.0 GiB"):
        pipe.inpaint(path, path, "x", dry_run=True)
    monkeypatch.setattr(prepare, "available_memory", lambda provider: 1 << 50)  # admitted: now it is decoded
    with pytest.raises(InputError, match=r"could not be decoded .* truncated or corrupt"):
        pipe.img2img(path, "x", dry_run=True)


def test_graphs_already_loaded_count_as_resident(models, monkeypatch):
    """The second request of a loaded pipeline does not need the weights again."""
    pipe = load(models.exported("tiny-sd1"), provider="cpu")
    seen = []
    monkeypatch.setattr(prepare, "check_memory", lambda *a, **kw: seen.append(kw["resident"]))
    pipe.txt2img("x", width=32, height=32, steps=1, dry_run=True)
    pipe.txt2img("x", width=32, height=32, steps=1)
    pipe.txt2img("x", width=32, height=32, steps=1, dry_run=True)
    weights = sum(pipe.info.graph_bytes(g) for g in ("text_encoder", "unet", "vae_decoder"))
    assert seen[0] == 0 and seen[2] >= weights


SMALL_RSS = PEAK + r"""
import sys
from sdrt.cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    print("CODE", e.code, "PEAK", peak())
"""


@pytest.mark.parametrize("args, needle", [
    (["txt2img", "-p", "x", "-W", "8192", "-H", "8192", "-b", "64"], "GiB of memory"),
    (["img2img", "{big}", "-p", "x", "-b", "64"], "GiB of memory"),
    (["img2img", "{sketch}", "-p", "x", "-W", "16000", "-H", "16000"], "from 0 to 8192"),
    (["img2img", "{huge}", "-p", "x"], "is over 179 Mpx"),
    (["txt2img", "--from-png", "{params}"], "got 100000"),
], ids=["txt2img-8192-batch64", "6000x6000-input", "16000", "100000-input", "from-png-size"])
def test_refusals_allocate_nothing_large(tmp_path, args, needle):
    """Each refusal in a fresh process peaks below 300 MiB (the interpreter, libraries and the
    model's tokenizer), not at the gigabytes the request would take."""
    from PIL import Image

    from sdrt.models import examples_path
    from sdrt.runtime.infotext import save_png

    (tmp_path / "big.png").write_bytes(png_header(6000, 6000))
    (tmp_path / "huge.png").write_bytes(png_header(100000, 100000))
    save_png(Image.new("RGB", (8, 8)), tmp_path / "p.png", "x\nSteps: 2, Sampler: Euler a, Seed: 1, Size: 100000x100000")
    fill = {"big": tmp_path / "big.png", "huge": tmp_path / "huge.png", "sketch": examples_path() / "sketch.png",
            "params": tmp_path / "p.png"}
    argv = [a.format(**fill) for a in args] + ["--provider", "cpu", "-o", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", SMALL_RSS, *argv], capture_output=True, text=True, timeout=300)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("CODE "))
    code, peak = int(line.split()[1]), int(line.split()[3])
    print(f"\n{' '.join(args)}: exit {code}, peak RSS {peak / 2**20:.0f} MiB; {r.stderr.strip()}")
    assert code == 1 and needle in r.stderr and r.stderr.count("\n") == 1
    assert peak < 300 * 2**20
    assert not (tmp_path / "out").exists()
