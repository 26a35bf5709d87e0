"""The `sdrt` command line (typer). A thin layer over sdrt.runtime and sdrt.export.

Heavy modules (onnxruntime, PIL, NumPy, the pipeline, torch for export) are imported inside
the commands that need them, so `sdrt --help` and argument errors answer at once.

img2img, inpaint and txt2img run in two passes: every input is first checked by the pipeline
itself (dry_run=True: files, sizes, sampler, numbers) and every output name is checked for
collisions, and only then does a model run, so a refused run writes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException as _UsageProblem
except ImportError:  # pragma: no cover - typer on click itself
    from click.exceptions import ClickException as _UsageProblem


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad number, an unknown option, a missing argument) as one line on stderr,
    exit status 2, like every other error of sdrt (click would print a usage panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except _UsageProblem as e:
            if not standalone_mode:
                raise
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "sdrt"
            message = " ".join(e.format_message().split())
            typer.echo(f"sdrt: error: {message} (see `{where} --help`)", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("sdrt: error: interrupted", err=True)
            sys.exit(130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_OneLineErrors,
    name="sdrt",
    help="Fast Stable Diffusion img2img and inpainting on ONNX Runtime.",
    epilog="Run `sdrt COMMAND --help` for a command's options. Exit status: 0 ok, 1 failure, 2 usage error, 130 interrupted, 143 terminated (SIGTERM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

# Files a folder argument contributes (sorted by name); other files in it are ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# The pipeline's defaults, for the help text only: options left out are not passed, so the
# API's own defaults apply (tests/test_cli.py checks that these match Pipeline's signatures).
DEFAULTS = {
    "steps": 20,
    "guidance": 7.5,
    "sampler": "Euler a",
    "strength": 0.75,
    "batch_size": 1,
    "resize_mode": "just_resize",
    "clip_skip": 1,
    "mask_blur": None,  # 4 (A1111's) for A1111 and ComfyUI names, 0 for diffusers names
    "fill": "original",
    "padding": 32,
    "txt2img_size": None,  # the model's default size: 1024 for SDXL models (from their config), 512 otherwise
}


def fail(message: str, code: int = 1) -> None:
    """Print one clear line on stderr and exit (no traceback unless --debug)."""
    typer.echo(f"sdrt: error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM, handled like Ctrl-C: what is being written is removed, exit status 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _message(e: BaseException) -> tuple[str, int]:
    """The one line and exit status for an exception."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)", 143
    if isinstance(e, MemoryError):
        return "out of memory (MemoryError); use a smaller size or batch", 1
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e):
        return f"{e.filename}: {e.strerror or e}", 1
    if isinstance(e, OSError) and e.strerror:
        return e.strerror, 1
    if isinstance(e, (ValueError, RuntimeError, OSError)):
        return str(e) or e.__class__.__name__, 1
    return f"internal error: {e.__class__.__name__}: {e} (run `sdrt --debug ...` for the traceback and report it)", 1


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _run_guarded(fn, *args, **kwargs):
    """Run a command: the errors sdrt raises become one line on stderr and exit status 1 (130 on
    Ctrl-C, 143 on SIGTERM), with no traceback unless --debug; Python warnings (e.g. Pillow's
    about damaged EXIF data in an input) are not shown unless --debug."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        if _state["debug"]:
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except (Exception, KeyboardInterrupt, Terminated) as e:
                message, code = _message(e)
                fail(message, code)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


@app.command()
def export(
    src: Path = typer.Argument(..., help="A single-file SD 1.x/2.x/SDXL checkpoint (.safetensors, or .ckpt/.pt read with PyTorch's weights-only loader), a diffusers-format Stable Diffusion folder (model_index.json, unet/, vae/, ...), or an sdrt fp32 cpu-target folder to quantize with --precision int8."),
    out: Path = typer.Argument(..., help="The model folder to write (must not exist unless --overwrite)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32; int8 (cpu target: the UNet's convolutions, calibrated on fixed prompts, and matrix products in int8); or fp16 (with --target cuda)."),
    target: str = typer.Option("cpu", "--target", help="cpu (fused for the CPU provider) or cuda (fused for the CUDA provider)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 14 to 20."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (atomically, at the end)."),
    fp32_ops: Optional[str] = typer.Option(None, "--fp32-ops", help="Comma-separated op types kept fp32 in every fp16 graph, or 'none'. Default: the family's (MultiHeadAttention in SD 2.x UNets)."),
    fp32_vae_decoder: bool = typer.Option(False, "--fp32-vae-decoder", help="With fp16: also write an fp32 VAE decoder, used for an image whose fp16 decoding overflows (NaN/Inf)."),
    skip_memory_check: bool = typer.Option(False, "--skip-memory-check", help="Start even when the available memory is clearly below the export's estimated need."),
    prediction_type: Optional[str] = typer.Option(None, "--prediction-type", help="epsilon or v_prediction: for an SD 2.x checkpoint whose file cannot tell (default: decided as A1111 does), or to override."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Replace the model's VAE: an A1111-style VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers VAE folder; recorded with its hash for the infotext."),
) -> None:
    """Export a Stable Diffusion checkpoint to an sdrt model folder (needs the export extra: torch, diffusers)."""

    def go():
        try:
            from sdrt.export import export_model
        except ImportError as e:
            fail(f"export needs the export extra (pip install 'sdrt[export]'): {e}")
        ops = None if fp32_ops is None else tuple(o.strip() for o in fp32_ops.split(",") if o.strip() and o.strip() != "none")
        export_model(src, out, precision=precision, target=target, opset=opset, overwrite=overwrite, fp32_ops=ops,
                     fp32_vae_decoder=fp32_vae_decoder, memory_check=not skip_memory_check,
                     prediction_type=prediction_type, vae=vae)

    _run_guarded(go)


@app.command()
def info(
    model: Path = typer.Argument(..., help="A model folder."),
    verify: str = typer.Option("auto", "--verify", help="File check: auto (hash the files new or changed since their last check), full (hash every file), size, none."),
) -> None:
    """Describe a model folder: family, channels, precision, target, sizes, the providers and CPU features
    available here, and how its int8 graphs run on this CPU. Exits 1 on a folder img2img would refuse (damaged
    file, inconsistent manifest, unreadable tokenizer, no provider here that runs it)."""

    def go():
        import onnxruntime as ort

        from sdrt.runtime.cpu import cpu_features, int8_status, int8_weight_max
        from sdrt.runtime.modelfolder import read_model_folder
        from sdrt.runtime.sessions import onnxruntime_distributions, resolve_provider
        from sdrt.runtime.text import ClipTokenizer

        i = read_model_folder(model, verify=verify)
        ClipTokenizer.from_folder(i.path / "tokenizer")
        provider = resolve_provider("auto", i)
        cpu = cpu_features()
        size = sum(p.stat().st_size for p in i.path.rglob("*") if p.is_file())
        rows = [
            ("model", str(i.path)),
            ("family", i.family),
            ("infotext Model", f"{i.model_name} (Model hash {i.short_hash or 'none'})"),
            *([("infotext VAE", f"{i.vae.get('name')} (VAE hash {i.vae.get('short_hash')})")] if i.vae else []),
            ("prediction type", i.prediction_type),
            ("UNet input channels", f"{i.unet_in_channels}{' (inpainting model)' if i.is_inpainting_model else ''}"),
            ("latent channels", str(i.latent_channels)),
            ("VAE scale factor", f"{i.vae_scale_factor} (native size {i.native_size}x{i.native_size})"),
            ("default size", f"{i.default_size}x{i.default_size} (txt2img)"),
            ("text encoders", ", ".join(i.text_encoders)),
            ("target", i.target),
            ("precision", ", ".join(f"{k} {v}" for k, v in i.precision.items())),
            ("files", f"{size / 2**20:.1f} MiB" + ("" if i.manifest else " (no sdrt.json: not checked)")),
            ("providers here", f"{', '.join(ort.get_available_providers())} (runs on {provider})"),
            ("onnxruntime", " + ".join(onnxruntime_distributions()) or f"{ort.__version__} (no distribution metadata)"),
            ("CPU here", cpu.describe()),
        ]
        weight_max = int8_weight_max(i.manifest)
        if weight_max is not None:
            rows.append(("int8 here", int8_status(weight_max, cpu)[1]))
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            typer.echo(f"{k:<{w}}  {v}")

    _run_guarded(go)


# ------------------------------------------------------------------------ generation options
_GEN = "Generation"
_OUT = "Output"
_INP = "Inpainting"
_d = DEFAULTS

Prompt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="What to make (A1111 prompt syntax: (emphasis:1.2), BREAK). Required unless --from-png gives one.", rich_help_panel=_GEN, show_default=False)]
Negative = Annotated[Optional[str], typer.Option("--negative", "-n", help="Negative prompt.", rich_help_panel=_GEN, show_default=False)]
Model = Annotated[Optional[Path], typer.Option("--model", "-m", help="Model folder (from `sdrt export`, or optimum's). Default: the embedded default model.", rich_help_panel=_GEN, show_default=False)]
Strength = Annotated[Optional[float], typer.Option("--strength", "-s", help=f"Denoising strength, 0 (keep the input) to 1 (ignore it). (default: {_d['strength']})", rich_help_panel=_GEN, show_default=False)]
Steps = Annotated[Optional[int], typer.Option("--steps", help=f"Sampling steps (img2img runs fewer, by the sampler's rule). (default: {_d['steps']})", rich_help_panel=_GEN, show_default=False)]
Cfg = Annotated[Optional[float], typer.Option("--cfg", "--guidance", help=f"CFG scale (classifier-free guidance). (default: {_d['guidance']})", rich_help_panel=_GEN, show_default=False)]
Sampler = Annotated[Optional[str], typer.Option("--sampler", help=f"Sampler, by its A1111, ComfyUI or diffusers name; see `sdrt samplers`. (default: {_d['sampler']})", rich_help_panel=_GEN, show_default=False)]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="Sigma schedule (Karras, Exponential, karras, ...); default: the sampler's own. See `sdrt samplers`.", rich_help_panel=_GEN, show_default=False)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed of the first image; image i of a batch uses seed+i, every input the same seeds. Default (or -1): random.", rich_help_panel=_GEN, show_default=False)]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", help=f"Images per input, with seeds seed, seed+1, ... (default: {_d['batch_size']})", rich_help_panel=_GEN, show_default=False)]
Width = Annotated[Optional[int], typer.Option("--width", "-W", help="Width to work at (rounded to the model's multiple; 0 keeps the aspect ratio). Default: the input's.", rich_help_panel=_GEN, show_default=False)]
Height = Annotated[Optional[int], typer.Option("--height", "-H", help="Height to work at (as --width). Default: the input's.", rich_help_panel=_GEN, show_default=False)]
ResizeMode = Annotated[Optional[str], typer.Option("--resize-mode", help=f"just_resize, crop_and_resize, resize_and_fill or latent_upscale (img2img only), as A1111. (default: {_d['resize_mode']})", rich_help_panel=_GEN, show_default=False)]
ClipSkip = Annotated[Optional[int], typer.Option("--clip-skip", help=f"Use the text encoder's n-th layer from the end (A1111's Clip skip). (default: {_d['clip_skip']})", rich_help_panel=_GEN, show_default=False)]
FromPng = Annotated[Optional[Path], typer.Option("--from-png", help="Take prompt, negative prompt, steps, sampler, schedule, CFG, seed, size, strength and clip skip from the parameters of a PNG written by sdrt or A1111; options given here override them.", rich_help_panel=_GEN, show_default=False)]
LoraDir = Annotated[Optional[Path], typer.Option("--lora-dir", help="Folder of the LoRAs named in the prompt as <lora:NAME:WEIGHT> (A1111's syntax; <lora:NAME:TE_WEIGHT:UNET_WEIGHT> weighs the text encoder and UNet apart). Default: SDRT_LORA_DIR, else Lora/ beside the model folder.", rich_help_panel=_GEN, show_default=False)]
EmbeddingsDir = Annotated[Optional[Path], typer.Option("--embeddings-dir", help="Folder of textual-inversion embeddings (A1111's .safetensors), used by writing a file's name in a prompt. Default: SDRT_EMBEDDINGS_DIR, else embeddings/ beside the model folder.", rich_help_panel=_GEN, show_default=False)]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (created if missing), or a .png file name when the run makes one image. Files are named <input stem>-<seed>.png. Default: the current folder.", rich_help_panel=_OUT, show_default=False)]
Provider = Annotated[str, typer.Option("--provider", help="Execution provider: auto (CUDA when usable), cpu or cuda.", rich_help_panel=_OUT)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files (otherwise an existing file stops the run before anything runs).", rich_help_panel=_OUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no list of written files.", rich_help_panel=_OUT)]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document with a record per image (input, output file, seed, parameters, timings).", rich_help_panel=_OUT)]


def _expand(paths: List[Path], what: str) -> list[Path]:
    """Files as given; folders as the image files in them, sorted by name."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                fail(f"{what} folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    return out


