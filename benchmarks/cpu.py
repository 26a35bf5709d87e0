#!/usr/bin/env python3
"""sdrt beside diffusers, optimum and OpenVINO on the CPU: the same work, measured in one run.

    python benchmarks/cpu.py                       # both workloads, all systems (about 45 min on 2 cores)
    python benchmarks/cpu.py --workloads small     # img2img 256x256 only
    python benchmarks/cpu.py --workloads sdxl      # the SDXL 1.0 architecture: img2img 512x512, 8 steps (sdrt, diffusers, optimum)

What it does, all offline:
1. builds a diffusers folder with the Stable Diffusion 1.5 architecture and random weights
   (python -m sdrt.export.testmodels --kind sd15; speed does not depend on weight values), or
   SDXL 1.0's for the sdxl workload (--kind sdxl: about 7 GB on disk, its exports 14 GB each);
2. exports it for sdrt (`sdrt export`, fp32 cpu target, and `--precision int8` with --int8), for
   optimum (`optimum-cli export onnx`, in optimum's own virtual environment: optimum-onnx 0.1.0
   pins transformers<4.58, which sdrt's environment need not share) and for OpenVINO
   (`optimum-cli export openvino --weight-format fp32`, and `int8` with --int8, in optimum-intel's
   own environment); OpenVINO runs reshaped to the workload's static shapes (its fastest setting)
   in its default precision for the CPU ("openvino": bf16 where the CPU computes in bf16 natively,
   AMX or AVX-512 BF16, else f32) and in f32 ("openvino f32"), and with the export's dynamic
   shapes ("openvino dynamic");
3. runs each system in its own process (so peak RSS is its own): load, one warm-up run, then the
   best of --repeats timed runs of each workload (2 at 256x256, 1 at 512x512 by default); same prompt, same input image, same sampler
   (diffusers' PNDM, the SD 1.5 default), same steps, strength and guidance;
4. prints a table per workload and writes it into docs/benchmarks.md (between the CPU markers)
   and the records into benchmarks/results/cpu-<date>.json.

Stages: text encoder, VAE encode, UNet (total and per call), VAE decode, sampler arithmetic (the
scheduler's step function), everything else (pre/post-processing, tokenizing, Python overhead).
diffusers is timed through wrappers around its modules, optimum and OpenVINO around their model
objects, sdrt by its own per-graph counters (sdrt.runtime.bench). Every lossy row's quality cost is
the mean absolute pixel difference against its exact counterpart (same seed and noise): int8
against fp32, OpenVINO's bf16 against its f32. The last line of each table compares sdrt's best row
with diffusers and with the best of optimum and OpenVINO's static-shape rows.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
WORKLOADS = {
    "small": dict(mode="img2img", size=256, steps=10, strength=0.5, guidance=7.5, sampler="PNDMScheduler", model="sd15"),
    "large": dict(mode="img2img", size=512, steps=20, strength=0.75, guidance=7.5, sampler="PNDMScheduler", model="sd15"),
    # SDXL's default scheduler (Euler); 512x512 and 8 steps keep a CPU run to minutes.
    "sdxl": dict(mode="img2img", size=512, steps=8, strength=0.5, guidance=5.0, sampler="EulerDiscreteScheduler",
                 model="sdxl"),
}
# Timed runs after the warm-up, per workload (--repeats overrides): a large run takes minutes.
REPEATS = {"small": 2, "large": 1, "sdxl": 1}
# model -> (test model kind, label, diffusers / optimum img2img pipeline classes, systems it runs)
MODELS = {
    "sd15": ("sd15", "Stable Diffusion 1.5 architecture", "StableDiffusionImg2ImgPipeline",
             "ORTStableDiffusionImg2ImgPipeline", None),
    "sdxl": ("sdxl", "SDXL 1.0 architecture", "StableDiffusionXLImg2ImgPipeline", "ORTStableDiffusionXLImg2ImgPipeline",
             ("sdrt", "sdrt int8", "diffusers", "optimum")),
}
STAGES = ("text_encoder", "vae_encode", "unet", "vae_decode", "sampler", "other")
OPTIMUM_PINS = ["optimum-onnx[onnxruntime]==0.1.0", "diffusers", "numpy<2.3"]
OPENVINO_PINS = ["optimum-intel[openvino]==2.2.0", "openvino==2026.4.1", "nncf", "diffusers", "numpy<2.3"]


def physical_cores() -> int:
    cores = set()
    for cpu in os.sched_getaffinity(0):
        p = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((p / "physical_package_id").read_text(), (p / "core_id").read_text()))
        except OSError:
            return len(os.sched_getaffinity(0))
    return max(1, len(cores))


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- workers: one system per process ---------------------------------------------------------


class Timer:
    """Accumulates seconds and calls per stage; wraps callables."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)

    def wrap(self, stage, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[stage] += time.perf_counter() - t
                self.calls[stage] += 1

        return timed

    def reset(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)


def _peer_runs(call, timer: Timer, repeats: int) -> dict:
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        timer.reset()
        t = time.perf_counter()
        call()
        total = time.perf_counter() - t
        stages = dict(timer.seconds)
        stages["other"] = max(0.0, total - sum(stages.values()))
        runs.append({"seconds": total, "stages": stages, "unet_calls": timer.calls["unet"]})
    best = min(runs, key=lambda r: r["seconds"])
    return {
        **best,
        "all_seconds": [r["seconds"] for r in runs],
        "unet_per_call": best["stages"]["unet"] / max(1, best["unet_calls"]),
        "first_run_seconds": first,
    }


def worker_diffusers(model: Path, w: dict, image: Path, repeats: int) -> dict:
    import diffusers
    import torch
    from PIL import Image

    torch.set_num_threads(physical_cores())
    t = time.perf_counter()
    cls = getattr(diffusers, MODELS[w["model"]][2])
    extra = {"add_watermarker": False} if w["model"] == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(model, torch_dtype=torch.float32, **extra)  # fp32, as every system here
    pipe.scheduler = getattr(diffusers, w["sampler"]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t
    timer = Timer()
    for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if te is not None:
            te.forward = timer.wrap("text_encoder", te.forward)
    pipe.unet.forward = timer.wrap("unet", pipe.unet.forward)
    pipe.vae.encode = timer.wrap("vae_encode", pipe.vae.encode)
    pipe.vae.decode = timer.wrap("vae_decode", pipe.vae.decode)
    pipe.scheduler.step = timer.wrap("sampler", pipe.scheduler.step)
    img = Image.open(image).convert("RGB")

    def call():
        with torch.inference_mode():
            pipe(PROMPT, image=img, strength=w["strength"], num_inference_steps=w["steps"], guidance_scale=w["guidance"],
                 generator=torch.Generator().manual_seed(0))

    rec = _peer_runs(call, timer, repeats)
    return {**rec, "system": "diffusers", "detail": f"PyTorch {torch.__version__} CPU fp32, {torch.get_num_threads()} threads",
            "load_seconds": load}


def _time_parts(pipe) -> Timer:
    """Time the model parts of an optimum-style pipeline (optimum's ONNX Runtime and optimum-intel's
    OpenVINO ones: each part is called through its forward) and its scheduler's step."""
    timer = Timer()
    for attr, stage in (("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder"), ("unet", "unet"),
                        ("vae_encoder", "vae_encode"), ("vae_decoder", "vae_decode")):
        m = getattr(pipe, attr, None)
        if m is not None:
            m.forward = timer.wrap(stage, m.forward)
    pipe.scheduler.step = timer.wrap("sampler", pipe.scheduler.step)
    return timer


def worker_optimum(model: Path, w: dict, image: Path, repeats: int) -> dict:
    import diffusers
    import onnxruntime as ort
    import optimum.onnxruntime
    import torch
    from PIL import Image

    t = time.perf_counter()
    pipe = getattr(optimum.onnxruntime, MODELS[w["model"]][3]).from_pretrained(model, provider="CPUExecutionProvider")
    pipe.scheduler = getattr(diffusers, w["sampler"]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t
    timer = _time_parts(pipe)
    img = Image.open(image).convert("RGB")

    def call():
        pipe(PROMPT, image=img, strength=w["strength"], num_inference_steps=w["steps"], guidance_scale=w["guidance"],
             generator=torch.Generator().manual_seed(0))

    rec = _peer_runs(call, timer, repeats)
    import optimum.onnxruntime as oo

    version = getattr(oo, "__version__", None) or _dist_version("optimum-onnx")
    return {**rec, "system": "optimum", "detail": f"optimum-onnx {version}, ONNX Runtime {ort.__version__} CPU", "load_seconds": load}


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"


def worker_sdrt(model: Path, w: dict, image: Path, repeats: int, save: Path | None = None) -> dict:
    import onnxruntime as ort

    from sdrt.runtime.bench import Workload, bench

    wl = Workload(mode=w["mode"], size=w["size"], steps=w["steps"], strength=w["strength"], guidance=w["guidance"],
                  sampler=w["sampler"], prompt=PROMPT)
    rec = bench(model, wl, provider="cpu", repeats=repeats, image=image)
    out = rec.pop("image", None)
    if save is not None and out is not None:
        out.save(save)
    precision = json.loads((Path(model) / "sdrt.json").read_text()).get("precision", {}).get("unet", "?")
    return {**rec, "system": "sdrt" if precision == "fp32" else f"sdrt {precision}",
            "detail": f"ONNX Runtime {ort.__version__} CPU, UNet {precision}"}


def worker_openvino(model: Path, w: dict, image: Path, repeats: int, save: Path | None = None, static: bool = True,
                    precision: str | None = None) -> dict:
    """optimum-intel's OpenVINO img2img pipeline; static=True reshapes it to the workload's shapes
    (its fastest setting), static=False keeps the dynamic shapes of the export. precision: OpenVINO's
    inference precision hint ("f32"); None keeps OpenVINO's default for the CPU (bf16 where the CPU
    computes in bf16 natively: AMX or AVX-512 BF16; f32 elsewhere)."""
    import openvino as ov
    import torch
    from diffusers import PNDMScheduler
    from optimum.intel import OVStableDiffusionImg2ImgPipeline
    from PIL import Image

    t = time.perf_counter()
    ov_config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    pipe = OVStableDiffusionImg2ImgPipeline.from_pretrained(model, compile=False, ov_config=ov_config)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    if static:
        pipe.reshape(batch_size=1, height=w["size"], width=w["size"], num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t
    timer = _time_parts(pipe)
    img = Image.open(image).convert("RGB")

    last = []

    def call():
        last[:] = pipe(PROMPT, image=img, strength=w["strength"], num_inference_steps=w["steps"],
                       guidance_scale=w["guidance"], generator=torch.Generator().manual_seed(0)).images

    rec = _peer_runs(call, timer, repeats)
    if save is not None:
        last[0].save(save)
    # optimum-intel's int8 weight compression stores the UNet's weights as u8/i8 constants.
    xml = (Path(model) / "unet" / "openvino_model.xml").read_text(errors="replace")
    weights = "int8 (weight compression)" if 'element_type="u8"' in xml or 'element_type="i8"' in xml else "fp32"
    hint = precision or ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    detail = (f"optimum-intel {_dist_version('optimum-intel')}, OpenVINO {ov.__version__} CPU, "
              f"{'static' if static else 'dynamic'} shapes, weights {weights}, inference precision {hint}")
    return {**rec, "system": "openvino", "detail": detail, "load_seconds": load}


def worker_openvino_dynamic(model: Path, w: dict, image: Path, repeats: int, save: Path | None = None) -> dict:
    return worker_openvino(model, w, image, repeats, save, static=False)


def worker_openvino_f32(model: Path, w: dict, image: Path, repeats: int, save: Path | None = None) -> dict:
    return worker_openvino(model, w, image, repeats, save, precision="f32")


WORKERS = {"diffusers": worker_diffusers, "optimum": worker_optimum, "sdrt": worker_sdrt, "openvino": worker_openvino,
           "openvino-dynamic": worker_openvino_dynamic, "openvino-f32": worker_openvino_f32}
# Systems that run in their own virtual environment: optimum-onnx pins transformers<4.58, and
# optimum-intel pulls its own transformers and torch; neither is sdrt's business.
PEER_VENVS = {"optimum": ("venv-optimum", OPTIMUM_PINS), "openvino": ("venv-openvino", OPENVINO_PINS)}


# ---- the driver ---------------------------------------------------------------------------------


def sh(cmd: list, **kw) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def prepare(work: Path, args, model: str = "sd15") -> dict:
    """The model folder of each system for `model` (sd15 or sdxl), built and exported once."""
    work.mkdir(parents=True, exist_ok=True)
    py = Path(sys.executable)
    sdrt_cli = py.parent / "sdrt"
    kind = args.sdxl_kind if model == "sdxl" else MODELS[model][0]
    src = work / f"{kind}-src"
    if not (src / "model_index.json").exists():
        sh([py, "-m", "sdrt.export.testmodels", src, "--kind", kind])
    models = {}
    sdrt_dir = work / f"{kind}-sdrt-cpu"
    if not (sdrt_dir / "sdrt.json").exists():
        sh([sdrt_cli, "export", src, sdrt_dir])
    models["sdrt"] = sdrt_dir
    if args.int8:
        q = work / f"{kind}-sdrt-int8"
        if not (q / "sdrt.json").exists():
            sh([sdrt_cli, "export", src, q, "--precision", "int8"])
        models["sdrt int8"] = q
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    args.peer_py = getattr(args, "peer_py", None) or {}
    if "optimum" in args.systems:
        py_opt = args.peer_py["optimum"] = peer_python(work, args.optimum_python, "optimum")
        opt_dir = work / f"{kind}-optimum"
        if (opt_dir / "model_index.json").exists() or peer_export(
                args, "optimum", [py_opt.parent / "optimum-cli", "export", "onnx", "-m", src, "--task", "text-to-image", opt_dir],
                env=env):
            models["optimum"] = opt_dir
    if model == "sd15" and any(s.startswith("openvino") for s in args.systems):
        py_ov = args.peer_py["openvino"] = peer_python(work, args.openvino_python, "openvino")
        formats = {"openvino": "fp32", "openvino f32": "fp32", "openvino dynamic": "fp32", "openvino int8": "int8"}
        for system in [s for s in args.systems if s.startswith("openvino")]:
            ov_dir = work / f"{kind}-openvino-{formats[system]}"
            if (ov_dir / "model_index.json").exists() or peer_export(
                    args, system, [py_ov.parent / "optimum-cli", "export", "openvino", "-m", src, "--task", "image-to-image",
                                   "--weight-format", formats[system], ov_dir], env=env):
                models[system] = ov_dir
    models["diffusers"] = src
    return models


def peer_export(args, system: str, cmd: list, **kw) -> bool:
    """Run a peer's export; one that fails is recorded in args.failed (the table says why) instead
    of ending the benchmark: a peer that cannot export a model on this machine is a result too.
    The failure is kept beside the output folder (OUT.failed; delete it to try again)."""
    import shutil

    marker = Path(f"{cmd[-1]}.failed")
    if marker.exists():
        args.failed[system] = marker.read_text().strip()
        return False
    try:
        sh(cmd, **kw)
        return True
    except subprocess.CalledProcessError as e:
        shutil.rmtree(cmd[-1], ignore_errors=True)
        gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        why = (f"killed by the out-of-memory killer on this machine's {gib:.0f} GiB" if e.returncode == -9
               else f"exit status {e.returncode}")
        args.failed[system] = f"`{Path(cmd[0]).name} {cmd[1]} {cmd[2]}` failed ({why}), so it was not run"
        marker.write_text(args.failed[system] + "\n")
        print(f"{system}: {args.failed[system]}", flush=True)
        return False


def peer_python(work: Path, given: str | None, peer: str) -> Path:
    """The python of a peer's own virtual environment (made in `work` when not given)."""
    venv, pins = PEER_VENVS[peer]
    py = Path(given) if given else work / venv / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", py.parents[1]])
        sh([py, "-m", "pip", "install", "-q", "torch==2.13.0"])  # the CPU build, before anything asks for a CUDA one
        sh([py, "-m", "pip", "install", "-q", *pins])
    return py


def run_worker(system: str, python: Path, model: Path, w: dict, image: Path, repeats: int, save: Path | None = None) -> dict:
    worker = system.replace(" ", "-") if system in ("openvino dynamic", "openvino f32") else system.split()[0]
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", worker, "--model", str(model),
           "--workload", json.dumps(w), "--image", str(image), "--repeats", str(repeats)]
    if save is not None:
        cmd += ["--save", str(save)]
    env = {**os.environ, "PYTHONPATH": ""} if system.split()[0] in PEER_VENVS else dict(os.environ)
    print(f"running {system} on {w['size']}x{w['size']} ...", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{system} failed:\n{p.stderr[-3000:]}")
    rec = json.loads(lines[-1][len("RESULT "):])
    rec["system"] = system
    return rec


def machine() -> str:
    cpu = ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from sdrt.runtime.cpu import cpu_features

    return (f"{cpu or platform.processor()} ({cpu_features().describe()}), {physical_cores()} physical cores, "
            f"{os.cpu_count()} logical, Python {platform.python_version()}")


def table(recs: list[dict]) -> str:
    base = {r["system"]: r for r in recs}
    ref = base.get("sdrt")
    head = "| system | end to end (s) | text encoder | VAE encode | UNet (calls x s) | VAE decode | sampler | other | peak RSS (MiB) | time vs sdrt |"
    rows = [head, "|" + "---|" * 10]
    for r in recs:
        s = r["stages"]
        speed = f"{r['seconds'] / ref['seconds']:.2f}x" if ref and r is not ref else "—"
        rows.append(
            f"| {r['system']} | **{r['seconds']:.2f}** | {s['text_encoder']:.3f} | {s['vae_encode']:.3f} | "
            f"{s['unet']:.2f} ({r['unet_calls']} x {r['unet_per_call']:.3f}) | {s['vae_decode']:.3f} | {s['sampler']:.4f} | "
            f"{s['other']:.3f} | {r['peak_rss_mib']:.0f} | {speed} |"
        )
    notes = [f"- {r['system']}: {r['detail']}; load {r['load_seconds']:.1f} s, runs {', '.join(f'{x:.2f}' for x in r['all_seconds'])} s"
             for r in recs]
    if ref and "outside_ort_share" in ref:
        notes.append(f"- sdrt time outside ONNX Runtime calls (sampler arithmetic + everything else): "
                     f"{100 * ref['outside_ort_share']:.2f}% of the total")
    return "\n".join(rows + [""] + notes)


def pixel_cost(work: Path, size: int, system: str, reference: str, what: str) -> str:
    """Mean absolute pixel difference of `system`'s image against `reference`'s (same seed and noise)."""
    import numpy as np
    from PIL import Image

    def image(s: str):
        return np.asarray(Image.open(work / f"out-{s.replace(' ', '-')}-{size}.png").convert("RGB"), np.float32)

    d = np.abs(image(system) - image(reference))
    return (f"- {system} quality cost: mean absolute pixel difference {d.mean():.2f}/255 against {what} on the same "
            f"seed and noise (max {d.max():.0f}/255)")


def lossy_costs(work: Path, size: int, systems: list[str]) -> list[str]:
    """The pixel cost of each lossy row against its exact counterpart: int8 against fp32, and
    OpenVINO's default precision (bf16 on CPUs that compute in bf16) against its f32 hint."""
    pairs = [("sdrt int8", "sdrt", "sdrt's fp32 graphs"), ("openvino int8", "openvino f32", "OpenVINO in f32"),
             ("openvino", "openvino f32", "OpenVINO in f32")]
    return [pixel_cost(work, size, a, b, what) for a, b, what in pairs if a in systems and b in systems]


def goal_line(recs: list[dict]) -> str:
    """sdrt's best row against diffusers and against the best of optimum and OpenVINO (static shapes)."""
    by = {r["system"]: r["seconds"] for r in recs}
    ours = min((s for s in by if s.startswith("sdrt")), key=by.get, default=None)
    peers = [s for s in by if s == "optimum" or (s.startswith("openvino") and s != "openvino dynamic")]
    if ours is None or not peers:
        return ""
    best = min(peers, key=by.get)
    line = f"- sdrt's best ({ours}, {by[ours]:.2f} s): {by[best] / by[ours]:.2f}x the best of optimum and OpenVINO static ({best}, {by[best]:.2f} s)"
    if "diffusers" in by:
        line += f", {by['diffusers'] / by[ours]:.2f}x diffusers"
    return line


def write_docs(sections: list[str], command: str, model: str = "sd15") -> Path:
    """Write `sections` between the model's CPU markers in docs/benchmarks.md (SD 1.5's and SDXL's apart)."""
    doc = ROOT / "docs" / "benchmarks.md"
    name = "cpu-benchmark" if model == "sd15" else f"cpu-benchmark-{model}"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n\nCommand: `{command}`\n\n" + "\n\n".join(sections) + f"\n\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n## CPU\n\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: body, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(text)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / ".bench", help="models and environments (re-used between runs)")
    p.add_argument("--workloads", default="small,large", help=f"comma-separated: {', '.join(WORKLOADS)}")
    p.add_argument("--systems", default="sdrt,diffusers,optimum,openvino,openvino f32,openvino dynamic",
                   help="comma-separated: sdrt, diffusers, optimum, openvino (static shapes, OpenVINO's default "
                        "precision for the CPU), openvino f32 (the same in f32), openvino dynamic; "
                        "--int8 adds sdrt int8 and openvino int8 (weights compressed to int8)")
    p.add_argument("--repeats", type=int, help=f"timed runs after the warm-up, the best is reported (default: {REPEATS})")
    p.add_argument("--int8", action="store_true", help="also run sdrt with the int8 UNet (--precision int8)")
    p.add_argument("--optimum-python", help="python of an environment with optimum-onnx 0.1.0 (default: one is made in --work)")
    p.add_argument("--openvino-python", help="python of an environment with optimum-intel and OpenVINO (default: one is made in --work)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md and benchmarks/results/")
    p.add_argument("--prepare-only", action="store_true", help="build and export the models, then stop")
    p.add_argument("--sdxl-kind", default="sdxl", help="test model kind of the sdxl workload (tiny-sdxl: a rehearsal)")
    p.add_argument("--size", type=int, help="work at this size instead of the workloads' (a rehearsal on a tiny model)")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        extra = {"save": args.save} if args.worker.startswith(("sdrt", "openvino")) else {}
        rec = WORKERS[args.worker](args.model, json.loads(args.workload), args.image, args.repeats, **extra)
        rec["peak_rss_mib"] = peak_rss_mib()
        print("RESULT " + json.dumps(rec), flush=True)
        return

    from sdrt.runtime.bench import test_image

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.int8 and "sdrt" in systems:
        systems.insert(systems.index("sdrt") + 1, "sdrt int8")
    if args.int8 and "openvino" in systems:
        systems.insert(systems.index("openvino") + 1, "openvino int8")
    args.systems = systems
    args.failed = {}  # system -> why it was not run (its export failed)
    names = [s.strip() for s in args.workloads.split(",")]
    models = {m: prepare(args.work, args, m) for m in dict.fromkeys(WORKLOADS[n]["model"] for n in names)}
    if args.prepare_only:
        return
    date = dt.date.today().isoformat()
    # The command as the docs show it: the work folder is this machine's business.
    command = "python benchmarks/cpu.py " + " ".join("WORK" if a == str(args.work) else a for a in sys.argv[1:])
    sections, records = {m: [] for m in models}, []
    for name in names:
        w = {**WORKLOADS[name], **({"size": args.size} if args.size else {})}
        _, model_label, _, _, only = MODELS[w["model"]]
        repeats = args.repeats or REPEATS[name]
        image = args.work / f"input-{w['size']}.png"
        test_image(w["size"]).save(image)
        recs = []
        for system in [s for s in systems if (only is None or s in only) and s in models[w["model"]]]:
            python = args.peer_py.get(system.split()[0], Path(sys.executable))
            save = args.work / f"out-{system.replace(' ', '-')}-{w['size']}.png" if system.startswith(("sdrt", "openvino")) else None
            recs.append(run_worker(system, python, models[w["model"]][system], w, image, repeats, save))
            print(f"  {system}: {recs[-1]['seconds']:.2f} s", flush=True)
        runs = f"best of {repeats}" if repeats > 1 else "one run"
        label = (f"img2img {w['size']}x{w['size']}, {w['steps']} steps at strength {w['strength']} "
                 f"({recs[0]['unet_calls']} UNet calls on a CFG batch of 2), guidance {w['guidance']}, {w['sampler']}, {runs} after a warm-up")
        if w["model"] != "sd15":
            label = f"{model_label}: {label}"
        t = table(recs)
        ran = [r["system"] for r in recs]
        failed = [f"- {s}: {why}" for s, why in args.failed.items() if only is None or s in only]
        t = "\n".join([t, *failed, *lossy_costs(args.work, w["size"], ran), goal_line(recs)]).rstrip()
        print(f"\n### {label}\n\n{t}\n", flush=True)
        sections[w["model"]].append(f"### {label}\n\n{t}")
        for r in recs:
            workload = {**r.get("workload", {}), **w, "name": name, "prompt": PROMPT, "timed_runs": repeats}
            records.append({**r, "date": date, "device": machine(), "workload": workload})
    if not args.no_docs:
        for m, secs in sections.items():
            head = f"Machine: {machine()}. Model: {MODELS[m][1]}, random weights, fp32. Date: {date}."
            doc = write_docs([head, *secs], command, m)
        out = ROOT / "benchmarks" / "results" / f"cpu-{date}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        # The day's file keeps the records of other workloads measured that day.
        ran = {r["workload"]["name"] for r in records}
        kept = [r for r in json.loads(out.read_text()) if r["workload"].get("name") not in ran] if out.exists() else []
        out.write_text(json.dumps(kept + records, indent=1) + "\n")
        print(f"wrote {doc} and {out}")


if __name__ == "__main__":
    main()
