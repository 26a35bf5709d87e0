#!/usr/bin/env python3
"""sdrt on a GPU beside diffusers fp16 and torch.compile: the same work, measured in one run.

    python benchmarks/gpu.py --out results/                 # a CUDA machine: build, export, measure (about 9 min on an H200)
    python benchmarks/gpu.py --provider cpu --tiny --out r/ # the same code end to end on a tiny model on the CPU
    python benchmarks/gpu.py --model sdxl --out results/    # the SDXL 1.0 architecture at 1024x1024, 30 steps
    python benchmarks/gpu.py --render results/gpu-DATE.json   # rewrite docs/benchmarks.md's GPU section from results

What it does, all offline (docs/gpu.md has the runbook for a GPU machine without network):
1. builds a diffusers folder with the Stable Diffusion 1.5 architecture (--model sdxl: SDXL 1.0's)
   and random weights (`python -m sdrt.export.testmodels --kind sd15`; speed does not depend on
   weight values);
2. exports it for sdrt: `--target cuda --precision fp16 --fp32-vae-decoder` (SDXL: its VAE stays
   fp32, as its config's force_upcast says), and beside it (in parallel) `--target cuda` fp32, the
   reference for the fp16 pixel error;
3. runs each system in its own process, one after another, on the same machine: sdrt plain,
   sdrt with IO binding, sdrt with IO binding + CUDA graphs, diffusers fp16 with PyTorch SDPA,
   diffusers + torch.compile (default mode, then max-autotune-no-cudagraphs when the budget
   allows; batch-1 workloads only, which share one compiled graph); per workload one warm-up
   run (two with CUDA graphs: the second captures), then the best of --repeats timed runs;
4. records per stage (text encoder, VAE encode, UNet, VAE decode), end to end, it/s, cold start
   (load to first image), GPU memory (nvidia-smi, above the idle baseline: after each workload,
   and the peak polled while the process runs), and the mean absolute pixel difference of sdrt fp16 against sdrt
   fp32 and against diffusers fp16 on the same initial noise (txt2img, Euler);
5. writes OUT/gpu-<date>.json (rewritten after every system, so a timeout keeps what was
   measured) and OUT/gpu-section.md, the GPU section of docs/benchmarks.md.

Progress lines carry the elapsed time. --budget bounds the whole run: a system that would not
fit is skipped and the skip is recorded. With --provider cpu the systems that need CUDA are
skipped with a note, diffusers runs in fp32 on the CPU, and --tiny makes the run take a minute.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SAMPLER = "EulerDiscreteScheduler"  # diffusers' Euler: the same arithmetic in every system
GUIDANCE = 7.5
STAGES = ("text_encoder", "vae_encode", "unet", "vae_decode", "sampler", "other")

# name -> mode, size, steps, strength, batch. txt2img 512x512 50 steps batch 1 (SD 1.5) and
# 1024x1024 30 steps batch 1 (SDXL) are the settings of the published anchors (docs/benchmarks.md).
WORKLOADS = {
    "txt2img-b1": dict(mode="txt2img", size=512, steps=50, strength=1.0, batch=1),
    "img2img-b1": dict(mode="img2img", size=512, steps=20, strength=0.75, batch=1),
    "img2img-b4": dict(mode="img2img", size=512, steps=20, strength=0.75, batch=4),
    "inpaint-b1": dict(mode="inpaint", size=512, steps=20, strength=0.75, batch=1),
    "inpaint-b4": dict(mode="inpaint", size=512, steps=20, strength=0.75, batch=4),
    "xl-txt2img-b1": dict(mode="txt2img", size=1024, steps=30, strength=1.0, batch=1),
    "xl-img2img-b1": dict(mode="img2img", size=1024, steps=30, strength=0.75, batch=1),
    "xl-inpaint-b1": dict(mode="inpaint", size=1024, steps=30, strength=0.75, batch=1),
}
TINY = {"size": 32, "steps": {"txt2img": 4, "img2img": 4, "inpaint": 4}}
# --model -> the test model kind (and its tiny stand-in), its workloads, its diffusers pipelines.
MODELS = {
    "sd15": dict(kind="sd15", tiny="tiny-sd1", label="Stable Diffusion 1.5 architecture",
                 workloads=[w for w in WORKLOADS if not w.startswith("xl-")],
                 pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")),
    "sdxl": dict(kind="sdxl", tiny="tiny-sdxl", label="SDXL 1.0 architecture",
                 workloads=[w for w in WORKLOADS if w.startswith("xl-")],
                 pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                            "StableDiffusionXLInpaintPipeline")),
}
PIXEL_WORKLOADS = ("txt2img-b1", "xl-txt2img-b1")  # the image each system saves for the pixel comparison

# name -> (kind, options, workloads it runs (None: all), needs CUDA, seconds it may take at most)
# In priority order: when the budget runs short, the last ones are skipped.
SYSTEMS = {
    "sdrt+cudagraphs": ("sdrt", {"io_binding": True, "cuda_graphs": 4}, None, False, 150),
    "diffusers": ("diffusers", {}, None, False, 150),
    "diffusers+compile": ("diffusers", {"compile": "default"}, ["txt2img-b1", "img2img-b1", "inpaint-b1",
                                                                       "xl-txt2img-b1", "xl-img2img-b1", "xl-inpaint-b1"], True, 200),
    "sdrt fp32": ("sdrt", {"fp32": True}, list(PIXEL_WORKLOADS), False, 90),
    "sdrt+iobinding": ("sdrt", {"io_binding": True, "cuda_graphs": 0}, None, False, 120),
    "sdrt": ("sdrt", {"io_binding": False, "cuda_graphs": 0}, None, False, 120),
    # GPU memory: cuDNN's convolution workspace capped (speed against memory, for the 4 GB goal).
    "sdrt+cudagraphs lean": ("sdrt", {"io_binding": True, "cuda_graphs": 4,
                                      "provider_options": {"cudnn_conv_use_max_workspace": "0"}}, ["txt2img-b1", "xl-txt2img-b1"], True, 90),
    "diffusers+compile-max-autotune": ("diffusers", {"compile": "max-autotune-no-cudagraphs"}, ["txt2img-b1", "xl-txt2img-b1"], True, 420),
}
DEFAULT_SYSTEMS = list(SYSTEMS)


def log(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def workload(name: str, tiny: bool) -> dict:
    w = dict(WORKLOADS[name], name=name)
    if tiny:
        w.update(size=TINY["size"], steps=TINY["steps"][w["mode"]])
    return w


def model_of(workload_name: str) -> str:
    return "sdxl" if workload_name.startswith("xl-") else "sd15"


def workload_label(w: dict) -> str:
    s = f"{w['mode']} {w['size']}x{w['size']}, {w['steps']} steps"
    if w["mode"] != "txt2img":
        s += f" at strength {w['strength']:g}"
    return s + f", batch {w['batch']}"


def initial_noise(w: dict, vae_scale_factor: int, latent_channels: int = 4):
    """The txt2img initial latents of the pixel comparison: the same array for every system."""
    import numpy as np

    lat = w["size"] // vae_scale_factor
    return np.random.default_rng(1234).standard_normal((w["batch"], latent_channels, lat, lat)).astype(np.float32)


def inputs(size: int):
    from sdrt.runtime.bench import test_image, test_mask

    return test_image(size), test_mask(size)


# ---- workers: one system per process -----------------------------------------------------------


class Recorder:
    """Appends one JSON line per record to a file, so a killed worker keeps what it measured."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"  {rec['system']} {rec['workload']}: " + (f"{rec['seconds']:.3f} s" if "seconds" in rec else rec.get("error", "")),
              flush=True)