def _masks_for(images: list[Path], mask: Path) -> list[Path]:
    """One mask file for every image, or, from a folder, the mask with the image's file stem."""
    if not mask.is_dir():
        return [mask] * len(images)
    by_stem: dict[str, list[Path]] = {}
    for f in _expand([mask], "mask"):
        by_stem.setdefault(f.stem, []).append(f)
    out = []
    for img in images:
        found = by_stem.get(img.stem, [])
        if not found:
            fail(f"no mask for image {img} in {mask} (masks are matched by file stem: expected {img.stem}.png or another image type)")
        if len(found) > 1:
            fail(f"more than one mask for image {img} in {mask}: {', '.join(f.name for f in found)}")
        out.append(found[0])
    return out


def _load_pipeline(model: Optional[Path], provider: str, lora_dir: Optional[Path] = None,
                   embeddings_dir: Optional[Path] = None):
    from sdrt.runtime import load

    if model is None:
        from sdrt.models import default_model_path

        try:
            model = default_model_path()
        except FileNotFoundError:
            fail("no --model given and the embedded default model is not installed; pass --model DIR, "
                 "or export a model folder with `sdrt export SRC OUT` (see `sdrt export --help`)")
    return load(model, provider=provider, lora_dir=lora_dir, embeddings_dir=embeddings_dir)


