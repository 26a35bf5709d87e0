"""Timing of sdrt's own pipeline, stage by stage (what `sdrt bench` prints).

    from sdrt.runtime.bench import Workload, bench
    rec = bench("models/sd15", Workload(size=256, steps=10, strength=0.5), repeats=2)

A run is timed end to end and split into the time spent inside ONNX Runtime for each graph (text
encoder, VAE encoder, UNet, VAE decoder) and the rest: sampler arithmetic (the denoising loop
minus its UNet calls) and everything else (image preparation, tokenizing, post-processing). The
best of `repeats` timed runs after one warm-up run is reported; peak RSS is the process's.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

STAGES = ("text_encoder", "vae_encode", "unet", "vae_decode", "sampler", "other")
# Graph of the model folder -> stage.
GRAPH_STAGES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "vae_encoder": "vae_encode", "unet": "unet", "vae_decoder": "vae_decode",
                "vae_decoder_fp32": "vae_decode"}
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Workload:
    mode: str = "img2img"  # img2img, inpaint or txt2img
    size: int = 256
    steps: int = 10
    strength: float = 0.5
    guidance: float = 7.5
    sampler: str = "PNDMScheduler"
    batch_size: int = 1
    prompt: str = PROMPT

    @property
    def label(self) -> str:
        s = f"{self.mode} {self.size}x{self.size}, {self.steps} steps"
        if self.mode != "txt2img":
            s += f" at strength {self.strength:g}"
        return s + f", {self.sampler}, CFG {self.guidance:g}, batch {self.batch_size}"


def test_image(size: int):
    """A deterministic RGB picture (gradients and a disc), the same for every system benchmarked."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    img = np.stack([xx, yy, 1 - (xx + yy) / 2], -1)
    disc = (xx - 0.4) ** 2 + (yy - 0.55) ** 2 < 0.06
    img[disc] = (0.9, 0.2, 0.15)
    return Image.fromarray((img * 255).round().astype(np.uint8))


def test_mask(size: int):
    from PIL import Image

    m = np.zeros((size, size), np.uint8)
    m[size // 4 : 3 * size // 4, size // 3 : 5 * size // 6] = 255
    return Image.fromarray(m)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def _call(pipe, w: Workload, seed: int, image=None, dry_run: bool = False):
    """One generation of `w`; dry_run checks the request (sizes, memory, sampler, numbers) with a
    small stand-in picture resized to the workload's size, before any picture of that size exists."""
    common = dict(steps=w.steps, guidance=w.guidance, sampler=w.sampler, seed=seed, batch_size=w.batch_size,
                  dry_run=dry_run)
    if w.mode == "txt2img":
        return pipe.txt2img(w.prompt, width=w.size, height=w.size, **common)
    if dry_run:
        image, size, common = test_image(8), 8, {**common, "width": w.size, "height": w.size}
    else:
        image, size = (test_image(w.size) if image is None else image), w.size
    if w.mode == "inpaint":
        return pipe.inpaint(image, test_mask(size), w.prompt, strength=w.strength, **common)
    return pipe.img2img(image, w.prompt, strength=w.strength, **common)


def run_once(pipe, w: Workload, seed: int = 0, image=None) -> dict:
    """One timed generation: seconds end to end and per stage, UNet calls."""
    for g in pipe.graphs.values():
        g.calls, g.seconds = 0, 0.0
    pipe._embeddings = type(pipe._embeddings)()  # each run encodes its prompt, as a fresh request would
    t = time.perf_counter()
    r = _call(pipe, w, seed, image)
    total = time.perf_counter() - t
    stages = dict.fromkeys(STAGES, 0.0)
    for name, g in pipe.graphs.items():
        stages[GRAPH_STAGES[name]] += g.seconds
    unet_calls = pipe.graphs["unet"].calls
    stages["sampler"] = max(0.0, r.timings.get("denoise", 0.0) - stages["unet"])
    stages["other"] = max(0.0, total - sum(stages.values()))
    return {"seconds": total, "stages": stages, "unet_calls": unet_calls, "image": r.images[0] if r.images else None}


def bench(model, w: Workload, *, provider: str = "cpu", repeats: int = 2, threads: int | None = None, image=None,
          progress=None, checked=None) -> dict:
    """Load `model`, check `w`, run it once to warm up, then `repeats` times; the best run's record.

    image: the input of img2img/inpaint (a path or PIL image; default: test_image(w.size)).
    checked(): called once the workload has passed its checks, before the first run."""
    from .pipeline import load

    if w.mode not in ("img2img", "inpaint", "txt2img"):
        raise ValueError(f"mode must be img2img, inpaint or txt2img, got {w.mode!r}")
    t = time.perf_counter()
    pipe = load(model, provider=provider, threads=threads)
    _call(pipe, w, 0, dry_run=True)
    if checked:
        checked()
    pipe.load_graphs()
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    first = run_once(pipe, w, image=image)
    first_s = time.perf_counter() - t
    runs = []
    for i in range(repeats):
        if progress:
            progress(i, repeats)
        runs.append(run_once(pipe, w, image=image))
    best = min(runs, key=lambda r: r["seconds"])
    calls = max(1, best["unet_calls"])
    return {
        "system": "sdrt",
        "provider": pipe.provider,
        "model": str(pipe.info.path),
        "workload": asdict(w),
        "seconds": best["seconds"],
        "all_seconds": [r["seconds"] for r in runs],
        "stages": best["stages"],
        "unet_calls": best["unet_calls"],
        "unet_per_call": best["stages"]["unet"] / calls,
        "outside_ort_share": (best["stages"]["sampler"] + best["stages"]["other"]) / best["seconds"],
        "load_seconds": load_s,
        "first_run_seconds": first_s,
        "peak_rss_mib": peak_rss_mib(),
        "image": best["image"],
    }


def format_record(rec: dict) -> str:
    """A few lines that say where the time of one record went."""
    s = rec["stages"]
    lines = [
        f"{rec['system']} ({rec.get('provider', '')}): {rec['seconds']:.3f} s end to end, peak RSS {rec['peak_rss_mib']:.0f} MiB",
        "  " + ", ".join(f"{k.replace('_', ' ')} {v:.3f} s" for k, v in s.items()),
        f"  UNet {rec['unet_calls']} calls, {rec['unet_per_call']:.3f} s per call",
    ]
    if "outside_ort_share" in rec:
        lines.append(f"  outside ONNX Runtime: {100 * rec['outside_ort_share']:.2f}% of the total")
    if "load_seconds" in rec:
        lines.append(f"  load {rec['load_seconds']:.2f} s, first run (cold) {rec['first_run_seconds']:.2f} s")
    return "\n".join(lines)