def _best(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "all_seconds": [round(r["seconds"], 4) for r in runs]}


def _it_per_s(stages: dict, calls: int) -> float:
    loop = stages["unet"] + stages["sampler"]
    return calls / loop if loop > 0 else 0.0


def worker_sdrt(system: str, cfg: dict, record: Recorder) -> None:
    import numpy as np
    import onnxruntime as ort

    from sdrt.runtime import load
    from sdrt.runtime.bench import Workload, run_once

    opts = dict(SYSTEMS[system][1])
    fp32 = opts.pop("fp32", False)
    model = cfg["models"]["fp32" if fp32 else "fp16"]
    imported = time.time() - cfg["spawned"]
    t = time.perf_counter()
    pipe = load(model, provider=cfg["provider"], **opts).load_graphs()
    load_s = time.perf_counter() - t
    detail = (f"ONNX Runtime {ort.__version__} {pipe.provider}, UNet {pipe.info.precision['unet']}, "
              f"io_binding={pipe.io_binding}, cuda_graphs={pipe.cuda_graphs}")
    cold = None
    for name in cfg["workloads"]:
        w = workload(name, cfg["tiny"])
        image, mask = inputs(w["size"])
        wl = Workload(mode=w["mode"], size=w["size"], steps=w["steps"], strength=w["strength"], guidance=GUIDANCE,
                      sampler=SAMPLER, batch_size=w["batch"], prompt=PROMPT)
        try:
            t = time.perf_counter()
            warm = [run_once(pipe, wl, image=image)]
            first = time.perf_counter() - t
            if pipe.cuda_graphs:
                warm.append(run_once(pipe, wl, image=image))  # this run captures the graph
            cold = cold if cold is not None else load_s + first
            runs = [run_once(pipe, wl, image=image) for _ in range(cfg["repeats"])]
        except Exception as e:  # recorded, the other workloads still run
            record({"system": system, "workload": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            continue
        best = _best(runs)
        best.pop("image", None)
        rec = {"system": system, "workload": name, "seconds": best["seconds"], "all_seconds": best["all_seconds"],
               "stages": best["stages"], "unet_calls": best["unet_calls"],
               "unet_per_call": best["stages"]["unet"] / max(1, best["unet_calls"]),
               "it_per_s": _it_per_s(best["stages"], best["unet_calls"]), "first_run_seconds": first,
               "warmup_seconds": [round(r["seconds"], 4) for r in warm[1:]],
               "load_seconds": load_s, "cold_start_seconds": cold, "import_seconds": imported, "detail": detail}
        if pipe.io_binding:
            rec["graph_ids"] = len(pipe.graphs["unet"].bound.graph_ids())
        rec["gpu_mib_after"] = gpu_used_mib(cfg)
        if name in PIXEL_WORKLOADS:
            r = pipe.txt2img(PROMPT, NEGATIVE, steps=w["steps"], guidance=GUIDANCE, sampler=SAMPLER, seed=0,
                             width=w["size"], height=w["size"], batch_size=w["batch"],
                             noise=initial_noise(w, pipe.info.vae_scale_factor))
            np.save(Path(cfg["images"]) / f"{system}.npy", np.stack([np.asarray(im) for im in r.images]))
            rec["fp32_vae_fallback"] = r.parameters.get("vae_fp32_fallback", [])
        record(rec)


class _Timed:
    """Seconds and calls per stage; CUDA work is synchronised at both ends of a timed call."""

    def __init__(self, sync):
        self.sync = sync
        self.reset()

    def reset(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)

    def wrap(self, stage, fn):
        def timed(*a, **k):
            self.sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.seconds[stage] += time.perf_counter() - t
                self.calls[stage] += 1

        return timed


def worker_diffusers(system: str, cfg: dict, record: Recorder) -> None:
    import numpy as np
    import torch
    import diffusers

    opts = SYSTEMS[system][1]
    cuda = cfg["provider"] == "cuda"
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    imported = time.time() - cfg["spawned"]
    t = time.perf_counter()
    txt2img, img2img, inpaint = (getattr(diffusers, c) for c in MODELS[cfg["model"]]["pipelines"])
    extra = {"add_watermarker": False} if cfg["model"] == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    base = txt2img.from_pretrained(cfg["models"]["diffusers"], torch_dtype=dtype, **extra).to(device)
    base.scheduler = getattr(diffusers, SAMPLER).from_config(base.scheduler.config)
    timer = _Timed(sync)
    unet = base.unet
    if opts.get("compile"):
        unet = torch.compile(unet, mode=None if opts["compile"] == "default" else opts["compile"])
    comps = dict(base.components)
    comps["unet"] = _TimedModule.make(unet, timer)
    if cfg["model"] == "sdxl":
        comps["add_watermarker"] = False
    pipes = {"txt2img": txt2img(**comps), "img2img": img2img(**comps), "inpaint": inpaint(**comps)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    for mod in (base.text_encoder, getattr(base, "text_encoder_2", None)):
        if mod is not None:
            mod.forward = timer.wrap("text_encoder", mod.forward)
    base.vae.encode = timer.wrap("vae_encode", base.vae.encode)
    base.vae.decode = timer.wrap("vae_decode", base.vae.decode)
    base.scheduler.step = timer.wrap("sampler", base.scheduler.step)
    load_s = time.perf_counter() - t
    detail = f"diffusers {diffusers.__version__}, PyTorch {torch.__version__} {device} {str(dtype).split('.')[-1]}, SDPA"
    if opts.get("compile"):
        detail += f", torch.compile(mode={opts['compile']})"
    cold = None
    for name in cfg["workloads"]:
        w = workload(name, cfg["tiny"])
        image, mask = inputs(w["size"])
        noise = torch.from_numpy(initial_noise(w, base.vae_scale_factor)).to(device, dtype)

        def call(latents=None):
            common = dict(prompt=[PROMPT] * w["batch"], negative_prompt=[NEGATIVE] * w["batch"],
                          num_inference_steps=w["steps"], guidance_scale=GUIDANCE,
                          generator=torch.Generator(device).manual_seed(0))
            with torch.inference_mode():
                if w["mode"] == "txt2img":
                    return pipes["txt2img"](height=w["size"], width=w["size"], latents=latents, **common).images
                if w["mode"] == "img2img":
                    return pipes["img2img"](image=image, strength=w["strength"], **common).images
                return pipes["inpaint"](image=image, mask_image=mask, strength=w["strength"], height=w["size"],
                                        width=w["size"], **common).images

        def timed():
            timer.reset()
            sync()
            t = time.perf_counter()
            call()
            sync()
            total = time.perf_counter() - t
            stages = dict(timer.seconds)
            stages["other"] = max(0.0, total - sum(stages.values()))
            return {"seconds": total, "stages": stages, "unet_calls": timer.calls["unet"]}

        try:
            t = time.perf_counter()
            call()
            first = time.perf_counter() - t
            cold = cold if cold is not None else load_s + first
            runs = [timed() for _ in range(cfg["repeats"])]
            if name in PIXEL_WORKLOADS:
                images = call(latents=noise)
        except Exception as e:
            record({"system": system, "workload": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            continue
        best = _best(runs)
        rec = {"system": system, "workload": name, "seconds": best["seconds"], "all_seconds": best["all_seconds"],
               "stages": best["stages"], "unet_calls": best["unet_calls"],
               "unet_per_call": best["stages"]["unet"] / max(1, best["unet_calls"]),
               "it_per_s": _it_per_s(best["stages"], best["unet_calls"]), "first_run_seconds": first,
               "load_seconds": load_s, "cold_start_seconds": cold, "import_seconds": imported, "detail": detail}
        if cuda:
            rec["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        rec["gpu_mib_after"] = gpu_used_mib(cfg)
        if name in PIXEL_WORKLOADS:
            np.save(Path(cfg["images"]) / f"{system}.npy", np.stack([np.asarray(im) for im in images]))
        record(rec)


class _TimedModule:
    """The UNet seen by the pipelines: calls are timed, everything else is the module's."""

    @staticmethod
    def make(module, timer: _Timed):
        import torch

        class TimedUNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, *a, **k):
                return timer.wrap("unet", self.inner)(*a, **k)

            def __getattr__(self, name):
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.inner, name)

        return TimedUNet()


WORKERS = {"sdrt": worker_sdrt, "diffusers": worker_diffusers}


def gpu_used_mib(cfg: dict) -> float | None:
    """GPU memory in use now above the baseline the driver measured before this worker started."""
    return GpuMemory.used() - cfg["gpu_baseline"] if cfg["provider"] == "cuda" else None


def worker_export(cfg: dict) -> None:
    from sdrt.export import export_model

    # No self-check here (it runs every fp32 graph on the CPU beside PyTorch): the benchmark's own
    # pixel comparison against diffusers checks the graphs, and GPU time is short.
    export_model(cfg["src"], cfg["out"], target=cfg["target"], precision=cfg["precision"],
                 fp32_vae_decoder=cfg.get("fp32_vae_decoder", False), overwrite=True, check=False)


# ---- the driver ---------------------------------------------------------------------------------


class GpuMemory:
    """Polls nvidia-smi's used memory while a worker runs; peak above the baseline, MiB."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.peak = 0.0
        self._stop = threading.Event()
        self.baseline = self.used() if enabled else 0.0

    @staticmethod
    def used() -> float:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except Exception:
            return 0.0

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.used() - self.baseline)

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()


def device_name(provider: str) -> str:
    if provider == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                name, mem, driver = (x.strip() for x in out.splitlines()[0].split(","))
                return f"{name} ({mem}, driver {driver})"
        except Exception:
            pass
        return "unknown NVIDIA GPU (nvidia-smi failed)"
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} logical cores"


def spawn(args: list[str], cfg: dict, timeout: float, log_path: Path) -> tuple[int | None, str]:
    """Run this script as a worker; returns (exit code or None on timeout, tail of its output)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--config", json.dumps({**cfg, "spawned": time.time()})]
    with open(log_path, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            code = None
    tail = log_path.read_text(errors="replace")[-2000:]
    return code, tail


class Run:
    """The state of one benchmark run: records, notes, and the results file rewritten as it grows."""

    def __init__(self, args, t0: float):
        self.args, self.t0 = args, t0
        self.date = dt.date.today().isoformat()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = {
            "date": self.date, "device": device_name(args.provider), "provider": args.provider, "tiny": args.tiny,
            "model": args.model,
            "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "python": platform.python_version(),
            "records": [], "notes": [], "timeline": [], "pixel_error": {},
        }

    def remaining(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def note(self, msg: str) -> None:
        log(self.t0, msg)
        self.results["notes"].append(msg)
        self.save()

    def mark(self, msg: str) -> None:
        log(self.t0, msg)
        self.results["timeline"].append([round(time.time() - self.t0, 1), msg])

    def save(self) -> Path:
        tag = "" if self.args.model == "sd15" else f"{self.args.model}-"
        path = self.out / f"gpu-{tag}{self.date}.json"
        path.write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / section_file(self.args.model)).write_text(render(self.results))
        return path


def build_and_export(run: Run, work: Path) -> dict:
    a = run.args
    work.mkdir(parents=True, exist_ok=True)
    kind = MODELS[a.model]["tiny" if a.tiny else "kind"]
    src = work / f"{kind}-src"
    if not (src / "model_index.json").is_file():
        run.mark(f"building {kind} with random weights")
        subprocess.run([sys.executable, "-m", "sdrt.export.testmodels", str(src), "--kind", kind],
                       check=True, stdout=subprocess.DEVNULL)
    models = {"diffusers": str(src)}
    if a.provider == "cuda":
        # An SDXL VAE (force_upcast) is exported fp32 in the fp16 folder: no second decoder.
        jobs = {"fp16": dict(target="cuda", precision="fp16", fp32_vae_decoder=a.model != "sdxl"),
                "fp32": dict(target="cuda", precision="fp32")}
    else:  # the CPU runs fp32 cpu-target graphs; there is no separate fp16 folder
        jobs = {"fp16": dict(target="cpu", precision="fp32")}
    procs = {}
    for key, job in jobs.items():
        out = work / f"sdrt-{kind}-{job['target']}-{job['precision']}"
        models[key] = str(out)
        if (out / "sdrt.json").is_file() and not a.reexport:
            continue
        run.mark(f"exporting {out.name}")
        cfg = {"src": str(src), "out": str(out), **job}
        procs[key] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "export", "--config",
                                       json.dumps(cfg)], stdout=open(work / f"export-{key}.log", "w"), stderr=subprocess.STDOUT)
    for key, p in procs.items():
        code = p.wait()
        if code != 0:
            tail = (work / f"export-{key}.log").read_text(errors="replace")[-1500:]
            if key == "fp16":
                run.note(f"export {key} failed (exit {code}): {tail}")
                raise SystemExit(1)
            run.note(f"export {key} failed (exit {code}); its system is skipped: {tail[-300:]}")
            models.pop(key)
        else:
            run.mark(f"exported {Path(models[key]).name}")
    if "fp32" not in models:
        models["fp32"] = models["fp16"]
    return models


def run_systems(run: Run, models: dict, work: Path) -> None:
    a = run.args
    images = work / "images"
    images.mkdir(exist_ok=True)
    for f in images.glob("*.npy"):
        f.unlink()
    for system in a.systems:
        kind, opts, only, needs_cuda, cap = SYSTEMS[system]
        if a.provider != "cuda" and (needs_cuda or system == "sdrt fp32"):
            why = "needs CUDA" if needs_cuda else "the CPU run has no fp16 folder to compare"
            run.note(f"{system}: skipped ({why})")
            continue
        if kind == "sdrt" and opts.get("fp32") and models["fp32"] == models["fp16"]:
            run.note(f"{system}: skipped (no fp32 export)")
            continue
        names = [n for n in a.workloads if only is None or n in only]
        if not names:
            continue
        left = run.remaining()
        if left < 30:
            run.note(f"{system}: skipped (budget: {left:.0f} s left)")
            continue
        records = work / f"records-{re.sub('[^a-z0-9]+', '-', system)}.jsonl"
        records.unlink(missing_ok=True)
        mem = GpuMemory(a.provider == "cuda")
        cfg = {"models": models, "model": a.model, "provider": a.provider, "tiny": a.tiny, "workloads": names, "repeats": a.repeats,
               "images": str(images), "records": str(records), "gpu_baseline": mem.baseline}
        run.mark(f"{system}: {', '.join(names)}")
        with mem:
            code, tail = spawn(["--worker", kind, "--system", system], cfg, min(cap * (4 if a.tiny else 1), left),
                               work / f"log-{records.stem}.txt")
        got = [json.loads(ln) for ln in records.read_text().splitlines()] if records.exists() else []
        for r in got:
            if a.provider == "cuda":
                r["process_peak_gpu_mib"] = mem.peak
            run.results["records"].append(r)
        if code != 0:
            why = "timed out" if code is None else f"exit {code}"
            run.note(f"{system}: {why} after {len(got)} of {len(names)} workloads; output tail: "
                     + " | ".join(tail.strip().splitlines()[-6:]))
        else:
            run.mark(f"{system}: done")
        run.save()
    pixel_errors(run, images)


def pixel_errors(run: Run, images: Path) -> None:
    import numpy as np

    got = {p.stem: np.load(p).astype(np.float64) for p in images.glob("*.npy")}
    pairs = [("sdrt+cudagraphs", "sdrt fp32"), ("sdrt+cudagraphs", "diffusers"), ("sdrt", "sdrt fp32"),
             ("sdrt", "diffusers"), ("sdrt+iobinding", "sdrt"), ("sdrt+cudagraphs", "sdrt"), ("diffusers", "sdrt fp32")]
    for a, b in pairs:
        if a in got and b in got and got[a].shape == got[b].shape:
            d = np.abs(got[a] - got[b])
            run.results["pixel_error"][f"{a} vs {b}"] = {"mean": round(float(d.mean()), 4), "max": float(d.max())}
    for name, im in got.items():
        if float(im.max()) == 0.0:
            run.note(f"{name}: the txt2img image is black")
    run.save()


# ---- the report ---------------------------------------------------------------------------------


def markers(model: str) -> tuple[str, str]:
    """The markers around a model's GPU section in docs/benchmarks.md (SD 1.5's and SDXL's apart)."""
    name = "gpu-benchmark" if model == "sd15" else f"gpu-benchmark-{model}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def section_file(model: str) -> str:
    return "gpu-section.md" if model == "sd15" else f"gpu-section-{model}.md"


def render(res: dict) -> str:
    """A model's GPU section of docs/benchmarks.md (between its markers) from a results dict."""
    start, end = markers(res.get("model", "sd15"))
    lines = [start, "", f"Command: `{res['command']}`", "",
             f"Device: {res['device']}. Date: {res['date']}. Model: {MODELS[res.get('model', 'sd15')]['label']}, random weights"
             f"{' (tiny)' if res.get('tiny') else ''}. Prompt and negative prompt on a CFG batch of 2B, guidance {GUIDANCE:g}, "
             f"{SAMPLER} (Euler) in every system. Best of the timed runs after the warm-up.", ""]
    by_workload: dict[str, list] = {}
    for r in res["records"]:
        by_workload.setdefault(r["workload"], []).append(r)
    for name in WORKLOADS:
        recs = by_workload.get(name)
        if not recs:
            continue
        w = workload(name, res.get("tiny", False))
        ref = next((r for r in recs if r["system"] == "sdrt+cudagraphs" and "seconds" in r), None)
        lines += [f"### {workload_label(w)}", "",
                  "| system | end to end (s) | it/s | text encoder | VAE encode | UNet (calls x ms) | VAE decode | "
                  "cold start (s) | GPU MiB (after; process peak) | time vs sdrt+cudagraphs |", "|" + "---|" * 10]
        for r in recs:
            if "seconds" not in r:
                lines.append(f"| {r['system']} | failed: {r['error']} |" + " |" * 8)
                continue
            s = r["stages"]
            rel = f"{r['seconds'] / ref['seconds']:.2f}x" if ref is not None and r is not ref else "—"
            peak = (f"{r['gpu_mib_after']:.0f}; {r.get('process_peak_gpu_mib', 0):.0f}"
                    if r.get("gpu_mib_after") is not None else "—")
            lines.append(f"| {r['system']} | **{r['seconds']:.3f}** | {r['it_per_s']:.1f} | {s['text_encoder']:.4f} | "
                         f"{s['vae_encode']:.4f} | {s['unet']:.3f} ({r['unet_calls']} x {1000 * r['unet_per_call']:.2f}) | "
                         f"{s['vae_decode']:.4f} | {r['cold_start_seconds']:.1f} | {peak} | {rel} |")
        lines.append("")
    details = {r["system"]: r["detail"] for r in res["records"] if "detail" in r}
    if details:
        lines += [f"- {k}: {v}" for k, v in details.items()]
    for k, v in res.get("pixel_error", {}).items():
        lines.append(f"- pixel difference {k} (txt2img, same initial noise): mean {v['mean']:.2f}/255, max {v['max']:.0f}/255")
    lines += [f"- note: {n}" for n in res.get("notes", [])]
    lines += ["", end]
    return "\n".join(lines) + "\n"


def write_docs(section: str, model: str = "sd15") -> Path:
    doc = ROOT / "docs" / "benchmarks.md"
    start, end = markers(model)
    text = doc.read_text()
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end) + "\n?", lambda _: section, text, flags=re.S)
    else:
        title = "## GPU" if model == "sd15" else f"## GPU, {MODELS[model]['label']}"
        text = text.rstrip() + f"\n\n{title}\n\n" + section
    doc.write_text(text)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where results go")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "gpu", help="models and logs (re-used between runs)")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--model", choices=list(MODELS), default="sd15", help="the architecture benchmarked (its own workloads)")
    p.add_argument("--tiny", action="store_true", help="a tiny model at 32x32 with a few steps (rehearsal)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma-separated, in order: {', '.join(SYSTEMS)}")
    p.add_argument("--workloads", help="comma-separated, of the model's: "
                   + "; ".join(f"{m}: {', '.join(v['workloads'])}" for m, v in MODELS.items()) + " (default: all of them)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per workload after the warm-up (the best is reported)")
    p.add_argument("--budget", type=float, default=470, help="seconds for the whole run; systems that do not fit are skipped")
    p.add_argument("--reexport", action="store_true", help="export again even when the model folders exist in --work")
    p.add_argument("--docs", action="store_true", help="also rewrite the GPU section of docs/benchmarks.md")
    p.add_argument("--render", type=Path, help="only rewrite docs/benchmarks.md's GPU section from this results file")
    p.add_argument("--worker", choices=[*WORKERS, "export"], help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker == "export":
        return worker_export(json.loads(args.config))
    if args.worker:
        cfg = json.loads(args.config)
        return WORKERS[args.worker](args.system, cfg, Recorder(Path(cfg["records"])))
    if args.render:
        res = json.loads(args.render.read_text())
        print(write_docs(render(res), res.get("model", "sd15")))
        return
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    own = MODELS[args.model]["workloads"]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()] if args.workloads else own
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}; accepted: {', '.join(SYSTEMS)}")
    for w in args.workloads:
        if w not in own:
            p.error(f"unknown workload {w!r} for --model {args.model}; accepted: {', '.join(own)}")
    t0 = time.time()
    run = Run(args, t0)
    run.mark(f"device: {run.results['device']}")
    models = build_and_export(run, args.work)
    run_systems(run, models, args.work)
    path = run.save()
    if args.docs:
        write_docs(render(run.results), args.model)
    log(t0, f"wrote {path} and {args.out / section_file(args.model)}")
    print(render(run.results))


if __name__ == "__main__":
    main()
