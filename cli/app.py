"""The `sdrt` command line (typer). A thin layer over sdrt.runtime and sdrt.export.

Heavy modules (onnxruntime, PIL, the pipeline, torch for export) are imported inside the
commands that need them, so `sdrt --help` and argument errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="sdrt",
    help="Fast Stable Diffusion img2img and inpainting on ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def fail(message: str, code: int = 1) -> None:
    """Print one clear line on stderr and exit (no traceback unless --debug)."""
    typer.echo(f"sdrt: error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _run_guarded(fn, *args, **kwargs):
    """Turn the errors sdrt raises for bad input into one line and exit code 1."""
    if _state["debug"]:
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (ValueError, RuntimeError, OSError) as e:
        fail(str(e) or e.__class__.__name__)


@app.command()
def export(
    src: Path = typer.Argument(..., help="A diffusers-format Stable Diffusion folder (model_index.json, unet/, vae/, ...)."),
    out: Path = typer.Argument(..., help="The model folder to write (must not exist unless --overwrite)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 (with --target cuda)."),
    target: str = typer.Option("cpu", "--target", help="cpu (fused for the CPU provider) or cuda (fused for the CUDA provider)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 14 to 20."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (atomically, at the end)."),
    fp32_ops: str = typer.Option("", "--fp32-ops", help="Comma-separated op types kept fp32 in fp16 graphs (e.g. MultiHeadAttention for SD 2.x)."),
) -> None:
    """Export a Stable Diffusion checkpoint to an sdrt model folder (needs the export extra: torch, diffusers)."""

    def go():
        try:
            from sdrt.export import export_model
        except ImportError as e:
            fail(f"export needs the export extra (pip install 'sdrt[export]'): {e}")
        ops = tuple(o.strip() for o in fp32_ops.split(",") if o.strip())
        export_model(src, out, precision=precision, target=target, opset=opset, overwrite=overwrite, fp32_ops=ops)

    _run_guarded(go)


@app.command()
def info(
    model: Path = typer.Argument(..., help="A model folder."),
    verify: str = typer.Option("auto", "--verify", help="File check: auto (hash changed files), full, size, none."),
) -> None:
    """Describe a model folder: family, channels, precision, target, sizes, and the providers available here."""

    def go():
        import onnxruntime as ort

        from sdrt.runtime.modelfolder import read_model_folder

        i = read_model_folder(model, verify=verify)
        size = sum(p.stat().st_size for p in i.path.rglob("*") if p.is_file())
        rows = [
            ("model", str(i.path)),
            ("family", i.family),
            ("prediction type", i.prediction_type),
            ("UNet input channels", f"{i.unet_in_channels}{' (inpainting model)' if i.is_inpainting_model else ''}"),
            ("latent channels", str(i.latent_channels)),
            ("VAE scale factor", f"{i.vae_scale_factor} (native size {i.native_size}x{i.native_size})"),
            ("target", i.target),
            ("precision", ", ".join(f"{k} {v}" for k, v in i.precision.items())),
            ("files", f"{size / 2**20:.1f} MiB" + ("" if i.manifest else " (no sdrt.json: not checked)")),
            ("providers here", ", ".join(ort.get_available_providers())),
        ]
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            typer.echo(f"{k:<{w}}  {v}")

    _run_guarded(go)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
