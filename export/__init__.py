"""sdrt.export: turn a Stable Diffusion checkpoint into an sdrt model folder (PyTorch side only).

    from sdrt.export import export_model
    export_model("path/to/diffusers-folder", "models/my-model", precision="fp16", target="cuda")

The folder is written into a temporary folder beside OUT and renamed at the end, so an
interrupted export never leaves anything that loads as a model.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

from sdrt.runtime.modelfolder import FORMAT_VERSION, FP32_VAE_DECODER, INCOMPLETE_MARKER, MANIFEST, sha256_file

from . import sdxl

PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("cpu", "cuda")
DEFAULT_OPSET = 17
# Graphs quantized by --precision int8 (the others stay fp32: the UNet is where the time goes).
INT8_GRAPHS = ("unet",)
# Operators an fp16 graph keeps in fp32 unless fp32_ops says otherwise, per model family and graph:
# SD 2.x's UNet attention overflows in fp16 (black images; ONNX Runtime's SD stack forces
# unet:MultiHeadAttention to fp32 for SD 2.1 too).
DEFAULT_FP32_OPS = {("sd2", "unet"): ("MultiHeadAttention",)}


class ExportError(RuntimeError):
    """The export cannot proceed; the message says why and what is accepted."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _read_index(src: Path) -> dict:
    index = src / "model_index.json"
    if not src.exists():
        raise ExportError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise ExportError(f"source {src} is not a folder (a diffusers-format folder with model_index.json is accepted)")
    if not index.is_file():
        raise ExportError(
            f"{src} is not a diffusers folder: model_index.json is missing "
            "(accepted: a StableDiffusionPipeline or StableDiffusionInpaintPipeline folder)"
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{index} is not valid JSON ({e})") from None
    cls = data.get("_class_name", "")
    supported = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline")
    if sdxl.is_sdxl(data):
        sdxl.check_index(src, data, ExportError)
        if not (src / "scheduler" / "scheduler_config.json").is_file():
            raise ExportError(f"{src}: scheduler/scheduler_config.json is missing")
        return data
    if cls not in supported + sdxl.PIPELINES:
        raise ExportError(f"{src} holds a {cls or 'unknown'} pipeline; sdrt exports {', '.join(supported + sdxl.PIPELINES)}")
    expected = {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
    }
    for comp, want in expected.items():
        entry = data.get(comp)
        if not entry or not isinstance(entry, list) or entry[-1] is None:
            raise ExportError(f"{src}: model_index.json lists no {comp}")
        if not (src / comp).is_dir():
            raise ExportError(f"{src}: the {comp}/ folder is missing")
        if not str(entry[-1]).startswith(want):
            raise ExportError(f"{src}: {comp} is a {entry[-1]}; sdrt exports a {want} there (unsupported architecture)")
    if not (src / "scheduler" / "scheduler_config.json").is_file():
        raise ExportError(f"{src}: scheduler/scheduler_config.json is missing")
    return data


def _load_pipeline(src: Path, index: dict, vae_src: Path | None = None):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", local_files_only=True, torch_dtype=torch.float32)
    if unet.config.in_channels not in (4, 9):
        raise ExportError(f"{src}: the UNet has {unet.config.in_channels} input channels; sdrt accepts 4 (or 9 for inpainting)")
    if getattr(unet.config, "addition_embed_type", None) or getattr(unet.config, "time_cond_proj_dim", None):
        raise ExportError(f"{src}: the UNet takes extra conditioning (SDXL/LCM-distilled); sdrt accepts SD 1.x/2.x UNets")
    if vae_src is None:
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", local_files_only=True, torch_dtype=torch.float32)
    else:
        vae = AutoencoderKL.from_pretrained(vae_src, local_files_only=True, torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", local_files_only=True, torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", local_files_only=True)
    for m in (unet, vae, text_encoder):
        m.eval()

    class Parts:  # the attributes graph_specs() reads
        pass

    p = Parts()
    p.unet, p.vae, p.text_encoder, p.tokenizer = unet, vae, text_encoder, tokenizer
    return p


def _write_tokenizer(tokenizer, dst: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json (+ tokenizer.json), whatever the source had."""
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dst)
    if not (dst / "vocab.json").is_file() or not (dst / "merges.txt").is_file():
        tj = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
        model = tj["model"]
        (dst / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _family(unet_cfg, tokenizer, prediction_type: str) -> str:
    from sdrt.runtime.modelfolder import _family as family

    return family(int(unet_cfg.cross_attention_dim), tokenizer.pad_token, prediction_type)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["sdrt"] = version("sdrt")
    except PackageNotFoundError:
        pass
    return out


def _partial_name(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def _clean_stale_partials(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


def export_model(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    precision: str = "fp32",
    target: str = "cpu",
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    fp32_ops: tuple[str, ...] | None = None,
    fp32_vae_decoder: bool = False,
    vae: str | os.PathLike | None = None,
    check: bool = True,
    int8_weight_max: int = 64,
    log: Callable[[str], None] = _log,
) -> Path:
    """Export the diffusers folder `src` into the sdrt model folder `out`; returns `out`.

    `src` may also be an sdrt fp32 cpu-target folder with precision="int8": its UNet is quantized
    (no PyTorch needed) and the other files are copied.

    precision/target: fp32 + cpu (fused for the CPU provider), int8 + cpu (the same, with the
    UNet's convolutions statically quantized to int8 after calibration on fixed prompts and its
    matrix products dynamically quantized; see export/quantize.py), fp32 + cuda, or fp16 + cuda (fused for
    the CUDA provider, then converted to fp16; needs the CUDA provider to run).
    fp32_ops: operator types kept in fp32 in every fp16 graph; None: the family's defaults
    (DEFAULT_FP32_OPS: MultiHeadAttention in SD 2.x UNets), () none.
    fp32_vae_decoder: with fp16, also write an fp32 VAE decoder, which the pipeline uses for an
    image whose fp16 decoding overflows (NaN/Inf).
    int8_weight_max: with int8, the weights' range [-w, w]: 64 (the default) is exact on every CPU;
    127 is exact only where ONNX Runtime's int8 products accumulate in 32 bits (VNNI, AMX, ARM), and
    may saturate on other x86-64 CPUs (see export/quantize.py). 127 is there to measure the cost.
    vae: a diffusers VAE folder (config.json + weights) used instead of the source's VAE, e.g. an
    fp16-fixed SDXL VAE: an SDXL VAE whose config says force_upcast (SDXL's own) stays fp32 in an
    fp16 export, one that does not is converted to fp16 like the other graphs.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not supported; accepted: {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise ExportError(f"target {target!r} is not supported; accepted: {', '.join(TARGETS)}")
    if precision == "fp16" and target != "cuda":
        raise ExportError("fp16 graphs run on the CUDA provider only: use --target cuda with --precision fp16")
    if precision == "int8" and target != "cpu":
        raise ExportError("int8 graphs are for the CPU provider: use --target cpu with --precision int8")
    if int8_weight_max not in (64, 127):
        raise ExportError(f"int8_weight_max {int8_weight_max} is not supported; accepted: 64 (exact on every CPU), 127")
    if fp32_vae_decoder and precision != "fp16":
        raise ExportError("--fp32-vae-decoder goes with --precision fp16 (the VAE decoder is fp32 otherwise)")
    vae = None if vae is None else Path(vae).expanduser()
    if vae is not None and not (vae / "config.json").is_file():
        raise ExportError(f"--vae {vae}: not a diffusers VAE folder (config.json and the weights of an AutoencoderKL)")
    if not 14 <= opset <= 20:
        raise ExportError(f"opset {opset} is not supported; accepted: 14 to 20")
    from_folder = (src / MANIFEST).is_file()
    if from_folder:
        if precision != "int8" or target != "cpu":
            raise ExportError(f"{src} is an sdrt model folder: it can only be quantized (--precision int8, cpu target); "
                              "other precisions are exported from the diffusers folder")
    else:
        index = _read_index(src)
    if out.exists() and not overwrite:
        raise ExportError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise ExportError("the output folder must differ from the source folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    tmp = _partial_name(out)
    tmp.mkdir()
    (tmp / INCOMPLETE_MARKER).write_text("export in progress\n")
    try:
        if from_folder:
            manifest = _quantize_into(src, tmp, int8_weight_max, log)
        else:
            manifest = _export_into(src, tmp, index, precision, target, opset, fp32_ops, fp32_vae_decoder, check,
                                    int8_weight_max, log, vae)
        _fsync_tree(tmp)
        (tmp / INCOMPLETE_MARKER).unlink()
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise ExportError(f"no space left on the device holding {out.parent} while exporting; free some and retry") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {src} -> {out} ({precision}, {target}, {manifest['family']}, {manifest['unet_in_channels']}-channel UNet)")
    return out


def _export_into(src, tmp, index, precision, target, opset, fp32_ops, fp32_vae_decoder, check, int8_weight_max,
                 log, vae=None) -> dict:
    import torch

    from .graphs import GraphSpec, check_graph, export_graph, graph_specs, vae_specs
    from .optimize import optimize_graph

    torch.set_grad_enabled(False)
    t0 = time.time()
    xl = sdxl.is_sdxl(index)
    pipe = sdxl.load_parts(src, index, vae) if xl else _load_pipeline(src, index, vae)
    sched = json.loads((src / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    prediction_type = sched.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ExportError(f"{src}: prediction_type {prediction_type!r} is not supported; accepted: epsilon, v_prediction")
    if xl:
        sdxl.check_unet(src, pipe.unet.config, ExportError)
        sdxl.check_vae(src, pipe.vae.config, ExportError)
        family = "sdxl"
        specs = sdxl.graph_specs(pipe, GraphSpec, vae_specs)
    else:
        family = _family(pipe.unet.config, pipe.tokenizer, prediction_type)
        specs = graph_specs(pipe)
    # An SDXL VAE that overflows in fp16 (force_upcast) stays fp32 in an fp16 folder, as in diffusers.
    fp32_graphs = {"vae_encoder", "vae_decoder"} if xl and precision == "fp16" and not sdxl.vae_in_fp16(pipe.vae.config) else set()
    if fp32_vae_decoder and "vae_decoder" in fp32_graphs:
        raise ExportError("--fp32-vae-decoder: this SDXL VAE decoder is kept fp32 already (its config says force_upcast)")
    kept_fp32 = {}
    checks, fused, precisions = {}, {}, {}
    for spec in specs:
        name = spec.name
        # int8 graphs are quantized from their fused fp32 graph once the folder is complete (below).
        graph_precision = "fp32" if precision == "int8" or name in fp32_graphs else precision
        ops = tuple(DEFAULT_FP32_OPS.get((family, name), ())) if fp32_ops is None else tuple(fp32_ops)
        if graph_precision == "fp16" and ops:
            kept_fp32[name] = list(ops)
        dst = tmp / name / "model.onnx"
        stage = tmp / "_fp32" / name / "model.onnx"
        t = time.time()
        export_graph(spec, stage, opset)
        if check:
            checks[name] = check_graph(spec, stage)
            log(f"  {name}: fp32 ONNX vs PyTorch max abs diff {checks[name]:.3g}")
        fused[name] = optimize_graph(stage, dst, name, target, graph_precision, ops)
        precisions[name] = precision if precision != "int8" or name in INT8_GRAPHS else "fp32"
        precisions[name] = "fp32" if name in fp32_graphs else precisions[name]
        if check and target == "cpu" and graph_precision == "fp32":
            # The fused CPU graph must still compute the module's output.
            check_graph(spec, dst)
        if name == "vae_decoder" and fp32_vae_decoder:
            fused[FP32_VAE_DECODER] = optimize_graph(stage, tmp / FP32_VAE_DECODER / "model.onnx", name, target, "fp32")
            precisions[FP32_VAE_DECODER] = "fp32"
        shutil.rmtree(stage.parent)
        ops = ", ".join(f"{k} {v}" for k, v in sorted(fused[name].items())) or "none"
        log(f"  {name}: {graph_precision}/{target} graph written in {time.time() - t:.1f}s (fused: {ops})")
    shutil.rmtree(tmp / "_fp32", ignore_errors=True)

    # Configs and tokenizer, in optimum's layout.
    (tmp / "scheduler").mkdir()
    shutil.copy2(src / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
    if pipe.tokenizer is not None:
        _write_tokenizer(pipe.tokenizer, tmp / "tokenizer")
        pipe.text_encoder.config.to_json_file(tmp / "text_encoder" / "config.json")
    pipe.unet.save_config(tmp / "unet")
    for d in ("vae_encoder", "vae_decoder") + ((FP32_VAE_DECODER,) if fp32_vae_decoder else ()):
        pipe.vae.save_config(tmp / d)
    if xl:
        sdxl.write_configs(pipe, tmp, _write_tokenizer)
        new_index = sdxl.index_entries(index)
    else:
        new_index = {k: v for k, v in index.items() if k != "vae"}
        for k in ("unet", "text_encoder", "vae_encoder", "vae_decoder"):
            new_index[k] = ["sdrt", "OnnxGraph"]
    (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2) + "\n")

    vae_cfg = pipe.vae.config
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "prediction_type": prediction_type,
        "unet_in_channels": int(pipe.unet.config.in_channels),
        "latent_channels": int(vae_cfg.latent_channels),
        "vae_scale_factor": 2 ** (len(vae_cfg.block_out_channels) - 1),
        "vae_scaling_factor": float(vae_cfg.scaling_factor),
        "sample_size": int(pipe.unet.config.sample_size),
        **(sdxl.manifest_fields(pipe) if xl else {
            "text_hidden_size": int(pipe.text_encoder.config.hidden_size),
            "text_layers": int(pipe.text_encoder.config.num_hidden_layers),
        }),
        "target": target,
        "precision": precisions,
        "opset": opset,
        "fp32_ops": kept_fp32,  # graph -> operator types kept fp32 in an fp16 graph
        "fused_operators": fused,
        "export_check_max_abs_diff": checks,
        "source": src.name,
        "versions": _versions(),
    }
    if vae is not None:
        manifest["vae_source"] = vae.name
    assert {"unet", "vae_encoder", "vae_decoder"} <= set(precisions)
    if precision == "int8":
        from .quantize import quantize_unet

        del pipe  # the PyTorch copy is not needed any more; calibration runs the fp32 graphs
        gc.collect()
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "precision": {k: "fp32" for k in precisions}, "files": {}}))
        q = quantize_unet(tmp, log=log, weight_max=int8_weight_max)
        fused["unet"].update(q["fused_operators"])
        manifest["int8_weight_max"] = q["int8_weight_max"]
    return _write_manifest(tmp, manifest, t0)


def _write_manifest(tmp: Path, manifest: dict, t0: float) -> dict:
    """Complete `manifest` with the size and sha256 of every file under `tmp`, and write it."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and p.name not in (INCOMPLETE_MARKER, MANIFEST):
            rel = p.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest.update(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    export_seconds=round(time.time() - t0, 1), files=files)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _quantize_into(src: Path, tmp: Path, int8_weight_max: int, log) -> dict:
    """int8 from an sdrt fp32 cpu-target folder (no PyTorch needed): copy it, quantize the UNet."""
    from sdrt.runtime.modelfolder import ModelFolderError, read_model_folder

    from .quantize import quantize_unet

    t0 = time.time()
    try:
        info = read_model_folder(src, verify="full")
    except ModelFolderError as e:
        raise ExportError(str(e)) from None
    if info.target != "cpu" or set(info.precision.values()) != {"fp32"}:
        got = ", ".join(f"{k} {v}" for k, v in sorted(info.precision.items()))
        raise ExportError(f"{src} is a {info.target}-target folder ({got}); int8 is made from an fp32 cpu-target "
                          "folder or from the diffusers folder")
    for p in sorted(src.iterdir()):
        if p.name not in (MANIFEST, INCOMPLETE_MARKER):
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
    manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": {}}))
    q = quantize_unet(tmp, log=log, weight_max=int8_weight_max)
    manifest["precision"] = {**manifest["precision"], "unet": "int8"}
    manifest["fused_operators"] = {**manifest["fused_operators"],
                                   "unet": {**manifest["fused_operators"]["unet"], **q["fused_operators"]}}
    manifest["int8_weight_max"] = q["int8_weight_max"]
    manifest["source"] = f"{manifest.get('source', '?')} (sdrt folder {src.name})"
    manifest["versions"] = _versions()
    return _write_manifest(tmp, manifest, t0)