def _check_out_folder(folder: Path, what: str) -> None:
    """The folder the images go to: an existing folder, or one that can be created (its nearest
    existing ancestor is a folder this process may write in)."""
    for anc in [folder, *folder.parents]:
        try:
            exists = anc.exists()
        except (OSError, ValueError) as e:
            fail(f"{what}: {anc} cannot be used ({e})")
        if not exists:
            continue
        if not anc.is_dir():
            fail(f"{what}: {anc} is a file, not a folder" + ("" if anc == folder else f", so {folder} cannot be created"))
        if not os.access(anc, os.W_OK | os.X_OK):
            fail(f"{what}: cannot write in {anc} (permission denied)")
        return


def _out_paths(out: Optional[Path], jobs: list, overwrite: bool) -> tuple[list[list[Path]], Optional[Path]]:
    """The file of every image, checked for collisions before anything runs: (paths per job, folder to create)."""
    n = sum(len(seeds) for _, _, seeds in jobs)
    if out is not None and not out.is_dir() and out.suffix.lower() in IMAGE_SUFFIXES:
        if out.suffix.lower() != ".png":
            fail(f"--out {out}: sdrt writes PNG files (with their parameters text); name the file .png, or give a folder")
        if n != 1:
            fail(f"--out {out} names one file, but this run makes {n} images; give a folder instead")
        paths = [[out]]
        folder = out.parent
        _check_out_folder(folder, f"--out {out}")
    else:
        folder = out if out is not None else Path(".")
        _check_out_folder(folder, f"--out {folder}")
        paths = [[folder / f"{img.stem if img is not None else 'txt2img'}-{s}.png" for s in seeds] for img, _, seeds in jobs]
    seen: dict[Path, Any] = {}
    for (img, _, _), ps in zip(jobs, paths):
        for p in ps:
            if len(os.fsencode(p.name)) > 200:  # with save_png's temporary name it must stay under 255 bytes
                fail(f"output file name {p.name[:40]}... is {len(os.fsencode(p.name))} bytes long; file systems take "
                     "255 at most: rename the input or give --out FILE.png")
            if p in seen:
                fail(f"{seen[p]} and {img} would both write {p}; give them different names or run them separately")
            seen[p] = img
    if not overwrite:
        taken = [p for ps in paths for p in ps if p.exists() or p.is_symlink()]
        if taken:
            more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            fail(f"{taken[0]} already exists{more}; pass --overwrite to replace it, or choose another --out or --seed")
    return paths, (folder if not folder.is_dir() else None)


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, deepest first."""
    created = []
    for anc in [folder, *folder.parents]:
        if anc.exists():
            break
        created.append(anc)
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created, deepest first, where they are still empty."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            break


def _written(written: list[Path], total: int) -> str:
    if not written:
        return "no image was written"
    names = ", ".join(str(p) for p in written[:5]) + (f" and {len(written) - 5} more" if len(written) > 5 else "")
    return f"{len(written)} of {total} images were written ({names}); the others were not"


class _Progress:
    """A rich progress bar on stderr (images, and the steps of the current one), or nothing."""

    def __init__(self, enabled: bool, n_images: int):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.images = self.bar.add_task("images", total=n_images)
            self.steps = self.bar.add_task("steps", total=None)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def callback(self):
        if self.bar is None:
            return None
        self.bar.reset(self.steps, total=None)

        def on_step(step: int, total: int) -> None:
            self.bar.update(self.steps, completed=step, total=total)

        return on_step

    def done(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.images, n)


def _jsonable(x):
    if hasattr(x, "item"):  # NumPy scalars
        return x.item()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)


def _generate(mode: str, images: Optional[List[Path]], mask: Optional[Path], options: dict, *, from_png: Optional[Path],
              model: Optional[Path], out: Optional[Path], provider: str, overwrite: bool, quiet: bool, as_json: bool,
              lora_dir: Optional[Path] = None, embeddings_dir: Optional[Path] = None) -> None:
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.infotext import arguments_from_infotext, parse_infotext, read_infotext, save_png

    t_start = time.perf_counter()
    kwargs: dict = {}
    lora_hashes = None
    if from_png is not None:
        try:
            text = read_infotext(from_png)
        except InputError as e:
            fail(f"--from-png: {str(e).removeprefix('image: ')}")
        if not text:
            fail(f"--from-png: {from_png} holds no generation parameters (no PNG 'parameters' text from sdrt or A1111)")
        kwargs.update(arguments_from_infotext(text, mode))
        lora_hashes = parse_infotext(text)[2].get("Lora hashes")
    from_png_keys = set(kwargs)
    kwargs.update({k: v for k, v in options.items() if v is not None})
    from_png_keys -= {k for k, v in options.items() if v is not None}
    if kwargs.get("prompt") is None:
        fail("missing option --prompt/-p (or --from-png FILE to take it from a PNG)", 2)

    if images is None:
        pairs: list = [(None, None)]
    else:
        files = _expand(images, "image")
        pairs = list(zip(files, _masks_for(files, mask) if mask is not None else [None] * len(files)))

    t = time.perf_counter()
    pipe = _load_pipeline(model, provider, lora_dir, embeddings_dir)
    if lora_hashes:  # a LoRA renamed since the PNG was made is found by its hash, as A1111 does
        from sdrt.runtime.lora import rename_by_hash

        kwargs["prompt"] = rename_by_hash(kwargs["prompt"], lora_hashes, pipe.lora_dir)
    t_load = time.perf_counter() - t
    run = getattr(pipe, mode)

    def call(img, m, **kw):
        args = () if img is None else (img,) if m is None else (img, m)
        try:
            return run(*args, **kwargs, **kw)
        except InputError as e:
            # Name the input when the message does not and there are several (a mask's aspect ratio, ...).
            msg = _cli_names(str(e), from_png if from_png_keys else None, from_png_keys)
            if len(pairs) > 1 and img is not None and msg.startswith(("image", "mask")) \
                    and not any(str(p) in msg for p in (img, m) if p is not None):
                raise InputError(f"{img}{f' (mask {m})' if m is not None else ''}: {msg}") from e
            raise

    # Pass 1: the pipeline checks every request and tells the seeds; nothing runs, nothing is written.
    jobs = []
    for img, m in pairs:
        r = call(img, m, dry_run=True)
        if kwargs.get("seed") in (None, -1):
            kwargs["seed"] = r.seeds[0]  # the random seed drawn once, the same for every input
        jobs.append((img, m, r.seeds))
    paths, new_folder = _out_paths(out, jobs, overwrite)
    from sdrt.runtime.infotext import remove_stale_temp_files

    # Pass 2: run and write. A failure, Ctrl-C or SIGTERM says which images were written and
    # leaves no temporary file (save_png removes its own) and no empty folder created here.
    records = []
    written: list[Path] = []
    created: list[Path] = []
    n_images = sum(len(ps) for ps in paths)
    show = not quiet and sys.stderr.isatty()
    try:
        if new_folder is not None:
            created = _make_folder(new_folder)
        for folder in sorted({p.parent for ps in paths for p in ps}):
            remove_stale_temp_files(folder)  # left by an earlier run that was killed (SIGKILL)
        with _Progress(show, n_images) as bar:
            for (img, m, seeds), ps in zip(jobs, paths):
                r = call(img, m, progress=bar.callback())
                for image, seed, infotext, path in zip(r.images, r.seeds, r.infotexts, ps):
                    try:
                        save_png(image, path, infotext, overwrite=overwrite)
                    except OSError as e:
                        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
                    written.append(path)
                    records.append({
                        "input": None if img is None else str(img),
                        "mask": None if m is None else str(m),
                        "output": str(path),
                        "seed": seed,
                        "parameters": {**r.parameters, "seed": seed},
                        "infotext": infotext,
                        "timings": r.timings,
                    })
                    if not quiet and not as_json:
                        typer.echo(str(path))
                bar.done(len(ps))
    except typer.Exit:
        raise
    except BaseException as e:
        _remove_empty(created)
        if _state["debug"] or not isinstance(e, (Exception, KeyboardInterrupt, Terminated)):
            raise
        message, code = _message(e)
        fail(f"{message}; {_written(written, n_images)}", code)
    if as_json:
        doc = {
            "command": mode,
            "model": str(pipe.info.path),
            "provider": pipe.provider,
            "images": records,
            "timings": {"load": t_load, "total": time.perf_counter() - t_start},
        }
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=_jsonable))


# The Python API's keyword -> this command line's option, to name what the user typed.
_OPTION_OF = {"guidance": "--cfg", "negative_prompt": "--negative", "batch_size": "--batch-size", "clip_skip": "--clip-skip",
              "mask_blur_x": "--mask-blur", "mask_blur_y": "--mask-blur", "resize_mode": "--resize-mode", "width": "--width",
              "height": "--height", "steps": "--steps", "seed": "--seed", "strength": "--strength", "prompt": "--prompt",
              "padding": "--padding", "fill": "--fill", "sampler": "--sampler", "schedule": "--schedule"}


def _cli_names(message: str, from_png: Optional[Path], from_png_keys: set) -> str:
    """An API error message as the command line says it: "guidance (--cfg) must be ...", and where
    the value came from when --from-png gave it."""
    key = message.split(" ", 1)[0].rstrip(":")
    option = _OPTION_OF.get(key)
    if option is None:
        return message
    arg = {"mask_blur_x": "mask_blur", "mask_blur_y": "mask_blur"}.get(key, key)
    where = f"{option}, read from --from-png {from_png}" if from_png is not None and arg in from_png_keys else option
    return f"{key} ({where}){message[len(key):]}"


def _common(prompt, negative, steps, cfg, sampler, schedule, seed, batch_size, width, height, clip_skip) -> dict:
    return dict(prompt=prompt, negative_prompt=negative, steps=steps, guidance=cfg, sampler=sampler, schedule=schedule,
                seed=seed, batch_size=batch_size, width=width, height=height, clip_skip=clip_skip)


@app.command()
def img2img(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help="Input images: files, or folders (every image in them, sorted by name).", show_default=False),
    prompt: Prompt = None,
    negative: Negative = None,
    model: Model = None,
    lora_dir: LoraDir = None,
    embeddings_dir: EmbeddingsDir = None,
    strength: Strength = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    width: Width = None,
    height: Height = None,
    resize_mode: ResizeMode = None,
    clip_skip: ClipSkip = None,
    from_png: FromPng = None,
    out: Out = None,
    provider: Provider = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Transform images towards a prompt.

    Writes <input stem>-<seed>.png for every input (seed+1, ... for the rest of a batch), with A1111's parameters text, which `--from-png` and A1111's PNG Info read back.

    Example: sdrt img2img photo.png -p "an oil painting" --strength 0.6 --seed 1 -o out.png
    """
    opts = _common(prompt, negative, steps, cfg, sampler, schedule, seed, batch_size, width, height, clip_skip)
    opts.update(strength=strength, resize_mode=resize_mode)
    _run_guarded(_generate, "img2img", images, None, opts, from_png=from_png, model=model, lora_dir=lora_dir, embeddings_dir=embeddings_dir, out=out,
                 provider=provider, overwrite=overwrite, quiet=quiet, as_json=json_)


