"""What int8 costs in quality, with weights within +-64 (exact on every CPU) and within +-127.

    python benchmarks/int8_quality.py [--model FP32_CPU_FOLDER] [--work DIR]

Quantizes an fp32 cpu-target model folder (default: the embedded `shapes` model, which is trained)
both ways, as `sdrt export FOLDER OUT --precision int8` does, then measures against the fp32 folder:

- the UNet's error on one call: mean |int8 - fp32| / mean |fp32| of the noise prediction, for a
  blue circle's latents noised to 4 levels (t = 999, 700, 400, 100) and the embeddings of "" and
  "a red circle on a white background" (the CFG batch);
- the images' error: mean absolute pixel difference (0-255) between int8 and fp32 images of the
  same seeds, img2img of a blue circle prompted red at strength 0.7, 20 steps, Euler a, seeds 0-19
  (what tests/test_semantics.py checks), mean and largest over the 20 images.

Numbers depend only on the arithmetic (exact in both variants on CPUs with VNNI, AMX or on ARM64),
not on speed; with full-range weights a CPU without VNNI gives other, worse numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from shapes_data import PALETTE  # noqa: E402

PROMPT = "a red circle on a white background"
STEPS = (999, 700, 400, 100)


def circle(colour: str, size: int = 64, r: float = 16):
    from PIL import Image, ImageDraw

    s = 4
    im = Image.new("RGB", (size * s, size * s), PALETTE["white"])
    c = size / 2
    ImageDraw.Draw(im).ellipse([(c - r) * s, (c - r) * s, (c + r) * s, (c + r) * s], fill=PALETTE[colour])
    return im.reduce(s)


def unet_feeds(folder: Path) -> list[dict]:
    from sdrt.runtime.modelfolder import read_model_folder
    from sdrt.runtime.text import ClipTokenizer

    info = read_model_folder(folder)
    cpu = ["CPUExecutionProvider"]
    te = ort.InferenceSession(str(info.graph_files["text_encoder"]), providers=cpu)
    ve = ort.InferenceSession(str(info.graph_files["vae_encoder"]), providers=cpu)
    ids = ClipTokenizer.from_folder(folder / "tokenizer").encode_padded(["", PROMPT])
    ids = ids.astype(np.int32 if te.get_inputs()[0].type == "tensor(int32)" else np.int64)
    ehs = te.run(None, {te.get_inputs()[0].name: ids})[0]
    side = info.native_size
    img = np.asarray(circle("blue", size=side, r=side / 4), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    lat = ve.run(None, {"sample": img})[0][:, : info.latent_channels] * info.vae_scaling_factor
    sched = info.scheduler_config
    betas = np.linspace(sched.get("beta_start", 0.00085) ** 0.5, sched.get("beta_end", 0.012) ** 0.5, 1000) ** 2
    alphas = np.cumprod(1 - betas)
    g = np.random.default_rng(0)
    feeds = []
    for t in STEPS:
        x = (np.sqrt(alphas[t]) * lat + np.sqrt(1 - alphas[t]) * g.standard_normal(lat.shape)).astype(np.float32)
        feeds.append({"sample": np.concatenate([x, x]), "timestep": np.array(t, np.float32), "encoder_hidden_states": ehs})
    return feeds


def main() -> None:
    from sdrt.export import export_model
    from sdrt.models import default_model_path
    from sdrt.runtime import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=default_model_path(), help="an fp32 cpu-target sdrt folder")
    ap.add_argument("--work", type=Path, default=None, help="where to write the int8 folders (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="sdrt-int8-quality-"))
    folders = {}
    for w in (64, 127):
        out = work / f"int8-{w}"
        if out.exists():
            shutil.rmtree(out)
        folders[w] = export_model(args.model, out, precision="int8", int8_weight_max=w, log=lambda _: None)

    cpu = ["CPUExecutionProvider"]
    feeds = unet_feeds(args.model)
    fp32 = ort.InferenceSession(str(args.model / "unet" / "model.onnx"), providers=cpu)
    refs = [fp32.run(None, f)[0] for f in feeds]
    unet_err = {}
    for w, folder in folders.items():
        s = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=cpu)
        unet_err[w] = [float(np.abs(s.run(None, f)[0] - r).mean() / np.abs(r).mean()) for f, r in zip(feeds, refs)]

    pipes = {"fp32": load(args.model, provider="cpu"), **{w: load(f, provider="cpu") for w, f in folders.items()}}
    src = circle("blue")
    images = {k: [np.asarray(p.img2img(src, PROMPT, strength=0.7, seed=seed, steps=20, guidance=7.5, sampler="Euler a")
                             .images[0].convert("RGB"), np.float32) for seed in range(20)] for k, p in pipes.items()}
    print(f"model: {args.model}; onnxruntime {ort.__version__}")
    print("| int8 weights | UNet error, t = " + " / ".join(map(str, STEPS)) + " | image difference, mean (largest) |")
    print("|---|---|---|")
    for w in folders:
        d = [float(np.abs(a - b).mean()) for a, b in zip(images[w], images["fp32"])]
        print(f"| within +-{w} | " + " / ".join(f"{100 * e:.1f}%" for e in unet_err[w])
              + f" | {np.mean(d):.2f}/255 ({max(d):.2f}) |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
