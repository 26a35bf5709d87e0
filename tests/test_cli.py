"""The `sdrt` command line: every command through typer's CliRunner, the main ones through a real
subprocess too. Images are compared with what the Python API makes for the same request (the CLI
is a thin layer over it), PNG parameters are read back with Pillow and the infotext parser, and
refused runs are checked to write nothing."""

from __future__ import annotations

import inspect
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdrt.cli.app import DEFAULTS, app
from sdrt.runtime.infotext import arguments_from_infotext, parse_infotext, read_infotext

ROOT = Path(__file__).resolve().parents[1]
SDRT = Path(sys.executable).with_name("sdrt")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ENV = {"TERMINAL_WIDTH": "200", "COLUMNS": "200", "NO_COLOR": "1"}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sd1(models) -> Path:
    return models.exported("tiny-sd1")


@pytest.fixture(scope="module")
def inp(models) -> Path:
    return models.exported("tiny-inpaint")


@pytest.fixture(scope="module")
def api(sd1, inp):
    """The Python API on the same folders, as the reference the CLI must agree with."""
    from sdrt.runtime import load

    return {"sd1": load(sd1, provider="cpu"), "inp": load(inp, provider="cpu")}


def noise_image(path: Path, seed: int, size=(32, 32)) -> Path:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)
    return path


