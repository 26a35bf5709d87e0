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

from sdrt.runtime.modelfolder import FORMAT_VERSION, FP32_VAE_DECODER, GRAPHS, INCOMPLETE_MARKER, MANIFEST, sha256_file

from . import memory, sdxl

PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("cpu", "cuda")
DEFAULT_OPSET = 17
# Graphs quantized by --precision int8 (the others stay fp32: the UNet is where the time goes).
INT8_GRAPHS = ("unet",)
# Operators an fp16 graph keeps in fp32 unless fp32_ops says otherwise, per model family and graph:
# SD 2.x's UNet attention overflows in fp16 (black images; ONNX Runtime's SD stack forces
# unet:MultiHeadAttention to fp32 for SD 2.1 too).
# Graphs whose weights LoRAs change (their lora_map.json says where each weight is).
LORA_GRAPHS = ("unet", "text_encoder")
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
    if cls not in supported:
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


class DiffusersSource:
    """A diffusers folder: configs and tokenizer up front, each model's weights only when asked.

    The export loads one model at a time (text encoder, UNet, VAE) and frees it once its graphs
    are written, so no two models' weights are in memory together.
    """

    COMPONENTS = ("text_encoder", "unet", "vae")
    sdxl = False

    def __init__(self, src: Path, index: dict, prediction_type: str | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTokenizer

        self._init_scheduler(src, index, prediction_type)
        self.unet_config = dict(UNet2DConditionModel.load_config(src, subfolder="unet", local_files_only=True))
        self.vae_config = dict(AutoencoderKL.load_config(src, subfolder="vae", local_files_only=True))
        self.text_config = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder", local_files_only=True)
        in_channels = self.unet_config.get("in_channels", 4)
        if in_channels not in (4, 9):
            raise ExportError(f"{src}: the UNet has {in_channels} input channels; sdrt accepts 4 (or 9 for inpainting)")
        if self.unet_config.get("addition_embed_type") or self.unet_config.get("time_cond_proj_dim"):
            raise ExportError(f"{src}: the UNet takes extra conditioning (SDXL/LCM-distilled); sdrt accepts SD 1.x/2.x UNets")
        self.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", local_files_only=True)

    def _init_scheduler(self, src: Path, index: dict, prediction_type: str | None) -> None:
        self.src, self.index = src, index
        self.name = src.name
        self.scheduler_config = json.loads((src / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        self._override = prediction_type is not None
        if self._override:
            self.scheduler_config["prediction_type"] = prediction_type

    def load(self, component: str):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component]
        m = cls.from_pretrained(self.src, subfolder=component, local_files_only=True, torch_dtype=torch.float32)
        return m.eval()

    def write_scheduler(self, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        if self._override:
            (dst / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2) + "\n")
        else:
            shutil.copy2(self.src / "scheduler" / "scheduler_config.json", dst / "scheduler_config.json")


class SDXLSource(DiffusersSource):
    """An SDXL diffusers folder: one or two text encoders (a refiner has the second alone), a UNet
    with text_embeds/time_ids conditioning, a VAE (see export/sdxl.py)."""

    sdxl = True

    def __init__(self, src: Path, index: dict, prediction_type: str | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        self._init_scheduler(src, index, prediction_type)
        self.COMPONENTS = (*sdxl.text_encoders(index), "unet", "vae")
        self.unet_config = dict(UNet2DConditionModel.load_config(src, subfolder="unet", local_files_only=True))
        self.vae_config = dict(AutoencoderKL.load_config(src, subfolder="vae", local_files_only=True))
        if self.unet_config.get("in_channels", 4) not in (4, 9):
            raise ExportError(f"{src}: the UNet has {self.unet_config['in_channels']} input channels; sdrt accepts 4 "
                              "(or 9 for inpainting)")
        sdxl.check_unet(src, self.unet_config, ExportError)
        sdxl.check_vae(src, self.vae_config, ExportError)
        self.tokenizers = sdxl.load_tokenizers(src, index)

    def load(self, component: str):
        if component.startswith("text_encoder"):
            return sdxl.load_text_encoder(self.src, component)
        return super().load(component)


def _source_components(index: dict) -> tuple[str, ...]:
    return (*sdxl.text_encoders(index), "unet", "vae") if sdxl.is_sdxl(index) else DiffusersSource.COMPONENTS


def _graph_specs(source, component: str, module) -> list:
    """The graphs of one model of `source`."""
    from .graphs import text_encoder_spec, unet_spec, vae_specs

    if component == "vae":
        return vae_specs(module)
    if getattr(source, "sdxl", False):
        if component == "unet":
            return [sdxl.unet_spec(module, sdxl.time_ids(source.index))]
        return [sdxl.text_encoder_spec(module, source.tokenizers[component], component)]
    return [unet_spec(module)] if component == "unet" else [text_encoder_spec(module, source.tokenizer)]


def _folder_weight_bytes(folder: Path) -> int:
    """fp32 bytes of the weights in a diffusers model folder: numel x 4 from safetensors headers,
    or the size of other weight files (.bin, assumed fp32)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        # A folder may hold variants (model.fp16.safetensors beside model.safetensors): count one.
        plain = [f for f in files if f.name.count(".") == 1] or files[:1]
        return sum(safetensors_numel(f) * 4 for f in plain)
    bins = sorted(folder.glob("*.bin"))
    plain = [f for f in bins if f.name.count(".") == 1] or bins[:1]
    return sum(f.stat().st_size for f in plain)


def safetensors_numel(path: Path) -> int:
    """Number of elements in a .safetensors file, from its header."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ExportError(f"{path} is not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ExportError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k != "__metadata__":
            count = 1
            for d in v["shape"]:
                count *= int(d)
            total += count
    return total


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
    check: bool = True,
    memory_check: bool = True,
    prediction_type: str | None = None,
    vae: str | os.PathLike | None = None,
    int8_weight_max: int = 64,
    log: Callable[[str], None] = _log,
) -> Path:
    """Export the diffusers folder or single-file checkpoint `src` into the sdrt model folder `out`;
    returns `out`.

    `src` may be a diffusers folder, an A1111/ComfyUI-style single-file SD 1.x/2.x/SDXL checkpoint
    (.safetensors, or .ckpt/.pt read with PyTorch's weights-only loader; see export/checkpoint.py),
    or an sdrt fp32 cpu-target folder with precision="int8": its UNet is quantized (no PyTorch
    needed) and the other files are copied.

    precision/target: fp32 + cpu (fused for the CPU provider), int8 + cpu (the same, with the
    UNet's convolutions statically quantized to int8 after calibration on fixed prompts and its
    matrix products dynamically quantized; see export/quantize.py), fp32 + cuda, or fp16 + cuda (fused for
    the CUDA provider, then converted to fp16; needs the CUDA provider to run).
    fp32_ops: operator types kept in fp32 in every fp16 graph; None: the family's defaults
    (DEFAULT_FP32_OPS: MultiHeadAttention in SD 2.x UNets), () none.
    fp32_vae_decoder: with fp16, also write an fp32 VAE decoder, which the pipeline uses for an
    image whose fp16 decoding overflows (NaN/Inf).
    memory_check: refuse to start when the machine's available memory is clearly below what the
    export needs (estimated from the models' weight sizes, see export/memory.py).
    prediction_type: "epsilon" or "v_prediction" for a single file whose tensors cannot tell
    (SD 2.x 512 eps vs 768 v; by default decided as A1111 decides it), or to override a folder's.
    vae: replace the model's VAE by an A1111-style VAE file or a diffusers AutoencoderKL folder;
    the manifest records its name and hash (the infotext's "VAE" and "VAE hash").
    int8_weight_max: with int8, the weights' range [-w, w]: 64 (the default) is exact on every CPU;
    127 is exact only where ONNX Runtime's int8 products accumulate in 32 bits (VNNI, AMX, ARM), and
    may saturate on other x86-64 CPUs (see export/quantize.py). 127 is there to measure the cost.
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
    if not 14 <= opset <= 20:
        raise ExportError(f"opset {opset} is not supported; accepted: 14 to 20")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ExportError(f"prediction type {prediction_type!r} is not supported; accepted: epsilon, v_prediction")
    from_file = src.is_file()
    from_folder = not from_file and (src / MANIFEST).is_file()
    tensors = index = None
    if from_folder:
        if precision != "int8" or target != "cpu":
            raise ExportError(f"{src} is an sdrt model folder: it can only be quantized (--precision int8, cpu target); "
                              "other precisions are exported from the diffusers folder")
        if vae is not None or prediction_type is not None:
            raise ExportError(f"{src} is an sdrt model folder: --vae and --prediction-type apply when exporting from "
                              "a checkpoint or a diffusers folder")
    elif from_file:
        from .checkpoint import TensorFile, detect

        tensors = TensorFile(src)
        detect(tensors, prediction_type)  # a file sdrt cannot export is refused here, before any big allocation
    else:
        if not src.exists() and src.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth"):
            raise ExportError(f"checkpoint {src} does not exist")
        index = _read_index(src)
    vae_file = None
    if vae is not None:
        from .checkpoint import VaeFile

        vae_file = VaeFile(Path(vae).expanduser())
    if out.exists() and not overwrite:
        raise ExportError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise ExportError("the output folder must differ from the source folder")
    if from_folder:
        weights = memory.onnx_folder_weight_bytes(src)
    elif from_file:
        from .checkpoint import file_weight_bytes

        weights = file_weight_bytes(tensors)
    else:
        weights = {c: _folder_weight_bytes(src / c) for c in _source_components(index)}
    if vae_file is not None:
        weights["vae"] = vae_file.fp32_bytes()
    need, avail, short = memory.shortfall(weights, precision, with_torch=not from_folder)
    if short and memory_check:
        raise ExportError(
            f"exporting {src.name} ({precision}, {target}) needs about {memory.gib(need)} of memory and "
            f"{memory.gib(avail)} is available: close other programs and retry, or pass --skip-memory-check to try anyway"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    tmp = _partial_name(out)
    tmp.mkdir()
    (tmp / INCOMPLETE_MARKER).write_text("export in progress\n")
    try:
        if from_folder:
            manifest = _quantize_into(src, tmp, int8_weight_max, log)
        else:
            if from_file:
                from .checkpoint import checkpoint_source

                source = checkpoint_source(src, prediction_type, log=log, tensors=tensors)
            else:
                source = (SDXLSource if sdxl.is_sdxl(index) else DiffusersSource)(src, index, prediction_type)
            source.vae_file = vae_file
            manifest = _export_into(source, tmp, precision, target, opset, fp32_ops, fp32_vae_decoder, check,
                                    int8_weight_max, log)
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
    log(f"peak memory {memory.gib(memory.peak_rss_bytes())} (estimated need {memory.gib(need)})")
    return out


def _free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except Exception:  # not glibc
        pass


def _export_into(source, tmp, precision, target, opset, fp32_ops, fp32_vae_decoder, check, int8_weight_max,
                 log) -> dict:
    """Export each model of `source` in turn: load it, trace its graphs (weights written to external
    data as they are traced), keep the module's outputs on the example inputs, free the module,
    then check, fuse and convert each graph one at a time with its weights on disk."""
    import torch

    from .graphs import check_graph, export_graph, reference_outputs
    from .loramap import fingerprints, write_map
    from .optimize import optimize_graph

    torch.set_grad_enabled(False)
    t0 = time.time()
    src, index = source.src, source.index
    prediction_type = source.scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ExportError(f"{src}: prediction_type {prediction_type!r} is not supported; accepted: epsilon, v_prediction")
    from sdrt.runtime.modelfolder import _family as family_of

    xl = getattr(source, "sdxl", False)
    vae_file = getattr(source, "vae_file", None)
    if vae_file is not None and vae_file.tf is not None:
        # A VAE file states no scaling factor: the model's applies (SDXL's 0.13025, SD's 0.18215),
        # as in A1111; an SDXL model's VAE file is taken to need fp32, as its own VAE does.
        vae_file.config.update({k: source.vae_config[k] for k in ("scaling_factor", "force_upcast") if k in source.vae_config})
    if xl:
        family = "sdxl"
        if vae_file is not None:
            sdxl.check_vae(vae_file.name, vae_file.config, ExportError)
    else:
        family = family_of(int(source.unet_config.get("cross_attention_dim", 1280)), source.tokenizer.pad_token,
                           prediction_type)
    # An SDXL VAE that overflows in fp16 (its config says force_upcast) stays fp32 in an fp16 folder,
    # as in diffusers; a VAE made for fp16 (--vae, force_upcast false) is converted like the others.
    vae_config = vae_file.config if vae_file is not None else source.vae_config
    fp32_graphs = {"vae_encoder", "vae_decoder"} if xl and precision == "fp16" and not sdxl.vae_in_fp16(vae_config) else set()
    if fp32_vae_decoder and fp32_graphs:
        raise ExportError("--fp32-vae-decoder: this SDXL VAE is kept fp32 already (its config says force_upcast)")
    kept_fp32 = {}
    checks, fused, precisions = {}, {}, {}
    configs = {}
    for component in source.COMPONENTS:
        module = vae_file.load() if component == "vae" and vae_file is not None else source.load(component)
        specs = _graph_specs(source, component, module)
        if component.startswith("text_encoder"):
            (tmp / component).mkdir()
            module.config.to_json_file(tmp / component / "config.json")
            configs[component] = module.config.to_dict()
        else:
            dirs = ("unet",) if component == "unet" else (
                ("vae_encoder", "vae_decoder") + ((FP32_VAE_DECODER,) if fp32_vae_decoder else ()))
            for d in dirs:
                module.save_config(tmp / d)
            configs[component] = dict(module.config)
        # LoRA-able weights of the UNet and text encoder, located in the final graphs below.
        prints = fingerprints(module, "text_model." if component == "text_encoder" else "", precision == "fp16") \
            if component in LORA_GRAPHS and precision != "int8" else None  # int8 folders take no LoRA
        staged = []
        for spec in specs:
            t = time.time()
            stage = tmp / "_fp32" / spec.name / "model.onnx"
            ref = reference_outputs(spec) if check else None
            export_graph(spec, stage, opset)
            staged.append((spec.name, stage, spec.inputs, spec.outputs, ref, time.time() - t))
        del module, specs, spec
        _free_memory()
        for name, stage, inputs, outputs, ref, t_export in staged:
            t = time.time()
            ops = tuple(DEFAULT_FP32_OPS.get((family, name), ())) if fp32_ops is None else tuple(fp32_ops)
            if precision == "fp16" and ops:
                kept_fp32[name] = list(ops)
            dst = tmp / name / "model.onnx"
            if check:
                checks[name] = check_graph(name, stage, inputs, outputs, ref)
                log(f"  {name}: fp32 ONNX vs PyTorch max abs diff {checks[name]:.3g}")
            # int8 graphs are quantized from their fused fp32 graph once the folder is complete (below).
            graph_precision = "fp32" if precision == "int8" or name in fp32_graphs else precision
            runs_here = check and target == "cpu" and graph_precision == "fp32"
            probe = stage.with_name("fused.onnx")
            fused[name] = optimize_graph(stage, dst, name, target, graph_precision, ops, probe if runs_here else None)
            precisions[name] = graph_precision if precision != "int8" or name not in INT8_GRAPHS else "int8"
            if runs_here:
                # The fused CPU graph must still compute the module's output.
                check_graph(name, probe if probe.exists() else dst, inputs, outputs, ref)
            if name == "vae_decoder" and fp32_vae_decoder:
                fused[FP32_VAE_DECODER] = optimize_graph(stage, tmp / FP32_VAE_DECODER / "model.onnx", name, target, "fp32")
                precisions[FP32_VAE_DECODER] = "fp32"
            shutil.rmtree(stage.parent)
            if prints is not None and graph_precision in ("fp32", "fp16"):
                lmap = write_map(prints, dst)
                if lmap["missing"]:
                    log(f"  {name}: {len(lmap['missing'])} LoRA-able weights not found in the graph "
                        f"(LoRAs on them are refused): {', '.join(lmap['missing'][:5])}")
            _free_memory()
            counts = ", ".join(f"{k} {v}" for k, v in sorted(fused[name].items())) or "none"
            log(f"  {name}: {graph_precision}/{target} graph written in {t_export + time.time() - t:.1f}s (fused: {counts})")
        del staged
    shutil.rmtree(tmp / "_fp32", ignore_errors=True)

    # Scheduler and tokenizer, in optimum's layout.
    source.write_scheduler(tmp / "scheduler")
    if xl:
        for name, tokenizer in source.tokenizers.items():
            _write_tokenizer(tokenizer, tmp / sdxl.tokenizer_folder(name))
        new_index = sdxl.index_entries(index)
    else:
        _write_tokenizer(source.tokenizer, tmp / "tokenizer")
        new_index = {k: v for k, v in index.items() if k != "vae"}
        for k in ("unet", "text_encoder", "vae_encoder", "vae_decoder"):
            new_index[k] = ["sdrt", "OnnxGraph"]
    (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2) + "\n")

    unet_cfg, vae_cfg = configs["unet"], configs["vae"]
    if xl:
        text_fields = sdxl.manifest_fields(index, configs)
    else:
        text_fields = {"text_hidden_size": int(configs["text_encoder"]["hidden_size"]),
                       "text_layers": int(configs["text_encoder"]["num_hidden_layers"])}
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "prediction_type": prediction_type,
        "unet_in_channels": int(unet_cfg["in_channels"]),
        "latent_channels": int(vae_cfg["latent_channels"]),
        "vae_scale_factor": 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        "vae_scaling_factor": float(vae_cfg["scaling_factor"]),
        "sample_size": int(unet_cfg["sample_size"]),
        **text_fields,
        "target": target,
        "precision": precisions,
        "opset": opset,
        "fp32_ops": kept_fp32,  # graph -> operator types kept fp32 in an fp16 graph
        "fused_operators": fused,
        "export_check_max_abs_diff": checks,
        "source": source.name,
        "versions": _versions(),
    }
    if getattr(source, "detected", None) is not None:
        from .checkpoint import sha256_and_short

        digest, short = sha256_and_short(src)
        # The file's A1111 short hash: the infotext's "Model hash" matches A1111's for the same file.
        manifest["source_file"] = {"name": src.name, "sha256": digest, "short_hash": short,
                                   "prediction_type_from": source.detected.how}
    if getattr(source, "vae_file", None) is not None:
        v = source.vae_file
        manifest["vae"] = {"name": v.name, "sha256": v.sha256, "short_hash": v.short_hash}
    assert set(GRAPHS[1:]) <= set(precisions)
    if precision == "int8":
        from .quantize import quantize_unet

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
            if p.is_dir():  # without LoRA maps: int8 folders take no LoRA
                from .loramap import MAP_FILE

                shutil.copytree(p, tmp / p.name, ignore=shutil.ignore_patterns(MAP_FILE))
            else:
                shutil.copy2(p, tmp / p.name)
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