@app.command()
def inpaint(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help="Input images: files, or folders (every image in them, sorted by name).", show_default=False),
    mask: Path = typer.Option(..., "--mask", help="Mask (white = repaint): one file for every image, or a folder with a mask per image, matched by file stem.", rich_help_panel=_INP, show_default=False),
    prompt: Prompt = None,
    negative: Negative = None,
    model: Model = None,
    lora_dir: LoraDir = None,
    embeddings_dir: EmbeddingsDir = None,
    mask_blur: Optional[int] = typer.Option(None, "--mask-blur", help="Blur of the mask edge in pixels: A1111's Gaussian for A1111 and ComfyUI samplers (default 4), diffusers' mask_processor.blur for diffusers samplers (default 0).", rich_help_panel=_INP, show_default=False),
    invert_mask: Optional[bool] = typer.Option(None, "--invert-mask/--no-invert-mask", help="Repaint the black part of the mask instead (A1111's 'Inpaint not masked').", rich_help_panel=_INP, show_default=False),
    fill: Optional[str] = typer.Option(None, "--fill", help=f"What the masked area starts from: fill, original, latent_noise or latent_nothing. (default: {_d['fill']})", rich_help_panel=_INP, show_default=False),
    only_masked: Optional[bool] = typer.Option(None, "--only-masked/--whole-picture", help="Work on the region around the mask at full resolution and paste it back (A1111's 'Only masked').", rich_help_panel=_INP, show_default=False),
    padding: Optional[int] = typer.Option(None, "--padding", help=f"Pixels around the mask with --only-masked. (default: {_d['padding']})", rich_help_panel=_INP, show_default=False),
    no_overlay: bool = typer.Option(False, "--no-overlay", help="Keep the decoded pixels outside the mask instead of the original's.", rich_help_panel=_INP),
    strength: Strength = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    width: Width = None,
    height: Height = None,
    resize_mode: ResizeMode = None,
    clip_skip: ClipSkip = None,
    from_png: FromPng = None,
    out: Out = None,
    provider: Provider = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Repaint the white part of a mask (A1111's inpainting options; 4- and 9-channel models).

    Writes <input stem>-<seed>.png for every input, as img2img does; --from-png also takes the mask blur, mask mode, masked content, inpaint area and padding.

    Example: sdrt inpaint photo.png --mask mask.png -p "a red hat" --mask-blur 4 --only-masked
    """
    opts = _common(prompt, negative, steps, cfg, sampler, schedule, seed, batch_size, width, height, clip_skip)
    opts.update(strength=strength, resize_mode=resize_mode, mask_blur=mask_blur, invert_mask=invert_mask, fill=fill,
                only_masked=only_masked, padding=padding, overlay=False if no_overlay else None)
    _run_guarded(_generate, "inpaint", images, mask, opts, from_png=from_png, model=model, lora_dir=lora_dir, embeddings_dir=embeddings_dir, out=out,
                 provider=provider, overwrite=overwrite, quiet=quiet, as_json=json_)


@app.command()
def txt2img(
    prompt: Prompt = None,
    negative: Negative = None,
    model: Model = None,
    lora_dir: LoraDir = None,
    embeddings_dir: EmbeddingsDir = None,
    width: Annotated[Optional[int], typer.Option("--width", "-W", help="Image width (rounded to the model's multiple). (default: the model's size: 1024 for SDXL models, from their config; 512 for SD 1.x/2.x)", rich_help_panel=_GEN, show_default=False)] = None,
    height: Annotated[Optional[int], typer.Option("--height", "-H", help="Image height. (default: as --width)", rich_help_panel=_GEN, show_default=False)] = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    clip_skip: ClipSkip = None,
    from_png: FromPng = None,
    out: Out = None,
    provider: Provider = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Generate images from a prompt alone.

    Writes txt2img-<seed>.png (seed+1, ... for the rest of a batch), with A1111's parameters text.

    Example: sdrt txt2img -p "a lighthouse at dusk" --width 512 --height 512 --seed 7
    """
    opts = _common(prompt, negative, steps, cfg, sampler, schedule, seed, batch_size, width, height, clip_skip)
    _run_guarded(_generate, "txt2img", None, None, opts, from_png=from_png, model=model, lora_dir=lora_dir, embeddings_dir=embeddings_dir, out=out,
                 provider=provider, overwrite=overwrite, quiet=quiet, as_json=json_)


@app.command()
def grid(
    image: Optional[Path] = typer.Argument(None, metavar="[IMAGE]", help="Input image (none: txt2img).", show_default=False),
    x: str = typer.Option(..., "--x", help='X axis, KIND=V1,V2,...: strength, cfg, steps, sampler, schedule, seed, clip_skip, lora:NAME (its weight), "prompt S/R" (the first value searched in the prompt, replaced by each). Values with commas in double quotes.', rich_help_panel=_GEN, show_default=False),
    y: Optional[str] = typer.Option(None, "--y", help="Y axis (as --x).", rich_help_panel=_GEN, show_default=False),
    z: Optional[str] = typer.Option(None, "--z", help="Z axis (as --x): one sub-grid per value, side by side.", rich_help_panel=_GEN, show_default=False),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Mask (white = repaint): inpaint instead of img2img.", rich_help_panel=_GEN, show_default=False),
    prompt: Prompt = None,
    negative: Negative = None,
    model: Model = None,
    lora_dir: LoraDir = None,
    embeddings_dir: EmbeddingsDir = None,
    strength: Strength = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    seed: Seed = None,
    width: Width = None,
    height: Height = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The grid's PNG file (default: grid-<seed>.png); each cell goes with its own parameters into <name>-cells/ beside it.", rich_help_panel=_OUT, show_default=False),
    provider: Provider = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """An X/Y/Z grid of images, as A1111's X/Y/Z plot: one cell per combination of axis values, labelled.

    Every cell has the same seed unless seed is an axis. The grid PNG carries the parameters of its first cell and the axes; each cell is also saved with its own.

    Example: sdrt grid in.png -p "a cat <lora:style:1>" --x "lora:style=0.4,0.8,1.0" --y "strength=0.3,0.5,0.7" --seed 1
    """
    opts = {k: v for k, v in dict(prompt=prompt, negative_prompt=negative, strength=strength, steps=steps, guidance=cfg,
                                  sampler=sampler, schedule=schedule, seed=seed, width=width, height=height).items()
            if v is not None}
    _run_guarded(_grid, image, mask, [a for a in (x, y, z) if a is not None], opts, model=model, lora_dir=lora_dir,
                 embeddings_dir=embeddings_dir, out=out, provider=provider, overwrite=overwrite, quiet=quiet)


def _grid(image, mask, axes_specs, opts, *, model, lora_dir, embeddings_dir, out, provider, overwrite, quiet) -> None:
    from sdrt.runtime.grid import parse_axis, run_grid
    from sdrt.runtime.infotext import save_png

    if opts.get("prompt") is None:
        fail("missing option --prompt/-p", 2)
    if mask is not None and image is None:
        fail("--mask needs an IMAGE to inpaint", 2)
    axes = [parse_axis(a) for a in axes_specs]
    mode = "txt2img" if image is None else "inpaint" if mask is not None else "img2img"
    if mode == "txt2img":
        opts.pop("strength", None)
    base = {**opts, **({"image": image} if image is not None else {}), **({"mask": mask} if mask is not None else {})}
    pipe = _load_pipeline(model, provider, lora_dir, embeddings_dir)
    if base.get("seed") in (None, -1) and not any(a.kind == "seed" for a in axes):
        base["seed"] = getattr(pipe, mode)(**base, dry_run=True).seeds[0]
    path = out if out is not None else Path(f"grid-{base.get('seed', 'seeds')}.png")
    cells_dir = path.with_name(path.stem + "-cells")
    if not overwrite and (path.exists() or cells_dir.exists()):
        fail(f"{path if path.exists() else cells_dir} already exists; pass --overwrite to replace it")
    show = not quiet and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            typer.echo(f"\rcell {done}/{total}", err=True, nl=done == total)

    g = run_grid(pipe, mode, base, axes, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    cells_dir.mkdir(exist_ok=True)
    for i, (r, (xi, yi, zi)) in enumerate(g.cells):
        save_png(r.images[0], cells_dir / f"{i:04d}-x{xi}-y{yi}-z{zi}.png", r.infotexts[0], overwrite=overwrite)
    save_png(g.image, path, g.infotext, overwrite=overwrite)
    if not quiet:
        typer.echo(str(path))


@app.command()
def samplers(json_: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """List every accepted sampler name (with aliases and default schedule) and the schedules of each family."""
    from sdrt.schedulers import list_samplers, list_schedules

    names = list_samplers()
    schedules = list_schedules()
    if json_:
        doc = {"samplers": [{"name": s.name, "family": s.family, "aliases": list(s.aliases), "default_schedule": s.schedule}
                            for s in names], "schedules": schedules}
        typer.echo(json.dumps(doc, indent=2))
        return
    titles = {"a1111": "AUTOMATIC1111 names (k-diffusion samplers, A1111's img2img step rules)",
              "comfyui": "ComfyUI names (use with a ComfyUI schedule: --schedule karras)",
              "diffusers": "diffusers scheduler classes (options in the name: \"DPMSolverMultistepScheduler(use_karras_sigmas=True)\")"}
    w = max(len(s.name) for s in names)
    for family, title in titles.items():
        typer.echo(f"{title}:")
        for s in (s for s in names if s.family == family):
            extra = []
            if s.schedule:
                extra.append(f"default schedule {s.schedule}")
            if s.aliases:
                extra.append(f"aliases: {', '.join(s.aliases)}")
            typer.echo(f"  {s.name:<{w}}  {'; '.join(extra)}".rstrip())
        typer.echo("")
    typer.echo("Schedules (--schedule):")
    for family, labels in schedules.items():
        typer.echo(f"  {family + ':':<10} {', '.join(labels)}")
    typer.echo("")
    typer.echo('Names are case-insensitive where unambiguous; prefix "a1111:", "comfyui:" or "diffusers:" to pick a family.')


@app.command()
def bench(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model folder (default: the embedded default model).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="img2img, inpaint or txt2img.")] = "img2img",
    size: Annotated[int, typer.Option("--size", min=8, max=8192, help="Width and height in pixels.")] = 256,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 10,
    strength: Annotated[float, typer.Option("--strength", help="Denoising strength (img2img, inpaint).")] = 0.5,
    cfg: Annotated[float, typer.Option("--cfg", help="Guidance scale (above 1: a CFG batch of 2).")] = 7.5,
    sampler: Annotated[str, typer.Option("--sampler", help="Sampler name (see `sdrt samplers`).")] = "PNDMScheduler",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per run.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs after one warm-up run; the best is reported.")] = 2,
    provider: Annotated[str, typer.Option("--provider", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads (default: physical cores).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Time sdrt on one workload: end to end and per stage (text encoder, VAE encode, UNet per call, VAE decode,
    sampler arithmetic, the rest), peak RSS. For the side-by-side comparison with diffusers and optimum, see
    benchmarks/cpu.py."""

    def go():
        from sdrt.runtime.bench import Workload, bench as run_bench, format_record

        from sdrt.runtime.sessions import check_threads

        check_threads(threads)
        if mode not in ("img2img", "inpaint", "txt2img"):
            fail(f"--mode must be img2img, inpaint or txt2img, got {mode!r}")
        w = Workload(mode=mode, size=size, steps=steps, strength=strength, guidance=cfg, sampler=sampler, batch_size=batch_size)
        path = model
        if path is None:
            from sdrt.models import default_model_path

            path = default_model_path()
        announce = None if json_ else (lambda: typer.echo(f"{w.label}: 1 warm-up run, then best of {repeats}", err=True))
        rec = run_bench(path, w, provider=provider, repeats=repeats, threads=threads, checked=announce)
        rec.pop("image", None)
        typer.echo(json.dumps(rec, indent=2) if json_ else format_record(rec))

    _run_guarded(go)


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Model folder to serve. Default: the embedded default model.", show_default=False)] = None,
    models_dir: Annotated[Optional[Path], typer.Option("--models-dir", help="A folder of model folders, chosen per request by name (sd_model_checkpoint); the first by name loads at start.", show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind. Keep 127.0.0.1 unless the service must be reached from other machines (then use --api-auth).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (A1111's is 7860).")] = 7860,
    api_auth: Annotated[Optional[str], typer.Option("--api-auth", help="HTTP Basic credentials user:pass[,user2:pass2], as A1111's --api-auth (everything but /healthz and /readyz needs them).", show_default=False)] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait; past that a new one gets 503 with Retry-After.")] = 16,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a request may take from arrival (queue included); then 504.")] = 300.0,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Images per micro-batched UNet call across compatible queued requests (1: no micro-batching).")] = 8,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="How long a request waits for compatible ones to batch with.")] = 10.0,
    max_images: Annotated[int, typer.Option("--max-images", help="Images per request (batch_size x n_iter).")] = 16,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Sampling steps per request.")] = 150,
    max_size: Annotated[int, typer.Option("--max-size", help="Largest width and height a request may ask for.")] = 2048,
    provider: Provider = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="ONNX Runtime intra-op threads (default: physical cores; with --ray: split between replicas).", show_default=False)] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run as a Ray Serve deployment (needs the ray extra) with --replicas copies, one model load each.")] = False,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="With --ray: number of replicas.")] = 1,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, png-info, ...) on sdrt (needs the serve extra).

    OpenAPI docs at /docs; /healthz, /readyz and Prometheus /metrics for operations.

    Example: sdrt serve --models-dir models/ --port 7860 --api-auth alice:secret
    """

    def go():
        try:
            from sdrt.serve.config import ServeConfig
            if ray:
                from sdrt.serve.ray_app import run_ray
            else:
                from sdrt.serve.server import run
        except ImportError as e:
            extra = "ray" if ray else "serve"
            fail(f"sdrt serve{' --ray' if ray else ''} needs the {extra} extra (pip install 'sdrt[{extra}]'): {e}")
        cfg = ServeConfig(model=None if model is None else str(model), models_dir=None if models_dir is None else str(models_dir),
                          host=host, port=port, api_auth=api_auth or {}, max_queue=max_queue, request_timeout=request_timeout,
                          max_batch_images=max_batch, batch_wait_ms=batch_wait_ms, max_images=max_images, max_steps=max_steps,
                          max_width=max_size, max_height=max_size, provider=provider, threads=threads)
        if ray:
            run_ray(cfg, replicas=replicas, log_level=log_level)
        else:
            # The server drains on SIGTERM itself (requests in flight finish, its log stays JSON) and
            # then ends by the signal it caught: not the one-line exit of the other commands.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            run(cfg, log_level=log_level)

    _run_guarded(go)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
