"""A generated table of bad inputs and faults, run through the command line and the Python API.

For every case: the exit status (CLI) or exception type (API), one line that names the input and
says what is accepted, no traceback (CLI without --debug), no output file or folder left behind,
and every file that existed before (inputs, model folders, earlier outputs) byte-for-byte and
time-stamp unchanged. The table is built from kinds of bad input (numbers out of range or not
numbers, unreadable or hostile files, damaged model folders, sampler options, prompts, outputs),
each with several values, so a new option or check gets the whole family of cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdrt.cli.app import app
from sdrt.runtime import InputError, ModelFolderError, ProviderError
from sdrt.runtime.infotext import format_infotext, save_png

ENV = {"TERMINAL_WIDTH": "200", "COLUMNS": "200", "NO_COLOR": "1"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
GEN = ["--steps", "2", "--provider", "cpu", "--seed", "3"]


# --------------------------------------------------------------------------- files the cases use


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, followed by a few bytes of image data: the size can
    be read, the pixels cannot be decoded. A check that decodes first fails differently."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def noise_png(path: Path, size=(32, 32), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def params_png(path: Path, **fields) -> Path:
    """A small PNG with a parameters text, as sdrt or A1111 write it."""
    base = {"Steps": 2, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "32x32", "Denoising strength": 0.5}
    base.update(fields)
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    save_png(img, path, format_infotext("a red circle", "", {k: v for k, v in base.items() if v is not None}))
    return path


@pytest.fixture(scope="module")
def sd1(models) -> Path:
    return models.exported("tiny-sd1")


@pytest.fixture(scope="module")
def inp(models) -> Path:
    return models.exported("tiny-inpaint")


def _workdir(root: Path, sd1: Path, inp: Path) -> Path:
    d = root
    noise_png(d / "a.png")
    noise_png(d / "b.png", seed=1)
    Image.fromarray(np.tile((np.arange(32) < 16).astype(np.uint8) * 255, (32, 1))).save(d / "mask.png")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(d / "wide-mask.png")
    (d / "empty.png").write_bytes(b"")
    (d / "garbage.png").write_bytes(b"this is not an image\n" * 20)
    buf = (d / "a.png").read_bytes()
    (d / "truncated.png").write_bytes(buf[: len(buf) // 2])
    (d / "huge-6000.png").write_bytes(png_header(6000, 6000))
    (d / "huge-9000.png").write_bytes(png_header(9000, 9000))  # over sdrt's 64 Mpx, under Pillow's warning
    (d / "huge-9500.png").write_bytes(png_header(9500, 9500))  # Pillow warns (89 Mpx)
    (d / "huge-100000.png").write_bytes(png_header(100000, 100000))  # Pillow refuses (179 Mpx)
    (d / "wide-20000.png").write_bytes(png_header(20000, 1000))  # few pixels, one side too long
    (d / "folder.png").mkdir()
    os.mkfifo(d / "fifo.png")
    (d / "loop.png").symlink_to(d / "loop.png")
    (d / "afile").write_text("a file, not a folder")
    noise_png(d / "taken.png", seed=2)
    (d / "notes.txt").write_text("hello")
    (d / ".keep.png.tmp").write_text("not ours: a name sdrt does not use")
    params_png(d / "p-ok.png")
    params_png(d / "p-size.png", Size="100000x100000")
    params_png(d / "p-steps.png", Steps="abc")
    params_png(d / "p-steps-big.png", Steps="1e400")
    params_png(d / "p-seed.png", Seed="-5")
    params_png(d / "p-cfg.png", **{"CFG scale": "nan"})
    params_png(d / "p-strength.png", **{"Denoising strength": "5"})
    params_png(d / "p-sampler.png", Sampler="Eulr b")
    params_png(d / "p-sizeform.png", Size="big")
    noise_png(d / "noparams.png", seed=4)
    (d / "mixed").mkdir()
    noise_png(d / "mixed" / "a.png", seed=5)
    (d / "mixed" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "noimages").mkdir()
    (d / "noimages" / "readme.txt").write_text("x")
    # Model folders, damaged one way each (copies: the cached test models are never touched).
    for name, damage in MODEL_DAMAGE.items():
        dst = d / "models" / name
        shutil.copytree(inp if name.startswith("inp-") else sd1, dst)
        damage(dst)
    (d / "models" / "not-a-model").mkdir()
    return d


def _manifest(edit):
    def damage(folder: Path) -> None:
        m = json.loads((folder / "sdrt.json").read_text())
        edit(m)
        (folder / "sdrt.json").write_text(json.dumps(m))

    return damage


def _set(key, value):
    return _manifest(lambda m: m.__setitem__(key, value))


def _flip_keep_mtime(rel: str):
    def damage(folder: Path) -> None:
        p = folder / rel
        st = p.stat()
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime

    return damage


def _scheduler(**kw):
    def damage(folder: Path) -> None:
        p = folder / "scheduler" / "scheduler_config.json"
        cfg = json.loads(p.read_text())
        cfg.update(kw)
        data = json.dumps(cfg).encode()
        p.write_bytes(data)
        _rehash(folder, "scheduler/scheduler_config.json")

    return damage


def _rehash(folder: Path, rel: str) -> None:
    """Record a file's new size and sha256 in the manifest: the folder is consistent but its
    content is bad, so the check that catches it is not the hash."""
    m = json.loads((folder / "sdrt.json").read_text())
    data = (folder / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "sdrt.json").write_text(json.dumps(m))


def _config(rel: str, **kw):
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / rel).read_text())
        cfg.update(kw)
        (folder / rel).write_text(json.dumps(cfg))
        _rehash(folder, rel)

    return damage


def _truncate(rel: str):
    def damage(folder: Path) -> None:
        p = folder / rel
        p.write_bytes(p.read_bytes()[:1000])

    return damage


def _remove(rel: str):
    def damage(folder: Path) -> None:
        p = folder / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return damage


def _both(*fns):
    def damage(folder: Path) -> None:
        for f in fns:
            f(folder)

    return damage


MODEL_DAMAGE: dict[str, Callable[[Path], None]] = {
    "files-list": _set("files", []),
    "files-str": _set("files", {"unet/model.onnx": "abc"}),
    "files-empty": _set("files", {}),
    "files-outside": _manifest(lambda m: m["files"].__setitem__("../../etc/passwd", {"size": 1, "sha256": "0" * 64})),
    "files-size-str": _manifest(lambda m: m["files"]["unet/model.onnx"].__setitem__("size", "big")),
    "files-sha-short": _manifest(lambda m: m["files"]["unet/model.onnx"].__setitem__("sha256", "abc")),
    "scaling-nan": _set("vae_scaling_factor", float("nan")),
    "scaling-zero": _set("vae_scaling_factor", 0),
    "scaling-neg": _set("vae_scaling_factor", -0.18),
    "scaling-str": _set("vae_scaling_factor", "0.18"),
    "scaling-lie": _set("vae_scaling_factor", 0.5),
    "scale-factor-zero": _set("vae_scale_factor", 0),
    "scale-factor-three": _set("vae_scale_factor", 3),
    "scale-factor-lie": _set("vae_scale_factor", 8),
    "scale-factor-huge": _set("vae_scale_factor", 2**40),
    "latent-zero": _set("latent_channels", 0),
    "latent-lie": _both(_set("latent_channels", 8), _set("unet_in_channels", 8)),
    "latent-str": _set("latent_channels", "4"),
    "in-channels-lie": _set("unet_in_channels", 9),
    "in-channels-odd": _set("unet_in_channels", 5),
    "hidden-lie": _set("text_hidden_size", 768),
    "prediction": _set("prediction_type", "sample-ish"),
    "target": _set("target", "tpu"),
    "precision": _manifest(lambda m: m["precision"].__setitem__("unet", "fp8")),
    "precision-list": _set("precision", ["fp32"]),
    "sample-size": _set("sample_size", -1),
    "format": _set("format_version", 2),
    "family-missing": _manifest(lambda m: m.pop("family")),
    "manifest-json": lambda f: (f / "sdrt.json").write_text("{ not json"),
    "manifest-list": lambda f: (f / "sdrt.json").write_text("[1, 2]"),
    "flipped-unet": _flip_keep_mtime("unet/model.onnx"),
    "flipped-vae": _flip_keep_mtime("vae_decoder/model.onnx"),
    "flipped-tokenizer": _flip_keep_mtime("tokenizer/vocab.json"),
    "truncated-unet": _truncate("unet/model.onnx"),
    "missing-unet": _remove("unet/model.onnx"),
    "missing-tokenizer": _remove("tokenizer"),
    "incomplete": lambda f: (f / ".sdrt-incomplete").write_text(""),
    "timesteps-zero": _scheduler(num_train_timesteps=0),
    "timesteps-neg": _scheduler(num_train_timesteps=-5),
    "betas-empty": _scheduler(trained_betas=[]),
    "betas-one": _scheduler(trained_betas=[0.5]),
    "beta-end-nan": _scheduler(beta_end=float("nan")),
    "vae-config-lie": _config("vae_decoder/config.json", latent_channels=8),
    "unet-config-lie": _config("unet/config.json", in_channels=9),
    "inp-in-channels-lie": _set("unet_in_channels", 4),
}
# What the message must say for each damaged folder.
MODEL_NEEDLE = {
    "files-list": r'"files" must map', "files-str": r"entry of unet/model\.onnx", "files-empty": r"lists no size and sha256",
    "files-outside": r"not a path inside the folder", "files-size-str": r"size of unet/model\.onnx",
    "files-sha-short": r"sha256 of unet/model\.onnx", "scaling-nan": r"vae_scaling_factor is nan",
    "scaling-zero": r"vae_scaling_factor is 0", "scaling-neg": r"vae_scaling_factor is -0\.18",
    "scaling-str": r"vae_scaling_factor is '0\.18'", "scaling-lie": r"vae_scaling_factor 0\.5 but",
    "scale-factor-zero": r"vae_scale_factor is 0", "scale-factor-three": r"vae_scale_factor is 3",
    "scale-factor-lie": r"vae_scale_factor 8 but", "scale-factor-huge": r"vae_scale_factor is 1099511627776",
    "latent-zero": r"latent_channels is 0", "latent-lie": r"(unet_in_channels|latent_channels) 8 but", "latent-str": r"latent_channels is '4'",
    "in-channels-lie": r"unet_in_channels 9 but", "in-channels-odd": r"unet_in_channels is 5",
    "hidden-lie": r"text_hidden_size 768 but", "prediction": r"prediction_type is 'sample-ish'",
    "target": r"target is 'tpu'", "precision": r"precision of unet is 'fp8'", "precision-list": r"precision must map",
    "sample-size": r"sample_size is -1", "format": r"format version 2", "family-missing": r"missing family",
    "manifest-json": r"not valid JSON", "manifest-list": r"does not hold a JSON object",
    "flipped-unet": r"unet/model\.onnx does not match its sha256", "flipped-vae": r"vae_decoder/model\.onnx does not match",
    "flipped-tokenizer": r"tokenizer/vocab\.json does not match", "truncated-unet": r"unet/model\.onnx has 1000 bytes",
    "missing-unet": r"unet/model\.onnx is missing", "missing-tokenizer": r"tokenizer/.* is missing",
    "incomplete": r"interrupted export", "timesteps-zero": r"num_train_timesteps must be .* got 0",
    "timesteps-neg": r"num_train_timesteps must be .* got -5", "betas-empty": r"trained_betas must be .* got \[\]",
    "betas-one": r"trained_betas must be .* got \[0\.5\]", "beta-end-nan": r"beta_end must be .* got nan",
    "vae-config-lie": r"latent_channels 4 but VAE config latent_channels is 8",
    "unet-config-lie": r"unet_in_channels 4 but unet/config\.json in_channels is 9",
    "inp-in-channels-lie": r"unet_in_channels 4 but unet/config\.json in_channels is 9",
}


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    via: str  # "cli" or "api"
    run: Any  # cli: function(d, m) -> argument list; api: function(d, m, pipes) -> None (raises)
    expect: Any  # cli: exit status; api: exception type
    needle: str  # regex the one line must match (the input's name and what is accepted)


# Options with the values that are wrong for them: (option, API keyword, modes, needle, bad values).
# A bad value is a string for the CLI (typer parses it) and a Python object for the API.
NUMBER_OPTIONS = [
    ("--steps", "steps", ("img2img", "inpaint", "txt2img"), "steps",
     ["0", "-1", "10001", "2147483648", "abc", "1.5", ""], [0, -1, 10001, 2**31, 10**12, "abc", 1.5, float("nan"), None, True]),
    ("--strength", "strength", ("img2img", "inpaint"), "strength",
     ["-0.1", "1.5", "nan", "inf", "-inf", "1e309", "abc", ""], [-0.1, 1.5, float("nan"), float("inf"), "0.5", None, 10**12]),
    ("--cfg", "guidance", ("img2img", "inpaint", "txt2img"), "guidance",
     ["-1", "101", "nan", "inf", "1e309", "abc"], [-1, 101, float("nan"), float("-inf"), "7", None, np.float32("nan")]),
    ("--seed", "seed", ("img2img", "inpaint", "txt2img"), "seed",
     ["-5", "4294967296", "99999999999999999999", "abc", "1.5"], [-5, 2**32, 10**20, "abc", 1.5, float("nan"), True]),
    ("--batch-size", "batch_size", ("img2img", "inpaint", "txt2img"), "batch_size",
     ["0", "-1", "65", "1000000", "abc"], [0, -1, 65, 10**6, 2.0, "2", None]),
    ("-W", "width", ("img2img", "inpaint", "txt2img"), "width",
     ["-8", "16000", "2147483648", "99999999999999999999", "abc", "1.5"], [-8, 16000, 2**31, 10**12, 32.0, "32", float("nan")]),
    ("-H", "height", ("img2img", "inpaint", "txt2img"), "height",
     ["-1", "8193", "4294967296", "abc"], [-1, 8193, 2**32, 10**12, 1.5, True]),
    ("--clip-skip", "clip_skip", ("img2img", "inpaint", "txt2img"), "clip_skip",
     ["0", "-3", "25", "99", "abc"], [0, -3, 25, 99, 1.5, "1", None]),
    ("--mask-blur", "mask_blur", ("inpaint",), "mask_blur",
     ["-1", "513", "100000", "abc"], [-1, 513, float("nan"), float("inf"), "4", 1e9]),
    ("--padding", "padding", ("inpaint",), "padding",
     ["-1", "513", "2147483648", "abc"], [-1, 513, float("inf"), "32", None]),
]
CHOICE_OPTIONS = [
    ("--resize-mode", "resize_mode", ("img2img", "inpaint"), "resize_mode", ["stretch", "", "JUST_RESIZE"], ["stretch", 3, None]),
    ("--fill", "fill", ("inpaint",), "fill", ["paint", "", "latent"], ["paint", 0, None]),
    ("--sampler", "sampler", ("img2img", "inpaint", "txt2img"), "sampler",
     ["Eulr b", "", "DDIM(", "a1111:EulerDiscreteScheduler", "EulerDiscreteScheduler(foo=1)", "Euler a(eta=1)"],
     ["Eulr b", "", 5, None, "DDIM(", "EulerDiscreteScheduler(foo=1)"]),
    ("--schedule", "schedule", ("img2img", "inpaint", "txt2img"), "schedule", ["wobbly", "Karras Karras"], ["wobbly", 7]),
    ("--provider", "provider", ("img2img", "txt2img"), "provider", ["tpu", "", "CUDA "], None),
]
SAMPLER_FAULTS = [  # diffusers class names with options in the name, or A1111 names with keyword options
    ("DDIMScheduler(steps_offset=999)", {}, r"DDIMScheduler\(steps_offset=999\).*steps_offset must be from 0 to 499 for 2 steps"),
    ("KDPM2AncestralDiscreteScheduler(beta_end=0.9999)", {}, r"KDPM2AncestralDiscreteScheduler.*no usable noise schedule"),
    ("DDIMScheduler(num_train_timesteps=0)", {}, r"num_train_timesteps must be a whole number from 2 .* got 0"),
    ("DDIMScheduler(num_train_timesteps=-5)", {}, r"num_train_timesteps must be .* got -5"),
    ("EulerDiscreteScheduler(trained_betas=[])", {}, r"trained_betas must be a list of at least 2 .* got \[\]"),
    ("EulerDiscreteScheduler(trained_betas=[0.5])", {}, r"trained_betas must be .* got \[0\.5\]"),
    ("EulerDiscreteScheduler(trained_betas=[0.5, 2.0])", {}, r"trained_betas must be"),
    ("EulerDiscreteScheduler(beta_start=-1)", {}, r"beta_start must be a number between 0 and 1"),
    ("EulerDiscreteScheduler(beta_end=2)", {}, r"beta_end must be a number between 0 and 1"),
    ("DPMSolverSDEScheduler(noise_sampler_seed='abc')", {}, r"noise_sampler_seed must be none or a whole number"),
    ("DPMSolverSDEScheduler(noise_sampler_seed=-1)", {}, r"noise_sampler_seed must be none or a whole number"),
]
API_SAMPLER_FAULTS = [
    ("Euler", {"s_noise": float("nan")}, r"s_noise must be a finite number, got nan"),
    ("Euler a", {"s_noise": float("inf")}, r"s_noise must be a finite number, got inf"),
    ("DPM++ 2M Karras", {"sigma_min": float("nan")}, r"sigma_min must be a finite number > 0, got nan"),
    ("DPM++ 2M Karras", {"sigma_max": float("-inf")}, r"sigma_max must be a finite number > 0, got -inf"),
    ("EulerDiscreteScheduler", {"trained_betas": [0.5]}, r"trained_betas must be .* got \[0\.5\]"),
    ("EulerDiscreteScheduler", {"trained_betas": [0.1] * 10}, r"trained_betas has 10 values but num_train_timesteps is 1000"),
    ("EulerDiscreteScheduler", {"trained_betas": np.array([np.nan] * 1000)}, r"option trained_betas must be finite"),
    ("DDIMScheduler", {"num_train_timesteps": 0}, r"num_train_timesteps must be .* got 0"),
    ("DDIMScheduler", {"steps_offset": 999}, r"steps_offset must be from 0 to 499 for 2 steps"),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": "abc"}, r"noise_sampler_seed must be none or a whole number"),
    ("Euler a", {"bogus_option": 1}, r"has no option bogus_option"),
]
# Each sampler option outside its domain, several values per option: (sampler, fixed keywords,
# option, bad values, the domain the message must state). Values are those the API receives.
_GE0, _GT0, _NUM = "a finite number >= 0", "a finite number > 0", "a finite number"
OPTION_DOMAINS = [
    ("Euler a", {}, "eta", [-0.5, -1e-9, "1", None, True, [1.0]], _GE0),
    ("DPM++ 2M SDE", {}, "eta", [-1, "0"], _GE0),
    ("DDIM", {}, "eta", [-0.1, "x"], _GE0),
    ("DDIMScheduler", {}, "eta", [-2, "1"], _GE0),
    ("Euler a", {}, "s_noise", ["x", None, True], _NUM),
    ("Euler", {}, "s_churn", [-1, "x", None], _GE0),
    ("Heun", {}, "s_tmin", [-0.5, "0"], _GE0),
    ("DPM2", {}, "s_tmax", [-1, "inf", float("nan"), float("-inf")], r"a number >= 0 \(inf for no bound\)"),
    ("DPM++ SDE", {}, "r", [0, -0.5, 1.5, "x"], r"a number in \(0, 1\]"),
    ("LMS", {}, "order", [0, -1, 11, 2.5, "4"], "a whole number from 1 to 10"),
    ("DPM adaptive", {}, "order", [1, 4, "3"], "one of 2, 3"),
    ("UniPC", {}, "uni_pc_order", [0, 51, 1.5], "a whole number from 1 to 50"),
    ("UniPC", {}, "uni_pc_variant", ["bh3", "", "vary_coeff", 1], "one of bh1, bh2"),
    ("DPM adaptive", {}, "rtol", [0, -1e-3, "x"], _GT0),
    ("DPM adaptive", {}, "atol", [0, -1], _GT0),
    ("DPM adaptive", {}, "h_init", [0, "0.05"], _GT0),
    ("DPM adaptive", {}, "accept_safety", [0, -0.81], _GT0),
    ("DPM adaptive", {}, "pcoeff", ["x", None], _NUM),
    ("DPM++ 2M Karras", {}, "sigma_min", [0, -1, "0.1"], _GT0),
    ("DPM++ 2M Karras", {}, "sigma_max", [0, -5, "14"], _GT0),
    ("Euler", {"schedule": "Exponential"}, "sigma_min", [0, None], _GT0),
    ("DPM++ 2M Karras", {}, "rho", [0, -1, "7"], _GT0),
    ("dpmpp_2m", {"schedule": "karras"}, "rho", [0, -7], _GT0),
    ("DPM++ 2M", {"schedule": "Beta"}, "beta_alpha", [0, -0.6, "0.6"], _GT0),
    ("DPM++ 2M", {"schedule": "Beta"}, "beta_beta", [0, -1], _GT0),
    ("dpmpp_2m", {"schedule": "beta"}, "beta_alpha", [0, None], _GT0),
    ("Euler", {}, "discard_penultimate_sigma", [1, "yes", None], "true or false"),
    ("LCM", {}, "original_inference_steps", [0, -5, 1.5], "a whole number from 1 to 100000"),
    ("EulerDiscreteScheduler", {}, "steps_offset", [-1, -5000, 1.5, "1"], "a whole number from 0 to 100000"),
    ("DPMSolverSDEScheduler", {}, "noise_sampler_seed", [1.5, True, -1, 2**64], r"none or a whole number from 0 to \d+"),
    ("EulerDiscreteScheduler", {}, "sigma_min", [0, -1], _GT0),
    ("UniPCMultistepScheduler", {}, "solver_order", [0, 11, 2.5], "a whole number from 1 to 10"),
    ("LCMScheduler", {}, "timestep_scaling", [0, -10], _GT0),
    ("DDIMScheduler", {}, "clip_sample_range", [0, -1], _GT0),
    ("EulerDiscreteScheduler", {}, "use_karras_sigmas", [2, "yes"], "true or false"),
    ("DDIMScheduler", {}, "rescale_betas_zero_snr", [1, "true"], "true or false"),
]
# Options that are each valid alone but not together, and training schedules out of their domain.
OPTION_PAIRS = [
    ("DPM++ 2M Karras", {"sigma_min": 5.0, "sigma_max": 1.0}, r"sigma_max must be greater than sigma_min, got sigma_min=5\.0"),
    ("DPM++ 2M Karras", {"sigma_min": 2.0, "sigma_max": 2.0}, r"sigma_max must be greater than sigma_min"),
    ("DPM++ 2M Karras", {"sigma_max": 0.01}, r"sigma_max must be greater than sigma_min, got sigma_min=0\.029"),
    ("Euler", {"schedule": "Exponential", "sigma_min": 20.0}, r"sigma_max must be greater than sigma_min"),
    ("EulerDiscreteScheduler", {"sigma_min": 5.0, "sigma_max": 1.0}, r"sigma_max must be greater than sigma_min"),
    ("EulerDiscreteScheduler", {"beta_start": 0.5, "beta_end": 0.1}, r"beta_start must be below beta_end"),
    ("EulerDiscreteScheduler", {"beta_start": 0.02, "beta_end": 0.02}, r"beta_start must be below beta_end"),
    ("DDIMScheduler", {"steps_offset": 600}, r"steps_offset must be from 0 to 499 for 2 steps"),
]
NAMED_OPTION_FAULTS = [  # options written into a diffusers class name (what the command line can pass)
    ("EulerDiscreteScheduler(num_train_timesteps=1)", r"num_train_timesteps must be a whole number from 2 to 100000, got 1"),
    ("EulerDiscreteScheduler(num_train_timesteps=1.5)", r"num_train_timesteps must be a whole number .* got 1\.5"),
    ("EulerDiscreteScheduler(num_train_timesteps=200000)", r"num_train_timesteps must be .* got 200000"),
    ("EulerDiscreteScheduler(beta_start=1, beta_end=0)", r"beta_start must be a number between 0 and 1 \(exclusive\), got 1"),
    ("EulerDiscreteScheduler(beta_start=0.5, beta_end=0.1)", r"beta_start must be below beta_end"),
    ("EulerDiscreteScheduler(beta_start=0)", r"beta_start must be a number between 0 and 1"),
    ("EulerDiscreteScheduler(beta_end=1.5)", r"beta_end must be a number between 0 and 1"),
    ("EulerDiscreteScheduler(beta_end=1)", r"beta_end must be a number between 0 and 1"),
    ("EulerDiscreteScheduler(trained_betas='abc')", r"trained_betas must be a list"),
    ("EulerDiscreteScheduler(trained_betas=[0.1, -0.2])", r"trained_betas must be a list"),
    ("DDIMScheduler(steps_offset=100000)", r"steps_offset must be from 0 to 499 for 2 steps"),
    ("DDIMScheduler(steps_offset=-5000)", r"steps_offset must be a whole number from 0 to 100000, got -5000"),
    ("PNDMScheduler(steps_offset=1.5)", r"steps_offset must be a whole number"),
    ("DPMSolverMultistepScheduler(steps_offset=700)", r"steps_offset must be from 0 to \d+ for 2 steps"),
    ("DPMSolverSDEScheduler(noise_sampler_seed=1.5)", r"noise_sampler_seed must be none or a whole number"),
    ("DPMSolverSDEScheduler(noise_sampler_seed=True)", r"noise_sampler_seed must be none or a whole number"),
    ("EulerDiscreteScheduler(sigma_min=5, sigma_max=1)", r"sigma_max must be greater than sigma_min"),
    ("EulerDiscreteScheduler(sigma_max=-1)", r"sigma_max must be a finite number > 0"),
    ("DPMSolverMultistepScheduler(solver_order=0)", r"solver_order must be a whole number from 1 to 10, got 0"),
    ("UniPCMultistepScheduler(solver_order=11)", r"solver_order must be a whole number from 1 to 10, got 11"),
    ("LCMScheduler(timestep_scaling=0)", r"timestep_scaling must be a finite number > 0"),
    ("LCMScheduler(original_inference_steps=0)", r"original_inference_steps must be a whole number from 1"),
    ("EulerDiscreteScheduler(use_karras_sigmas=2)", r"use_karras_sigmas must be true or false, got 2"),
    ("DDIMScheduler(clip_sample_range=0)", r"clip_sample_range must be a finite number > 0"),
]
SAMPLER_FAULTS += [(name, {}, pat) for name, pat in NAMED_OPTION_FAULTS]
API_SAMPLER_FAULTS += [
    (name, {**fixed, option: v}, rf"{option} must be {accepted}, got ")
    for name, fixed, option, values, accepted in OPTION_DOMAINS for v in values
] + OPTION_PAIRS
PROMPTS = [
    ("a\ud800b", r"prompt is not valid text: '\\ud800' at position 1"),
    ("(a:1000)", r"prompt: 'a' has weight 1e\+03 .* from -100 to 100"),
    ("(a:1" + "0" * 44 + ")", r"prompt: 'a' has weight 1e\+44"),
    ("(a:-101)", r"weight -101"),
    ("(" * 1000 + "a", r"prompt: 'a' has weight 2\.47e\+41"),
    ("(" * 60 + "a" + ")" * 60, r"weight 30[0-9]"),
    ("a red circle, (" + "(" * 200 + "star:1.0" + ")" * 200 + ")", r"'star' has weight"),
]


def _cli_number_cases() -> list[Case]:
    out = []
    for opt, _kw, modes, needle, bad_cli, _bad_api in NUMBER_OPTIONS:
        for mode in modes:
            for v in bad_cli:
                args = _mode_args(mode) + [opt, v]
                # typer refuses what is not a number (2); sdrt refuses what is one but out of range (1).
                code = 1 if _is_number(v, integer=opt not in ("--strength", "--cfg")) else 2
                pat = re.escape(opt) if code == 2 else needle.replace("_", "[_ ]")
                out.append(Case(f"cli-{mode}-{opt.strip('-')}={v!r}", "cli", _fixed(args), code, pat))
    for opt, _kw, modes, needle, bad_cli, _bad_api in CHOICE_OPTIONS:
        for mode in modes:
            for v in bad_cli:
                pat = "provider" if opt == "--provider" else "schedule|sampler" if opt == "--schedule" else \
                    "sampler|scheduler" if opt == "--sampler" else needle
                out.append(Case(f"cli-{mode}-{opt.strip('-')}={v!r}", "cli", _fixed(_mode_args(mode) + [opt, v]), 1, pat))
    return out


def _is_number(v: str, integer: bool) -> bool:
    """Whether typer reads v as a number (then sdrt itself must refuse it)."""
    if integer:
        return re.fullmatch(r"-?\d+", v) is not None
    try:
        float(v)
    except ValueError:
        return False
    return True


def _short(text: str) -> str:
    return repr(text) if len(text) <= 24 else f"{text[:12]!r}...{len(text)}chars"


def _mode_args(mode: str) -> list[str]:
    if mode == "txt2img":
        return ["txt2img", "-p", "a red circle", "-m", "{sd1}", *GEN, "-W", "32", "-H", "32"]
    if mode == "inpaint":
        return ["inpaint", "{d}/a.png", "--mask", "{d}/mask.png", "-p", "a hat", "-m", "{inp}", *GEN]
    return ["img2img", "{d}/a.png", "-p", "a red circle", "-m", "{sd1}", *GEN]


def _fixed(args: list[str]):
    return lambda d, m: [str(a).format(d=d, sd1=m["sd1"], inp=m["inp"]) for a in args]


def _cli_file_cases() -> list[Case]:
    files = {
        "missing.png": r"file not found: .*missing\.png", "empty.png": r"empty\.png is an empty file",
        "garbage.png": r"garbage\.png is not an image Pillow can read", "truncated.png": r"truncated\.png could not be decoded",
        "folder.png": r"folder .*folder\.png holds no images", "fifo.png": r"fifo\.png is not a regular file",
        "loop.png": r"cannot read .*loop\.png", "huge-6000.png": r"6000x6000 request with batch_size 64 .* GiB of memory",
        "huge-9000.png": r"huge-9000\.png is 9000x9000 pixels \(81 Mpx\); sdrt reads images of up to 67 Mpx",
        "huge-9500.png": r"huge-9500\.png is 9500x9500 pixels", "huge-100000.png": r"huge-100000\.png is over 179 Mpx",
        "wide-20000.png": r"the image is 20000x1000, .* up to 8192 pixels a side", "notes.txt": r"notes\.txt is not an image",
        "afile/x.png": r"cannot read .*afile/x\.png: Not a directory", "noimages": r"folder .*noimages holds no images",
        "mixed": r"broken\.png", "\udcff.png": r"file not found",
    }
    mask_needle = {"wide-20000.png": r"mask is 20000x1000 but the image is 32x32",
                   "folder.png": r"mask folder .*folder\.png holds no images"}
    out = []
    for name, pat in files.items():
        # 6000x6000 with a batch of 64: more memory than any machine has, refused before decoding
        # (the file's pixel data is a stub: decoding it first would fail with another message).
        batch = ["-b", "64"] if name == "huge-6000.png" else []
        out.append(Case(f"cli-img2img-image={name}", "cli",
                        _fixed(["img2img", f"{{d}}/{name}", "-p", "x", "-m", "{sd1}", *GEN, *batch]), 1, pat))
        if name in ("noimages", "mixed", "huge-6000.png"):
            continue
        out.append(Case(f"cli-inpaint-mask={name}", "cli",
                        _fixed(["inpaint", "{d}/a.png", "--mask", f"{{d}}/{name}", "-p", "x", "-m", "{inp}", *GEN]), 1,
                        mask_needle.get(name, "mask: .*" + pat)))
        out.append(Case(f"cli-inpaint-image={name}", "cli",
                        _fixed(["inpaint", f"{{d}}/{name}", "--mask", "{d}/mask.png", "-p", "x", "-m", "{inp}", *GEN]), 1,
                        pat))
    out.append(Case("cli-inpaint-mask-aspect", "cli",
                    _fixed(["inpaint", "{d}/a.png", "--mask", "{d}/wide-mask.png", "-p", "x", "-m", "{inp}", *GEN]), 1,
                    r"mask is 32x16 but the image is 32x32"))
    pngs = {
        "p-size.png": r"width must be a whole number of pixels from 0 to 8192 .* got 100000",
        "p-steps.png": r"infotext: Steps must be a whole number, got 'abc'",
        "p-steps-big.png": r"infotext: Steps must be a whole number, got '1e400'",
        "p-seed.png": r"seed must be", "p-cfg.png": r"guidance .* got nan", "p-strength.png": r"strength .* got 5",
        "p-sampler.png": r"unknown sampler 'Eulr b'", "p-sizeform.png": r"Size must be WIDTHxHEIGHT",
        "noparams.png": r"holds no generation parameters", "missing.png": r"--from-png: file not found",
        "garbage.png": r"--from-png: cannot read", "folder.png": r"is not a file",
    }
    for name, pat in pngs.items():
        for mode in ("img2img", "txt2img") if name != "p-strength.png" else ("img2img",):
            args = (["img2img", "{d}/a.png"] if mode == "img2img" else ["txt2img"]) + \
                ["--from-png", f"{{d}}/{name}", "-m", "{sd1}", "--provider", "cpu"]
            out.append(Case(f"cli-{mode}-from-png={name}", "cli", _fixed(args), 1, pat))
    return out


def _cli_model_cases() -> list[Case]:
    out = []
    for name in MODEL_DAMAGE:
        pat = MODEL_NEEDLE[name]
        if name.startswith("inp-"):
            run = ["inpaint", "{d}/a.png", "--mask", "{d}/mask.png", "-p", "x", "-m", f"{{d}}/models/{name}", *GEN]
        else:
            run = ["img2img", "{d}/a.png", "-p", "x", "-m", f"{{d}}/models/{name}", *GEN]
        out.append(Case(f"cli-img2img-model={name}", "cli", _fixed(run), 1, pat))
        out.append(Case(f"cli-info-model={name}", "cli", _fixed(["info", f"{{d}}/models/{name}"]), 1, pat))
    for name, pat in (("not-a-model", r"not a model folder"), ("missing", r"does not exist")):
        out.append(Case(f"cli-img2img-model={name}", "cli", _fixed(["img2img", "{d}/a.png", "-p", "x", "-m",
                                                                    f"{{d}}/models/{name}", *GEN]), 1, pat))
        out.append(Case(f"cli-info-model={name}", "cli", _fixed(["info", f"{{d}}/models/{name}"]), 1, pat))
    out.append(Case("cli-img2img-model=a-file", "cli", _fixed(["img2img", "{d}/a.png", "-p", "x", "-m", "{d}/afile", *GEN]),
                    1, r"is not a folder"))
    out.append(Case("cli-info-verify=bogus", "cli", _fixed(["info", "{sd1}", "--verify", "bogus"]), 1,
                    r"verify must be one of auto, full, size, none"))
    return out


def _cli_other_cases() -> list[Case]:
    out = []
    for name, extra, pat in SAMPLER_FAULTS:
        for mode in ("img2img", "txt2img"):
            out.append(Case(f"cli-{mode}-sampler={name}", "cli", _fixed(_mode_args(mode) + ["--sampler", name]), 1, pat))
    for prompt, pat in PROMPTS:
        if "\ud800" in prompt:
            continue  # a command line's arguments are bytes: see the undecodable-bytes case below
        for mode in ("img2img", "txt2img"):
            args = _mode_args(mode)
            args[args.index("-p") + 1] = prompt
            out.append(Case(f"cli-{mode}-prompt={_short(prompt)}", "cli", _fixed(args), 1, pat))
    # Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape).
    out.append(Case("cli-txt2img-prompt=undecodable", "cli",
                    _fixed(["txt2img", "-p", "a\udcffb", "-m", "{sd1}", *GEN, "-W", "32", "-H", "32"]), 1,
                    r"prompt is not valid text: '\\udcff' at position 1"))
    outs = {
        "taken.png": r"taken\.png already exists", "afile/out.png": r"afile is a file, not a folder",
        "afile/deeper/out": r"afile is a file, not a folder", "afile": r"afile is a file, not a folder",
        "x.jpg": r"sdrt writes PNG files", "notes.txt/o.png": r"notes\.txt is a file",
    }
    for target, pat in outs.items():
        out.append(Case(f"cli-img2img-out={target}", "cli",
                        _fixed(["img2img", "{d}/a.png", "-p", "x", "-m", "{sd1}", *GEN, "-o", f"{{d}}/{target}"]), 1, pat))
    out.append(Case("cli-img2img-one-file-two-images", "cli",
                    _fixed(["img2img", "{d}/a.png", "-b", "2", "-p", "x", "-m", "{sd1}", *GEN, "-o", "{d}/one.png"]), 1,
                    r"names one file, but this run makes 2 images"))
    out.append(Case("cli-img2img-collide", "cli",
                    _fixed(["img2img", "{d}/a.png", "{d}/mixed/a.png", "-p", "x", "-m", "{sd1}", *GEN]), 1, r"would both write"))
    out.append(Case("cli-img2img-long-name", "cli",
                    _fixed(["img2img", "{d}/a.png", "-p", "x", "-m", "{sd1}", *GEN, "-o", "{d}/" + "n" * 230 + ".png"]), 1,
                    r"is 234 bytes long"))
    for args, code, pat in (
        (["bench", "--threads", "500"], 1, r"threads must be a whole number from 1 to \d+"),
        (["bench", "--threads", "-1"], 1, r"threads must be"),
        (["bench", "--threads", "0"], 1, r"threads must be"),
        (["bench", "--threads", "abc"], 2, r"--threads"),
        (["bench", "--mode", "paint", "-m", "{sd1}", "--provider", "cpu"], 1, r"--mode must be img2img, inpaint or txt2img"),
        *[(["bench", "--mode", m, "-m", "{sd1}", "--provider", "cpu"], 1, r"--mode must be img2img, inpaint or txt2img")
          for m in ("nope", "IMG2IMG", "", "txt2img ", "img2img,inpaint")],
        *[(["bench", "-m", "{sd1}", "--provider", "cpu", "--size", "32", opt, v], 1, pat) for opt, v, pat in (
            ("--steps", "0", r"steps must be from 1"), ("--steps", "100000", r"steps must be from 1 to 10000"),
            ("--strength", "2", r"strength must be from 0\.0 to 1\.0"), ("--strength", "nan", r"strength must be"),
            ("--cfg", "-1", r"guidance must be from 0\.0"), ("--cfg", "inf", r"guidance must be"),
            ("--batch-size", "0", r"batch_size must be"), ("--batch-size", "65", r"batch_size must be"),
            ("--sampler", "nope", r"unknown sampler 'nope'"),
            ("--sampler", "DDIMScheduler(steps_offset=-1)", r"steps_offset must be a whole number from 0"),
            ("--sampler", "EulerDiscreteScheduler(beta_end=2)", r"beta_end must be a number between 0 and 1"),
        )],
        (["bench", "-m", "{sd1}", "--provider", "nope"], 1, r"provider 'nope' is not known"),
        *[(["bench", "--size", v], 2, r"--size") for v in ("100000", "7", "0", "-8", "abc")],
        *[(["bench", "--repeats", v], 2, r"--repeats") for v in ("0", "-1", "x")],
        (["img2img", "{d}/a.png"], 2, r"--prompt"),
        (["inpaint", "{d}/a.png", "-p", "x"], 2, r"--mask"),
        (["img2img", "{d}/a.png", "-p", "x", "--bogus"], 2, r"--bogus"),
        (["frobnicate"], 2, r"frobnicate"),
        (["img2img"], 2, r"IMAGE"),
    ):
        out.append(Case(f"cli-{' '.join(args).replace('{d}/', '')}", "cli", _fixed(args), code, pat))
    return out


# --------------------------------------------------------------------------- API cases


def _api_call(mode: str, **kw):
    def run(d, m, pipes):
        p = pipes["inp" if mode == "inpaint" else "sd1"]
        if mode == "txt2img":
            return p.txt2img(kw.pop("prompt", "a red circle"), **{"width": 32, "height": 32, "steps": 2, **kw})
        if mode == "inpaint":
            return p.inpaint(kw.pop("image", d / "a.png"), kw.pop("mask", d / "mask.png"), kw.pop("prompt", "a hat"),
                             **{"steps": 2, **kw})
        return p.img2img(kw.pop("image", d / "a.png"), kw.pop("prompt", "a red circle"), **{"steps": 2, **kw})

    return lambda d, m, pipes: run(d, m, pipes)


def _api_cases() -> list[Case]:
    out = []
    for _opt, kw, modes, needle, _bad_cli, bad_api in NUMBER_OPTIONS + CHOICE_OPTIONS:
        if bad_api is None:
            continue
        for mode in modes:
            for v in bad_api:
                if kw == "width" and mode == "txt2img" and v is None:
                    continue
                out.append(Case(f"api-{mode}-{kw}={v!r}", "api", _api_call(mode, **{kw: v}), InputError,
                                "sampler|scheduler|schedule" if kw in ("sampler", "schedule") else needle))
    for name, opts, pat in SAMPLER_FAULTS + API_SAMPLER_FAULTS:
        for mode in ("img2img", "txt2img"):
            shown = {k: (v if not isinstance(v, np.ndarray) else f"array{v.shape}") for k, v in opts.items()}
            out.append(Case(f"api-{mode}-sampler={name}{shown}", "api", _api_call(mode, sampler=name, **opts), InputError, pat))
    for prompt, pat in PROMPTS:
        for mode in ("img2img", "txt2img", "inpaint"):
            out.append(Case(f"api-{mode}-prompt={_short(prompt)}", "api", _api_call(mode, prompt=prompt), InputError, pat))
            out.append(Case(f"api-{mode}-negative={_short(prompt)}", "api", _api_call(mode, negative_prompt=prompt),
                            InputError, pat.replace("prompt", "negative_prompt", 1) if pat.startswith("prompt") else pat))
    for v in (None, 5, b"x", ["a"]):
        out.append(Case(f"api-img2img-prompt-type={v!r}", "api", _api_call("img2img", prompt=v), InputError, r"prompt must be a string"))
    noises = {
        "nan": np.full((1, 4, 16, 16), np.nan), "inf": np.full((1, 4, 16, 16), np.inf), "huge": np.full((1, 4, 16, 16), 1e30),
        "shape": np.zeros((1, 4, 8, 8)), "batch": np.zeros((2, 4, 16, 16)),
    }
    for name, arr in noises.items():
        for mode in ("img2img", "txt2img"):
            out.append(Case(f"api-{mode}-noise={name}", "api", _api_call(mode, noise=arr), InputError, r"^noise"))
    images = {
        "list": [1, 2], "float-array": np.zeros((32, 32, 3), np.float32), "4d-array": np.zeros((1, 32, 32, 3), np.uint8),
        "2-channel": np.zeros((32, 32, 2), np.uint8), "empty-array": np.zeros((0, 32, 3), np.uint8),
        "huge-array": np.broadcast_to(np.zeros(1, np.uint8), (9000, 9000, 3)), "empty-bytes": b"",
        "garbage-bytes": b"not an image" * 10, "huge-bytes": png_header(100000, 100000), "number": 3,
        "wide-bytes": png_header(20000, 1000),
    }
    for name, src in images.items():
        out.append(Case(f"api-img2img-image={name}", "api", _api_call("img2img", image=src), InputError, r"^image|the image is"))
        out.append(Case(f"api-inpaint-mask={name}", "api", _api_call("inpaint", mask=src), InputError, r"^mask|the image is"))
    for kw, v, pat in (
        ("strength", 0.5, r"txt2img has no option 'strength' \(it is an option of img2img and inpaint\)"),
        ("image", "a.png", r"txt2img has no option 'image'"),
        ("mask_blur", 4, r"txt2img has no option 'mask_blur' \(it is an option of inpaint\)"),
        ("fill", "fill", r"txt2img has no option 'fill'"),
    ):
        out.append(Case(f"api-txt2img-{kw}", "api", _api_call("txt2img", **{kw: v}), InputError, pat))
    out.append(Case("api-img2img-mask_blur", "api", _api_call("img2img", mask_blur=4), InputError,
                    r"img2img has no option 'mask_blur' \(it is an option of inpaint\)"))
    out.append(Case("api-img2img-output", "api", _api_call("img2img", output="jpeg"), InputError, r"output must be one of"))
    # load()
    from sdrt.runtime import load

    for kw, v, exc, pat in (
        ("threads", 10**6, InputError, r"threads must be a whole number from 1 to \d+"),
        ("threads", -1, InputError, r"threads must be"), ("threads", 0, InputError, r"threads must be"),
        ("threads", 1.5, InputError, r"threads must be"), ("threads", "2", InputError, r"threads must be"),
        ("provider", "tpu", ProviderError, r"provider 'tpu' is not known; accepted: auto, cpu, cuda"),
        ("verify", "bogus", ValueError, r"verify must be one of auto, full, size, none"),
        ("cuda_graphs", -1, InputError, r"cuda_graphs must be"),
    ):
        out.append(Case(f"api-load-{kw}={v!r}", "api", (lambda kw, v: lambda d, m, pipes: load(m["sd1"], **{"provider": "cpu", kw: v}))(kw, v), exc, pat))
    for name in MODEL_DAMAGE:
        pat = MODEL_NEEDLE[name]
        exc = ModelFolderError

        def run(d, m, pipes, name=name):
            p = load(d / "models" / name, provider="cpu")
            if name.startswith("inp-"):
                return p.inpaint(d / "a.png", d / "mask.png", "x", steps=2)
            return p.img2img(d / "a.png", "x", steps=2)

        out.append(Case(f"api-load-model={name}", "api", run, exc, pat))
    for path, pat in (("models/not-a-model", r"not a model folder"), ("models/missing", r"does not exist"),
                      ("afile", r"not a folder"), ("\x00bad", r"not a usable path|does not exist|cannot be read")):
        out.append(Case(f"api-load-path={path!r}", "api", (lambda path: lambda d, m, pipes: load(d / path, provider="cpu"))(path),
                        ModelFolderError, pat))
    return out


CASES = _cli_number_cases() + _cli_file_cases() + _cli_model_cases() + _cli_other_cases() + _api_cases()


def test_the_table_is_large_and_covers_every_kind():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1][:5]
    assert len(CASES) >= 600
    kinds = {c.id.split("=")[0].rsplit("-", 1)[-1] for c in CASES}
    for kind in ("steps", "strength", "width", "image", "mask", "model", "sampler", "prompt", "noise", "out", "threads"):
        assert any(kind in k for k in kinds), kind


# --------------------------------------------------------------------------- running a case


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root with its inode, size, mtime and ctime: a write of any kind
    changes the ctime, which no program can set back, so equal stamps mean untouched content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            st = (Path(dirpath) / n).lstat()
            out[os.path.join(dirpath, n)] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, sd1, inp):
    d = _workdir(tmp_path_factory.mktemp("bad-inputs"), sd1, inp)
    from sdrt.runtime import load

    pipes = {"sd1": load(sd1, provider="cpu"), "inp": load(inp, provider="cpu")}
    models = {"sd1": sd1, "inp": inp}
    return d, models, pipes, {**snapshot(d), **snapshot(sd1), **snapshot(inp)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, monkeypatch):
    d, models, pipes, before = world
    monkeypatch.chdir(d)  # outputs without -o would land here
    if case.via == "cli":
        args = case.run(d, models)
        if args[0] in ("img2img", "inpaint", "txt2img") and "-o" not in args:
            args += ["-o", str(d / "out")]
        r = CliRunner().invoke(app, args, env=ENV)
        err = ANSI.sub("", r.stderr)
        assert r.exit_code == case.expect, (r.exit_code, err, r.stdout)
        assert err.startswith("sdrt: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in r.output and "internal error" not in err, err
        assert re.search(case.needle, err), (case.needle, err)
        assert r.stdout == ""
        message = err
    else:
        with pytest.raises(Exception) as info:
            case.run(d, models, pipes)
        e = info.value
        assert isinstance(e, case.expect), (type(e), e)
        message = str(e)
        assert "\n" not in message and message.strip(), message
        assert re.search(case.needle, message), (case.needle, message)
    after = {**snapshot(d), **snapshot(models["sd1"]), **snapshot(models["inp"])}
    created = sorted(set(after) - set(before))
    assert not created, f"left behind: {created}"
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"changed or removed: {changed}"