def half_mask(path: Path, side: str, size=(32, 32)) -> Path:
    arr = np.zeros((size[1], size[0]), np.uint8)
    if side == "left":
        arr[:, : size[0] // 2] = 255
    else:
        arr[:, size[0] // 2 :] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "L").save(path)
    return path


def cli(*args, ok: bool = True):
    r = CliRunner().invoke(app, [str(a) for a in args], env=ENV)
    if ok:
        assert r.exit_code == 0, (r.exit_code, r.output, r.exception)
    return r


def sub(*args, **kw) -> subprocess.CompletedProcess:
    """The installed console script in a fresh process."""
    return subprocess.run([str(SDRT), *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def params_of(path: Path) -> tuple[str, str, dict]:
    return parse_infotext(read_infotext(path))


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


GEN = ["--steps", 3, "--provider", "cpu"]


# --------------------------------------------------------------------------- start-up and help


def test_help_imports_no_runtime():
    """`sdrt --help` and usage errors answer from typer alone: neither ONNX Runtime nor PyTorch (nor
    NumPy, Pillow, the pipeline or the samplers) is imported, which is what keeps them instant
    (benchmarks/startup.py times them)."""
    code = (
        "import sys, json\n"
        "from sdrt.cli.app import app\n"
        "codes = []\n"
        "for args in (['--help'], ['img2img', '--help'], ['img2img', 'x.png', '--steps', 'many'], ['inpaint', 'x.png']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "heavy = [m for m in ('onnxruntime', 'torch', 'PIL', 'numpy', 'sdrt.runtime.pipeline', 'sdrt.schedulers') if m in sys.modules]\n"
        "print('RESULT', json.dumps({'heavy': heavy, 'codes': codes}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    assert res["heavy"] == [], f"--help imported {res['heavy']}"
    assert res["codes"] == [0, 0, 2, 2]  # help, help, bad number, missing --mask
    q = sub("--help")
    assert q.returncode == 0 and "img2img" in q.stdout


HELP = {
    "img2img": ["--prompt", "-p", "--negative", "-n", "--model", "-m", "--strength", "--steps", "--cfg", "--sampler",
                "--schedule", "--seed", "--batch-size", "--width", "--height", "--resize-mode", "--out", "-o",
                "--provider", "--overwrite", "--quiet", "--json", "--clip-skip", "--from-png", "IMAGE"],
    "inpaint": ["--mask", "--mask-blur", "--invert-mask", "--fill", "--only-masked", "--padding", "--no-overlay",
                "--prompt", "--strength", "--steps", "--cfg", "--sampler", "--schedule", "--seed", "--batch-size",
                "--width", "--height", "--resize-mode", "--out", "--provider", "--overwrite", "--quiet", "--json",
                "--clip-skip", "--from-png", "IMAGE"],
    "txt2img": ["--prompt", "--negative", "--model", "--width", "--height", "--steps", "--cfg", "--sampler", "--schedule",
                "--seed", "--batch-size", "--out", "--provider", "--overwrite", "--quiet", "--json", "--clip-skip",
                "--from-png"],
    "samplers": ["--json"],
    "info": ["model", "--verify"],
    "export": ["src", "out", "--precision", "--target", "--opset", "--overwrite", "--fp32-ops", "--fp32-vae-decoder"],
    "bench": ["--model", "--mode", "--size", "--steps", "--strength", "--cfg", "--sampler", "--batch-size", "--repeats",
              "--provider", "--threads", "--json"],
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_command_help_lists_its_options(command):
    r = cli(command, "--help")
    text = ANSI.sub("", r.stdout)
    for opt in HELP[command]:
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{command} --help lacks {opt}"
    top = ANSI.sub("", cli("--help").stdout)
    assert command in top


@pytest.mark.parametrize("mode, sampler, calls", [("img2img", "EulerDiscreteScheduler", 2), ("txt2img", "DDIMScheduler", 4),
                                                  ("inpaint", "Euler a", 3)])
def test_bench_times_every_stage(sd1, mode, sampler, calls):
    """`sdrt bench`: the stages add up to the run, the UNet count is the plan's (4 steps at strength
    0.5: 2 calls for diffusers, A1111's t_enc + 1 = 3), and the human-readable form names every stage."""
    r = cli("bench", "-m", sd1, "--mode", mode, "--size", 32, "--steps", 4, "--sampler", sampler, "--repeats", 1,
            "--provider", "cpu", "--json")
    rec = json.loads(r.stdout)
    assert rec["unet_calls"] == calls and rec["workload"]["mode"] == mode
    stages = rec["stages"]
    assert set(stages) == {"text_encoder", "vae_encode", "unet", "vae_decode", "sampler", "other"}
    assert all(v >= 0 for v in stages.values()) and stages["unet"] > 0 and stages["vae_decode"] > 0
    assert (stages["vae_encode"] > 0) == (mode != "txt2img")
    assert sum(stages.values()) == pytest.approx(rec["seconds"], rel=1e-6)
    assert rec["unet_per_call"] == pytest.approx(stages["unet"] / calls)
    assert rec["peak_rss_mib"] > 50
    text = ANSI.sub("", cli("bench", "-m", sd1, "--size", 32, "--steps", 2, "--repeats", 1, "--provider", "cpu").stdout)
    for word in ("end to end", "text encoder", "vae encode", "unet", "vae decode", "sampler", "per call", "peak RSS"):
        assert word in text


def test_help_defaults_and_choices_are_the_apis():
    """The defaults the help text quotes are those of the Python API (the CLI passes nothing for
    an option left out), and the help names every resize mode and fill mode the runtime accepts."""
    from sdrt.runtime import prepare
    from sdrt.runtime.pipeline import Pipeline

    sig = {m: inspect.signature(getattr(Pipeline, m)).parameters for m in ("img2img", "inpaint", "txt2img")}
    for key in ("steps", "guidance", "sampler", "strength", "batch_size", "resize_mode", "clip_skip"):
        assert DEFAULTS[key] == sig["img2img"][key].default, key
    for key in ("mask_blur", "fill", "padding"):
        assert DEFAULTS[key] == sig["inpaint"][key].default, key
    assert DEFAULTS["txt2img_size"] == sig["txt2img"]["width"].default == sig["txt2img"]["height"].default
    text = ANSI.sub("", cli("txt2img", "--help").stdout)
    assert "1024 for SDXL" in " ".join(text.split())
    text = ANSI.sub("", cli("inpaint", "--help").stdout)
    for mode in (*prepare.RESIZE_MODES, *prepare.FILL_MODES):
        assert mode in text


# --------------------------------------------------------------------------- samplers, info, export


def test_samplers_lists_every_name_alias_and_schedule():
    from sdrt.schedulers import family_of, list_samplers, list_schedules

    text = cli("samplers").stdout
    for s in list_samplers():
        assert re.search(rf"^  {re.escape(s.name)}(  |$)", text, re.M), s.name
        for alias in s.aliases:
            assert alias in text
            if family_of(alias) != s.family:  # the rule: another sampler's own name wins ("ddim")
                assert any(o.name == alias for o in list_samplers()), alias
                alias = f"{s.family}:{alias}"
            assert family_of(alias) == s.family
    for labels in list_schedules().values():
        for label in labels:
            assert label in text
    doc = json.loads(cli("samplers", "--json").stdout)
    assert [d["name"] for d in doc["samplers"]] == [s.name for s in list_samplers()]
    assert doc["schedules"] == list_schedules()
    p = sub("samplers")
    assert p.returncode == 0 and p.stdout == text


def test_info_and_export_commands(sd1, tmp_path):
    r = cli("info", sd1)
    assert re.search(r"^family\s+sd1$", r.stdout, re.M)
    assert re.search(r"^VAE scale factor\s+2 ", r.stdout, re.M)
    assert "CPUExecutionProvider" in r.stdout
    r = cli("info", tmp_path / "none", ok=False)
    assert r.exit_code == 1 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    # export: its argument checks answer before any work (the export itself is tested in test_export.py)
    r = cli("export", tmp_path / "no-such-src", tmp_path / "m", ok=False)
    assert r.exit_code == 1 and r.stderr.startswith("sdrt: error: ") and "no-such-src" in r.stderr
    r = cli("export", sd1, tmp_path / "m", "--precision", "fp16", ok=False)
    assert r.exit_code == 1 and "--target cuda" in r.stderr
    assert not (tmp_path / "m").exists()


def test_info_tells_how_int8_runs_here(models, sd1, copy_folder, monkeypatch, tmp_path):
    """`sdrt info` shows the CPU's int8 features and how the folder's int8 graphs run on it:
    weights within +-64 exactly everywhere; an int8 folder from before (full-range weights, no
    range in sdrt.json) still loads and runs, and on an x86-64 CPU without VNNI info says its
    weights may saturate there, run slower, and how to export it again."""
    import dataclasses

    from sdrt.runtime import cpu

    int8 = models.exported("tiny-sd1", target="cpu", precision="int8")
    here = cpu.cpu_features()
    r = cli("info", int8)
    assert re.search(rf"^CPU here\s+{re.escape(here.describe())}$", r.stdout, re.M)
    assert re.search(r"^int8 here\s+exact on every CPU", r.stdout, re.M)
    assert "int8 here" not in cli("info", sd1).stdout
    old = copy_folder(int8)
    manifest = json.loads((old / "sdrt.json").read_text())
    del manifest["int8_weight_max"]
    (old / "sdrt.json").write_text(json.dumps(manifest))
    avx2 = dataclasses.replace(here, arch="x86_64", flags=frozenset({"avx2"}), source="/proc/cpuinfo")
    monkeypatch.setattr(cpu, "cpu_features", lambda: avx2)
    r = cli("info", old)
    assert re.search(r"^CPU here\s+x86_64: AVX2$", r.stdout, re.M)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("int8 here"))
    assert "no VNNI" in line and "may saturate" in line and "+-127" in line and "sdrt export" in line
    monkeypatch.setattr(cpu, "cpu_features", lambda: dataclasses.replace(avx2, flags=frozenset({"avx2", "avx512_vnni"})))
    assert re.search(r"^int8 here\s+exact \(VNNI", cli("info", old).stdout, re.M)
    # The old folder still loads and generates.
    out = tmp_path / "old.png"
    cli("img2img", noise_image(tmp_path / "in.png", 3), "-p", "a red circle", "-m", old, "--strength", 0.5, "--seed", 1,
        "-o", out, *GEN)
    assert pixels(out).shape == (32, 32, 3)


# --------------------------------------------------------------------------- img2img


def test_img2img_folder_batch_metadata_and_api_parity(sd1, api, tmp_path):
    a = noise_image(tmp_path / "in" / "a.png", 1)
    noise_image(tmp_path / "in" / "b.jpg", 2)
    (tmp_path / "in" / "notes.txt").write_text("not an image, and not picked from a folder")
    out = tmp_path / "out"
    args = ["img2img", tmp_path / "in", "-p", "a red circle", "-n", "blurry, lowres", "-m", sd1, "--strength", 0.6,
            "--cfg", 5, "--sampler", "DPM++ 2M", "--schedule", "Karras", "--seed", 41, "--batch-size", 2,
            "--clip-skip", 2, "-o", out, *GEN]
    r = cli(*args)
    names = ["a-41.png", "a-42.png", "b-41.png", "b-42.png"]
    assert files(out) == set(names)
    assert r.stdout.split() == [str(out / n) for n in names]  # one written file per line, in order
    for n in names:
        with Image.open(out / n) as im:
            assert im.format == "PNG" and im.size == (32, 32)
        prompt, negative, p = params_of(out / n)
        assert (prompt, negative) == ("a red circle", "blurry, lowres")
        assert p["Steps"] == "3" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
        assert float(p["CFG scale"]) == 5 and p["Seed"] == n[2:4] and p["Size"] == "32x32"
        assert float(p["Denoising strength"]) == 0.6 and p["Clip skip"] == "2"
        assert p["Model"] == sd1.name
    # The same request through the Python API gives the same pixels.
    ref = api["sd1"].img2img(a, "a red circle", "blurry, lowres", strength=0.6, steps=3, guidance=5.0,
                             sampler="DPM++ 2M", schedule="Karras", seed=41, batch_size=2, clip_skip=2)
    assert np.array_equal(pixels(out / "a-41.png"), np.asarray(ref.images[0]))
    assert np.array_equal(pixels(out / "a-42.png"), np.asarray(ref.images[1]))
    assert read_infotext(out / "a-42.png") == ref.infotexts[1]
    assert not np.array_equal(pixels(out / "a-41.png"), pixels(out / "b-41.png"))

    # A second run refuses to overwrite, then --overwrite replaces.
    r = cli(*args, ok=False)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr
    cli(*args, "--overwrite", "--quiet")
    assert files(out) == set(names)
    # A folder name with a dot is still a folder.
    cli("img2img", a, "-p", "x", "-m", sd1, "--seed", 1, "-o", tmp_path / "run.v2", *GEN)
    assert files(tmp_path / "run.v2") == {"a-1.png"}


def test_img2img_json_and_exact_out_file(sd1, tmp_path):
    a = noise_image(tmp_path / "photo.png", 3)
    target = tmp_path / "result.png"
    r = cli("img2img", a, "-p", "a blue square", "-m", sd1, "--seed", 7, "--json", "-o", target, *GEN)
    doc = json.loads(r.stdout)
    assert doc["command"] == "img2img" and doc["provider"] == "cpu" and Path(doc["model"]) == sd1
    (rec,) = doc["images"]
    assert rec["input"] == str(a) and rec["output"] == str(target) and rec["seed"] == 7
    assert rec["parameters"]["prompt"] == "a blue square" and rec["parameters"]["steps"] == 3
    assert rec["parameters"]["strength"] == 0.75 and rec["parameters"]["sampler"] == "Euler a"  # the API's defaults
    assert rec["infotext"] == read_infotext(target)
    assert rec["timings"]["total"] > 0 and doc["timings"]["total"] >= rec["timings"]["total"]
    assert files(tmp_path) == {"photo.png", "result.png"}


def test_random_seed_names_the_file(sd1, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    noise_image(tmp_path / "x.png", 4)
    r = cli("img2img", "x.png", "-p", "a cat", "-m", sd1, "--json", *GEN)  # no --out: the current folder
    (rec,) = json.loads(r.stdout)["images"]
    assert rec["output"] == f"x-{rec['seed']}.png"
    assert params_of(tmp_path / rec["output"])[2]["Seed"] == str(rec["seed"])


def test_from_png_reproduces_and_options_override(sd1, tmp_path):
    a = noise_image(tmp_path / "a.png", 5)
    first = tmp_path / "first.png"
    cli("img2img", a, "-p", "a green (triangle:1.2)", "-n", "dark", "-m", sd1, "--strength", 0.5, "--cfg", 6.5,
        "--sampler", "Euler", "--schedule", "Exponential", "--seed", 123, "--width", 24, "--height", 40,
        "--clip-skip", 2, "-o", first, *GEN)
    again = tmp_path / "again.png"
    cli("img2img", a, "--from-png", first, "-m", sd1, "-o", again, "--provider", "cpu")
    assert read_infotext(again) == read_infotext(first)
    assert np.array_equal(pixels(again), pixels(first))
    assert Image.open(again).size == (24, 40)
    # Options given on the command line win over the PNG's.
    other = tmp_path / "other.png"
    cli("img2img", a, "--from-png", first, "-m", sd1, "-o", other, "--seed", 9, "--steps", 2, "--provider", "cpu")
    prompt, negative, p = params_of(other)
    _, _, p0 = params_of(first)
    assert prompt == "a green (triangle:1.2)" and negative == "dark"
    assert p["Seed"] == "9" and p["Steps"] == "2"
    assert {k: v for k, v in p.items() if k not in ("Seed", "Steps")} == {k: v for k, v in p0.items() if k not in ("Seed", "Steps")}
    assert not np.array_equal(pixels(other), pixels(first))


def test_arguments_from_a1111_infotext():
    """What --from-png takes from an infotext as A1111 writes it (written out by hand)."""
    text = (
        "a red fox sitting in the snow\nNegative prompt: lowres\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 768x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.6, Clip skip: 2, "
        "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, Masked content: latent noise, "
        "Mask mode: Inpaint not masked, Version: v1.10.1"
    )
    common = dict(prompt="a red fox sitting in the snow", negative_prompt="lowres", steps=30, sampler="DPM++ 2M",
                  schedule="Karras", guidance=7.0, seed=1234, width=768, height=512, clip_skip=2)
    assert arguments_from_infotext(text, "img2img") == {**common, "strength": 0.6}
    assert arguments_from_infotext(text, "txt2img") == common
    assert arguments_from_infotext(text, "inpaint") == {
        **common, "strength": 0.6, "mask_blur": 4, "only_masked": True, "padding": 32, "fill": "latent_noise",
        "invert_mask": True}


# --------------------------------------------------------------------------- inpaint


def test_inpaint_pairs_masks_by_stem(inp, api, tmp_path):
    a = noise_image(tmp_path / "img" / "a.png", 6)
    b = noise_image(tmp_path / "img" / "b.png", 7)
    ma = half_mask(tmp_path / "masks" / "a.png", "left")
    mb = half_mask(tmp_path / "masks" / "b.webp", "right")  # any image type; matched by stem
    out = tmp_path / "out"
    r = cli("inpaint", tmp_path / "img", "--mask", tmp_path / "masks", "-p", "a hat", "-m", inp, "--seed", 3,
            "--mask-blur", 2, "--fill", "latent_noise", "--json", "-o", out, *GEN)
    recs = json.loads(r.stdout)["images"]
    assert [(x["input"], x["mask"], x["output"]) for x in recs] == [
        (str(a), str(ma), str(out / "a-3.png")), (str(b), str(mb), str(out / "b-3.png"))]
    for img, mask in ((a, ma), (b, mb)):
        ref = api["inp"].inpaint(img, mask, "a hat", seed=3, steps=3, mask_blur=2, fill="latent_noise")
        got = pixels(out / f"{img.stem}-3.png")
        assert np.array_equal(got, np.asarray(ref.images[0]))
        assert read_infotext(out / f"{img.stem}-3.png") == ref.infotexts[0]
    _, _, p = params_of(out / "a-3.png")
    assert p["Mask blur"] == "2" and p["Masked content"] == "latent noise"
    # The overlay keeps the original outside the mask; --no-overlay does not.
    orig = pixels(a)
    assert np.array_equal(pixels(out / "a-3.png")[:, 24:], orig[:, 24:])
    cli("inpaint", a, "--mask", ma, "-p", "a hat", "-m", inp, "--seed", 3, "--no-overlay", "--only-masked",
        "--padding", 4, "--invert-mask", "-o", tmp_path / "plain.png", *GEN)
    _, _, p = params_of(tmp_path / "plain.png")
    assert p["Inpaint area"] == "Only masked" and p["Masked area padding"] == "4" and p["Mask mode"] == "Inpaint not masked"
    # --from-png brings the inpainting options back.
    cli("inpaint", a, "--mask", ma, "--from-png", out / "a-3.png", "-m", inp, "-o", tmp_path / "re.png", "--provider", "cpu")
    assert np.array_equal(pixels(tmp_path / "re.png"), pixels(out / "a-3.png"))


# --------------------------------------------------------------------------- txt2img


def test_txt2img_batch_and_from_png(sd1, api, tmp_path):
    out = tmp_path / "t"
    cli("txt2img", "-p", "a lighthouse", "-m", sd1, "-W", 32, "-H", 24, "--seed", 10, "-b", 2, "--sampler",
        "dpmpp_2m", "--schedule", "karras", "-o", out, *GEN)
    assert files(out) == {"txt2img-10.png", "txt2img-11.png"}
    ref = api["sd1"].txt2img("a lighthouse", width=32, height=24, seed=11, steps=3, sampler="dpmpp_2m", schedule="karras")
    assert np.array_equal(pixels(out / "txt2img-11.png"), np.asarray(ref.images[0]))  # image i has seed + i
    _, _, p = params_of(out / "txt2img-11.png")
    assert p["Sampler"] == "dpmpp_2m" and p["Schedule type"] == "karras" and p["Size"] == "32x24" and "Denoising strength" not in p


# --------------------------------------------------------------------------- refusals

P = ["-p", "a cat", "--steps", 2]
BAD = {
    "missing file": (lambda d, m: ["img2img", d / "nope.png", "-m", m["sd1"], *P], 1, "nope.png"),
    "non-image file": (lambda d, m: ["img2img", d / "notes.txt", "-m", m["sd1"], *P], 1, "not an image"),
    "bad file in a folder": (lambda d, m: ["img2img", d / "mixed", "-m", m["sd1"], *P], 1, "broken.png"),
    "mask of another aspect ratio": (lambda d, m: ["inpaint", d / "a.png", "--mask", d / "wide.png", "-m", m["inp"], *P], 1, "aspect ratios differ"),
    "missing mask in a folder": (lambda d, m: ["inpaint", d / "mixed", "--mask", d / "masks", "-m", m["inp"], *P], 1, "no mask for image"),
    "unknown sampler": (lambda d, m: ["img2img", d / "a.png", "-m", m["sd1"], "--sampler", "Eulr b", *P], 1, "unknown sampler 'Eulr b'"),
    "unknown schedule": (lambda d, m: ["img2img", d / "a.png", "-m", m["sd1"], "--schedule", "wobbly", *P], 1, "unknown schedule 'wobbly'"),
    "strength 1.5": (lambda d, m: ["img2img", d / "a.png", "-m", m["sd1"], "--strength", 1.5, *P], 1, "strength must be from 0.0 to 1.0"),
    "bad fill": (lambda d, m: ["inpaint", d / "a.png", "--mask", d / "mask.png", "-m", m["inp"], "--fill", "paint", *P], 1, "fill must be one of"),
    "existing output": (lambda d, m: ["img2img", d / "a.png", "-m", m["sd1"], "--seed", 1, "-o", d / "taken.png", *P], 1, "already exists"),
    "one file for many images": (lambda d, m: ["img2img", d / "a.png", "-b", 2, "-m", m["sd1"], "-o", d / "one.png", *P], 1, "names one file"),
    "jpeg output": (lambda d, m: ["img2img", d / "a.png", "-m", m["sd1"], "-o", d / "x.jpg", *P], 1, "PNG"),
    "outputs that collide": (lambda d, m: ["img2img", d / "a.png", d / "mixed" / "a.png", "--seed", 1, "-m", m["sd1"], *P], 1, "would both write"),
    "png without parameters": (lambda d, m: ["img2img", d / "a.png", "--from-png", d / "a.png", "-m", m["sd1"]], 1, "no generation parameters"),
    "missing model": (lambda d, m: ["img2img", d / "a.png", "-m", d / "no-model", *P], 1, "no-model"),
    "missing prompt": (lambda d, m: ["img2img", d / "a.png", "-m", m["sd1"]], 2, "--prompt"),
    "bad number": (lambda d, m: ["img2img", d / "a.png", "--steps", "many", *P[:2]], 2, "--steps"),
}


@pytest.fixture()
def bad_inputs(tmp_path):
    d = tmp_path
    noise_image(d / "a.png", 8)
    (d / "notes.txt").write_text("hello")
    noise_image(d / "mixed" / "a.png", 9)
    (d / "mixed" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    half_mask(d / "mask.png", "left")
    half_mask(d / "masks" / "a.png", "left")
    half_mask(d / "wide.png", "left", size=(64, 32))
    noise_image(d / "taken.png", 10)
    return d


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, bad_inputs, sd1, inp, monkeypatch):
    d = bad_inputs
    monkeypatch.chdir(d)
    make, code, needle = BAD[case]
    args = make(d, {"sd1": sd1, "inp": inp})
    if "-o" not in args:
        args += ["-o", d / "out"]
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    r = cli(*args, ok=False)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert needle in ANSI.sub("", r.stderr)
    if code == 1:
        assert r.stderr.startswith("sdrt: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.output
    after = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    assert after == before, "a refused run wrote or touched files"
    assert not (d / "out").exists()


def test_missing_default_model_says_how_to_export(tmp_path, monkeypatch):
    import sdrt.models

    monkeypatch.setattr(sdrt.models, "HERE", tmp_path)  # as if the embedded model were not installed
    a = noise_image(tmp_path / "a.png", 11)
    r = cli("img2img", a, "-p", "x", "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "--model" in r.stderr and "sdrt export" in r.stderr


# --------------------------------------------------------------------------- real processes


def test_subprocess_runs_json_errors_and_debug(sd1, inp, tmp_path):
    a = noise_image(tmp_path / "a.png", 12)
    m = half_mask(tmp_path / "m.png", "right")
    p = sub("inpaint", a, "--mask", m, "-p", "a hat", "-m", inp, "--seed", 5, "--json", "-o", tmp_path / "o", *GEN)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # not a terminal: no progress bar
    (rec,) = json.loads(p.stdout)["images"]
    assert Path(rec["output"]) == tmp_path / "o" / "a-5.png" and params_of(Path(rec["output"]))[2]["Seed"] == "5"
    # txt2img and --from-png in fresh processes reproduce the same bytes.
    p = sub("txt2img", "-p", "a boat", "-m", sd1, "-W", 32, "-H", 32, "--seed", 4, "-o", tmp_path / "t1.png", *GEN)
    assert p.returncode == 0 and p.stdout.strip() == str(tmp_path / "t1.png"), p.stderr
    p = sub("txt2img", "--from-png", tmp_path / "t1.png", "-m", sd1, "-o", tmp_path / "t2.png", "-q")
    assert p.returncode == 0 and p.stdout == "", p.stderr
    assert (tmp_path / "t1.png").read_bytes() == (tmp_path / "t2.png").read_bytes()
    # A runtime failure: exit 1, one line, no traceback; --debug shows the traceback.
    p = sub("img2img", tmp_path / "missing.png", "-p", "x", "-m", sd1, "-o", tmp_path / "e")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "missing.png" in p.stderr and "Traceback" not in p.stderr
    p = sub("--debug", "img2img", tmp_path / "missing.png", "-p", "x", "-m", sd1, "-o", tmp_path / "e")
    assert p.returncode == 1 and "Traceback" in p.stderr and "InputError" in p.stderr
    p = sub("img2img", a, "--strength", "lots")
    assert p.returncode == 2
    assert not (tmp_path / "e").exists()


def test_progress_bar_on_a_terminal(sd1, tmp_path):
    """On a terminal (stderr a pty) a progress bar shows images and steps; --quiet silences it."""
    a = noise_image(tmp_path / "a.png", 13)

    def run_on_pty(*extra):
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
        args = ["img2img", a, "-p", "x", "-m", sd1, "--seed", 1, "--steps", 4, "--strength", 1, "--provider", "cpu",
                "-o", tmp_path / "o", "--overwrite", *extra]
        proc = subprocess.Popen([str(SDRT), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        stdout = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0
        return ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")), stdout.decode()

    shown, stdout = run_on_pty()
    assert "images" in shown and "steps" in shown and "1/1" in shown
    assert stdout.strip() == str(tmp_path / "o" / "a-1.png")
    shown, stdout = run_on_pty("--quiet")
    assert "steps" not in shown and stdout == ""


def _bad_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block has a tag pointing past its end (Pillow warns about it)."""
    import struct

    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010E, 2, 100, 4000) + struct.pack("<I", 0)
    Image.new("RGB", (32, 32), "blue").save(path, exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd)
    return path


def test_damaged_exif_loads_without_warnings(sd1, api, tmp_path):
    import warnings

    src = _bad_exif_jpeg(tmp_path / "bad-exif.jpg")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Image.open(src) as im:
            im.getexif()
    assert any("Tag data larger than file" in str(w.message) for w in seen)  # Pillow does warn on this file
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        api["sd1"].img2img(src, "x", steps=1, dry_run=True)
    assert [str(w.message) for w in seen] == []
    p = sub("img2img", src, "-p", "x", "-m", sd1, "--seed", 1, "-o", tmp_path / "o", *GEN)
    assert p.returncode == 0 and p.stderr == "" and p.stdout.strip() == str(tmp_path / "o" / "bad-exif-1.png")


def test_sdrt_info_refuses_what_img2img_refuses(sd1, tmp_path):
    """A folder whose tokenizer is unreadable (consistent sizes and hashes): img2img and info both
    exit 1 with the same cause."""
    import hashlib
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(sd1, folder)
    (folder / "tokenizer" / "tokenizer.json").write_text("{ not json")
    m = json.loads((folder / "sdrt.json").read_text())
    data = (folder / "tokenizer" / "tokenizer.json").read_bytes()
    m["files"]["tokenizer/tokenizer.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "sdrt.json").write_text(json.dumps(m))
    a = noise_image(tmp_path / "a.png", 14)
    r1 = cli("img2img", a, "-p", "x", "-m", folder, "-o", tmp_path / "o", *GEN, ok=False)
    r2 = cli("info", folder, ok=False)
    assert r1.exit_code == r2.exit_code == 1
    assert "tokenizer" in r1.stderr and "tokenizer" in r2.stderr and r2.stderr.count("\n") == 1
    assert cli("info", sd1).exit_code == 0
