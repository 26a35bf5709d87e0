"""Single-file Stable Diffusion checkpoints (the CompVis / A1111 / ComfyUI layout), offline.

    model.diffusion_model.*      UNet (LDM names: input_blocks, middle_block, output_blocks)
    first_stage_model.*          VAE (encoder.down.N.block.M, mid.attn_1, decoder.up.N, ...)
    cond_stage_model.transformer.text_model.*   SD 1.x text encoder (CLIP ViT-L, Hugging Face names)
    cond_stage_model.model.*     SD 2.x text encoder (OpenCLIP ViT-H: transformer.resblocks.N)
    conditioner.embedders.N.*    SDXL's text encoders (export/checkpoint_sdxl.py)

The family, the UNet's input channels, the text encoder and every size are read from the
tensors' names and shapes (as A1111's and ComfyUI's model detection do); what tensors cannot
tell (attention heads, activations, the noise schedule) comes from the family's configs shipped
in models/checkpoint-configs. SD 2.x's prediction type is decided as A1111 decides it (the UNet's
output on a fixed input at t=999) unless given; an SD 2.x inpainting UNet is epsilon.

Only tensors are read: .safetensors files directly (preferred), .ckpt/.pt pickles only through
PyTorch's weights-only loader, which refuses a file that needs anything beyond tensors and plain
containers instead of running code from it. Each model's tensors are read, converted to fp32 and
put into its module one model at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "checkpoint-configs"
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "clip-tokenizer"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ACCEPTED = "a single-file SD 1.x / 2.x / SDXL checkpoint (.safetensors preferred, or .ckpt/.pt)"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."

_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
           "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _error(msg: str):
    from . import ExportError

    return ExportError(msg)


def sha256_and_short(path: Path) -> tuple[str, str]:
    """The file's sha256 and A1111's short hash of it (its first 10 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    digest = h.hexdigest()
    return digest, digest[:10]


class TensorFile:
    """The tensors of a checkpoint file, read one at a time.

    keys(), shape(key) and numel come from the file's header (safetensors) or its tensor index
    (a weights-only, memory-mapped pickle), without reading tensor data; get(key) reads one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if not self.path.is_file():
            raise _error(f"{self.path} does not exist or is not a file (accepted: {ACCEPTED}, or a diffusers folder)")
        if suffix in SAFETENSORS_SUFFIXES:
            self._entries, self._data_start = _safetensors_header(self.path)
            self._shapes = {k: e[1] for k, e in self._entries.items()}
            self._sd = None
        elif suffix in PICKLE_SUFFIXES:
            self._sd = _load_pickle(self.path)
            self._shapes = {k: tuple(v.shape) for k, v in self._sd.items()}
        else:
            raise _error(f"{self.path.name}: unrecognised file type {suffix or '(none)'}; accepted: {ACCEPTED}")

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def numel(self, prefix: str = "") -> int:
        total = 0
        for k, s in self._shapes.items():
            if k.startswith(prefix):
                n = 1
                for d in s:
                    n *= int(d)
                total += n
        return total

    def get(self, key: str):
        """The tensor `key` as fp32 (a fresh tensor: the file's dtype may be fp16 or bf16)."""
        import torch

        if self._sd is not None:
            t = self._sd[key]
            return t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()
        # Read with plain file reads, not a memory map: mapped file pages would count as this
        # process's memory for as long as the file stays open.
        dtype, shape, start, stop = self._entries[key]
        buf = bytearray(stop - start)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            if f.readinto(buf) != len(buf):
                raise _error(f"{self.path.name} is truncated (tensor {key} ends past the end of the file)")
        if not buf:
            return torch.zeros(shape, dtype=_TORCH_DTYPES[dtype]())
        t = torch.frombuffer(buf, dtype=_TORCH_DTYPES[dtype]()).reshape(shape)
        return t.to(torch.float32) if t.is_floating_point() else t

    def close(self) -> None:
        self._sd = None


def _torch_dtype(name: str):
    def get():
        import torch

        return getattr(torch, name)

    return get


_TORCH_DTYPES = {k: _torch_dtype(v) for k, v in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}.items()}


def _safetensors_header(path: Path) -> tuple[dict[str, tuple], int]:
    """{name: (dtype, shape, start, stop)} from a safetensors header, and where the data begins;
    the header is checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _error(f"{path.name} is not a safetensors file (shorter than a header); accepted: {ACCEPTED}")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(size - 8, 100 << 20):
            raise _error(f"{path.name} is not a safetensors file (its header length {n} does not fit the file's "
                         f"{size} bytes: truncated or another format); accepted: {ACCEPTED}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise _error(f"{path.name} is not a safetensors file (its header is not JSON); accepted: {ACCEPTED}") from None
    if not isinstance(header, dict):
        raise _error(f"{path.name} is not a safetensors file (unexpected header); accepted: {ACCEPTED}")
    shapes, end = {}, 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = v["dtype"], v["shape"], v["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            if stop - start != count * _DTYPES[dtype]:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _error(f"{path.name}: the safetensors header describes tensor {k!r} inconsistently; "
                         f"accepted: {ACCEPTED}") from None
        if dtype not in _TORCH_DTYPES:
            raise _error(f"{path.name}: tensor {k!r} has dtype {dtype}, which sdrt does not read; accepted: {ACCEPTED}")
        shapes[k] = (dtype, tuple(int(d) for d in shape), int(start), int(stop))
        end = max(end, int(stop))
    if 8 + n + end > size:
        raise _error(f"{path.name} is truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return shapes, 8 + n


def _load_pickle(path: Path) -> dict:
    """A .ckpt/.pt state dict through PyTorch's weights-only loader (memory-mapped when the file
    is in the zip format), unwrapped from a "state_dict" entry."""
    import pickle
    import zipfile

    import torch

    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = load(False)  # the legacy (pre-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
        detail = " ".join((m.group(1) if m else str(e).strip().splitlines()[0]).split())
        if "Unsupported global" not in detail:
            raise _error(f"{path.name} cannot be read as a PyTorch checkpoint (truncated or another format: "
                         f"{detail[:200]}); accepted: {ACCEPTED}") from None
        what = re.search(r"GLOBAL (\S+)", detail)
        raise _error(
            f"{path.name} was refused: it holds Python objects ({what.group(1) if what else 'beyond tensors'}) "
            "that only a full unpickler, which can run code from the file, would load; sdrt reads pickle "
            "checkpoints only through PyTorch's weights-only loader. Use the .safetensors release of the model, "
            "or convert the file with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else e.__class__.__name__
        raise _error(f"{path.name} cannot be read as a PyTorch checkpoint (truncated or another format: "
                     f"{first[:200]}); accepted: {ACCEPTED}") from None
    if isinstance(obj, dict) and "string_to_param" in obj:
        raise _error(f"{path.name} is a textual-inversion embedding, not a Stable Diffusion checkpoint; accepted: {ACCEPTED}")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _error(f"{path.name} holds a {type(obj).__name__}, not a state dict; accepted: {ACCEPTED}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise _error(f"{path.name} holds no tensors; accepted: {ACCEPTED}")
    return sd


# ------------------------------------------------------------------------------ recognition

@dataclass(frozen=True)
class Detected:
    family: str  # "sd1", "sd2", "sdxl" or "sdxl-refiner"
    in_channels: int
    prediction_type: str | None  # None: to be decided from the UNet's output (SD 2.x, 4 channels)
    how: str  # how the prediction type was decided (for the log)
    has_ema: bool
    zero_snr: bool = False  # the file's "ztsnr" marker: trained with a zero-terminal-SNR schedule

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self.family]

    @property
    def configs(self) -> str:
        """The folder of models/checkpoint-configs with this family's configs (a refiner's are SDXL's)."""
        return "sdxl" if self.family.startswith("sdxl") else self.family


FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}


_CLIP_L_RENAMES = (  # older SD 1.x files name the CLIP keys without "text_model." (A1111 renames them)
    ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.", "cond_stage_model.transformer.text_model.final_layer_norm."),
)


def _lora_tensors(keys) -> int:
    parts = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".hada_w1_a", ".lokr_w1")
    return sum(1 for k in keys if k.startswith(("lora_unet_", "lora_te")) or any(p in k for p in parts))


def _other_model(tf: TensorFile) -> str | None:
    """What a file that is not a Stable Diffusion checkpoint holds, when its tensors say (the names
    A1111's sd_models_config and ComfyUI's model_detection look at), else None; after a ";", what
    to do instead."""
    keys = tf.keys()

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    lora = _lora_tensors(keys)
    checks = (
        (lora, f"a LoRA ({lora} of {len(keys)} tensors are LoRA weights)"),
        (keys and set(keys) <= {"emb_params", "clip_l", "clip_g"}, "a textual-inversion embedding"),
        (has("control_model.") or any(".input_hint_block." in k for k in keys), "a ControlNet"),
        (has("model.diffusion_model.joint_blocks.", "joint_blocks.", "text_encoders.t5xxl.")
         or "model.diffusion_model.x_embedder.proj.weight" in tf, "a Stable Diffusion 3 checkpoint"),
        (has("double_blocks.", "model.diffusion_model.double_blocks."), "a Flux checkpoint"),
        (has("embedder.model.", "noise_augmentor."), "an SD 2.x unCLIP checkpoint"),
        (has("depth_model."), "an SD 2.x depth checkpoint"),
        (has("cond_stage_model.roberta."), "an AltDiffusion checkpoint"),
        (has("encoder.conv_in.", "first_stage_model.encoder.conv_in.") and not has(UNET),
         f"a VAE ({len(keys)} tensors); pass a VAE with --vae beside a checkpoint"),
        (has("down_blocks.", "text_model.", "encoder.down_blocks.") and not has(UNET),
         "a model in diffusers' layout (down_blocks.*, text_model.*); export the diffusers folder it belongs to"),
    )
    return next((what for hit, what in checks if hit), None)


def recognise(tf: TensorFile) -> str:
    """The family of a checkpoint ("sd1", "sd2", "sdxl" or "sdxl-refiner"); anything else is
    refused with what was recognised."""
    keys, name = tf.keys(), tf.path.name
    other = _other_model(tf)
    if other:
        what, _, hint = other.partition("; ")
        raise _error(f"{name} is {what}, not a checkpoint sdrt exports; {hint or 'accepted: ' + ACCEPTED}")
    if "model.diffusion_model.input_blocks.0.0.weight" not in tf:
        raise _error(f"{name} is not a Stable Diffusion checkpoint (no UNet under {UNET!r}; {len(keys)} tensors, "
                     f"e.g. {', '.join(keys[:3])}); accepted: {ACCEPTED}")
    if UNET + "label_emb.0.0.weight" in tf:
        from .checkpoint_sdxl import recognise_sdxl

        return recognise_sdxl(tf)
    missing = [what for what, prefix in (("VAE", VAE), ("text encoder", "cond_stage_model.")) if not
               any(k.startswith(prefix) for k in keys)]
    if missing:
        raise _error(f"{name} holds a UNet without a {' or '.join(missing)} (a UNet-only file); accepted: {ACCEPTED}")
    if any(k.startswith(OPEN_CLIP + "transformer.resblocks.") for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_L) for k in keys):
        return "sd1"
    raise _error(f"{name}: unknown text encoder (neither CLIP under {CLIP_L!r} nor OpenCLIP under {OPEN_CLIP!r}); "
                 f"sdrt exports SD 1.x, 2.x and SDXL")


def detect(tf: TensorFile, prediction_type: str | None = None) -> Detected:
    family = recognise(tf)
    in_channels = tf.shape("model.diffusion_model.input_blocks.0.0.weight")[1]
    if in_channels not in (4, 9):
        what = {8: " (an InstructPix2Pix checkpoint)", 5: " (a depth checkpoint)"}.get(in_channels, "")
        raise _error(f"{tf.path.name}: an {FAMILY_LABELS[family]} UNet with {in_channels} input channels{what}; "
                     "accepted: 4, or 9 for inpainting")
    context = _unet_context_dim(tf)
    if family in ("sd1", "sd2") and (family, context) not in (("sd1", 768), ("sd2", 1024)) and context in (768, 1024):
        raise _error(f"{tf.path.name}: an {family} text encoder with a UNet for {context}-wide text; not a checkpoint sdrt knows")
    has_ema = sum(k.startswith("model_ema.") for k in tf.keys()) > 100
    if prediction_type is not None:
        how = "given"
    elif "v_pred" in tf:
        prediction_type, how = "v_prediction", "the file's v_pred marker"
    elif family != "sd2" or in_channels == 9:
        prediction_type, how = "epsilon", f"{'inpainting ' if in_channels == 9 else ''}{FAMILY_LABELS[family]}"
    else:
        how = "A1111's test of the UNet's output"
    return Detected(family, in_channels, prediction_type, how, has_ema, zero_snr="ztsnr" in tf)


def _unet_context_dim(tf: TensorFile) -> int:
    for k in tf.keys():
        if k.startswith(UNET) and k.endswith("attn2.to_k.weight"):
            return tf.shape(k)[1]
    raise _error(f"{tf.path.name}: the UNet has no cross-attention; not a Stable Diffusion checkpoint")


# ------------------------------------------------------------------------------ configs from shapes

def _template(family: str, part: str) -> dict:
    return json.loads((CONFIG_DIR / family / f"{part}.json").read_text(encoding="utf-8"))


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def unet_config(tf: TensorFile, det: Detected) -> dict:
    """diffusers UNet2DConditionModel config: sizes from the tensors, the rest from the family."""
    keys = [k[len(UNET):] for k in tf.keys() if k.startswith(UNET)]
    cfg = _template(det.configs, "unet")
    w_in = tf.shape(UNET + "input_blocks.0.0.weight")
    cfg["in_channels"] = int(w_in[1])
    cfg["out_channels"] = int(tf.shape(UNET + "out.2.weight")[0])
    levels, current = [], []
    for i in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in keys:
            levels.append(current)
            current = []
            continue
        out_ch = tf.shape(UNET + f"input_blocks.{i}.0.out_layers.3.weight")[0]
        depth = len(_indices(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        current.append((int(out_ch), f"input_blocks.{i}.1.proj_in.weight" in keys, depth))
    levels.append(current)
    layers = {len(lv) for lv in levels}
    if len(layers) != 1:
        raise _error(f"{tf.path.name}: UNet levels of different depths ({sorted(layers)}); not a Stable Diffusion UNet")
    cfg["layers_per_block"] = layers.pop()
    cfg["block_out_channels"] = [lv[0][0] for lv in levels]
    attn = [lv[0][1] for lv in levels]
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    cfg["cross_attention_dim"] = _unet_context_dim(tf)
    proj = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    cfg["use_linear_projection"] = proj is not None and len(tf.shape(UNET + proj)) == 2
    # Transformer blocks per level (SDXL: 1, 2, 10 from the top; SD 1.x/2.x: 1); 1 where a level has no attention.
    depths = [lv[0][2] or 1 for lv in levels]
    cfg["transformer_layers_per_block"] = depths[0] if len(set(depths)) == 1 else depths
    if cfg.pop("head_channels", None):  # SD 2.x and SDXL: 64 channels per head
        cfg["attention_head_dim"] = [max(1, c // 64) for c in cfg["block_out_channels"]]
    if det.family == "sd2" and det.prediction_type == "v_prediction" and det.in_channels == 4:
        cfg["sample_size"] = 96
    return cfg


def vae_config(tf: TensorFile, prefix: str, configs: str = "common") -> dict:
    """diffusers AutoencoderKL config: sizes from the tensors, scale and the rest from `configs`'s vae.json."""
    keys = [k[len(prefix):] for k in tf.keys() if k.startswith(prefix)]
    cfg = _template(configs, "vae")
    down = _indices(keys, r"encoder\.down\.(\d+)\.")
    cfg["block_out_channels"] = [int(tf.shape(prefix + f"encoder.down.{i}.block.0.conv1.weight")[0]) for i in down]
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * len(down)
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * len(down)
    cfg["layers_per_block"] = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    cfg["latent_channels"] = int(tf.shape(prefix + "decoder.conv_in.weight")[1])
    cfg["in_channels"] = int(tf.shape(prefix + "encoder.conv_in.weight")[1])
    cfg["out_channels"] = int(tf.shape(prefix + "decoder.conv_out.weight")[0])
    return cfg


def text_config(tf: TensorFile, family: str) -> dict:
    if family == "sd1":
        return clip_config(tf, CLIP_L, _template(family, "text_encoder"))
    # SD 2.x conditions on the penultimate layer (then ln_final): the last block is not used.
    return open_clip_config(tf, OPEN_CLIP, _template(family, "text_encoder"), skip_last=True)


def clip_config(tf: TensorFile, prefix: str, cfg: dict) -> dict:
    """CLIPTextConfig fields of a CLIP ViT-L stored in Hugging Face's layout under `prefix`."""
    p = prefix + "text_model."
    emb = tf.shape(_clip_key(tf, p + "embeddings.token_embedding.weight"))
    pos = tf.shape(_clip_key(tf, p + "embeddings.position_embedding.weight"))
    layers = _indices([_rename_clip(k) for k in tf.keys()], re.escape(p) + r"encoder\.layers\.(\d+)\.")
    fc1 = tf.shape(_clip_key(tf, p + "encoder.layers.0.mlp.fc1.weight"))
    return _sized(cfg, emb, pos, fc1, len(layers))


def open_clip_config(tf: TensorFile, prefix: str, cfg: dict, skip_last: bool) -> dict:
    """CLIPTextConfig fields of an OpenCLIP text tower under `prefix`; skip_last: its last block unused."""
    emb = tf.shape(prefix + "token_embedding.weight")
    pos = tf.shape(prefix + "positional_embedding")
    blocks = _indices(tf.keys(), re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    fc1 = tf.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")
    cfg = _sized(cfg, emb, pos, fc1, len(blocks) - skip_last)
    if prefix + "text_projection" in tf:  # OpenCLIP's (width, projection) matrix
        cfg["projection_dim"] = int(tf.shape(prefix + "text_projection")[1])
    return cfg


def _sized(cfg: dict, emb, pos, fc1, layers: int) -> dict:
    """`cfg` with the sizes read from the tensors (heads: one per 64 channels, as in every CLIP here)."""
    hidden = int(emb[1])
    return {**cfg, "vocab_size": int(emb[0]), "hidden_size": hidden, "max_position_embeddings": int(pos[0]),
            "intermediate_size": int(fc1[0]), "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "projection_dim": hidden}


def _rename_clip(k: str) -> str:
    for old, new in _CLIP_L_RENAMES:
        if k.startswith(old):
            return new + k[len(old):]
    return k


def _clip_key(tf: TensorFile, key: str) -> str:
    """The name `key` (with "text_model.") has in this file (older files lack "text_model.")."""
    if key in tf:
        return key
    for old, new in _CLIP_L_RENAMES:
        if key.startswith(new) and old + key[len(new):] in tf:
            return old + key[len(new):]
    raise _error(f"{tf.path.name}: the CLIP text encoder lacks {key}; the file is incomplete")


# ------------------------------------------------------------------------------ key maps

def unet_key_map(tf: TensorFile, cfg: dict) -> dict[str, str]:
    """diffusers UNet key -> the file's key."""
    keys = [k[len(UNET):] for k in tf.keys() if k.startswith(UNET)]
    per = cfg["layers_per_block"]
    m = {}

    def resnet(src: str, dst: str):
        for k in keys:
            if k.startswith(src + "."):
                rest = k[len(src) + 1:]
                rest = (rest.replace("in_layers.0", "norm1").replace("in_layers.2", "conv1")
                        .replace("out_layers.0", "norm2").replace("out_layers.3", "conv2")
                        .replace("emb_layers.1", "time_emb_proj").replace("skip_connection", "conv_shortcut"))
                m[f"{dst}.{rest}"] = UNET + k

    def same(src: str, dst: str):
        for k in keys:
            if k.startswith(src + "."):
                m[dst + k[len(src):]] = UNET + k

    top = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
           ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    if "label_emb.0.0.weight" in keys:  # SDXL's added (pooled text + time ids) embedding
        top += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    for d, s in top:
        for p in ("weight", "bias"):
            m[f"{d}.{p}"] = UNET + f"{s}.{p}"
    for i in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
        block, layer = (i - 1) // (per + 1), (i - 1) % (per + 1)
        if f"input_blocks.{i}.0.op.weight" in keys:
            same(f"input_blocks.{i}.0.op", f"down_blocks.{block}.downsamplers.0.conv")
            continue
        resnet(f"input_blocks.{i}.0", f"down_blocks.{block}.resnets.{layer}")
        same(f"input_blocks.{i}.1", f"down_blocks.{block}.attentions.{layer}")
    resnet("middle_block.0", "mid_block.resnets.0")
    same("middle_block.1", "mid_block.attentions.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    for i in _indices(keys, r"output_blocks\.(\d+)\."):
        block, layer = i // (per + 1), i % (per + 1)
        resnet(f"output_blocks.{i}.0", f"up_blocks.{block}.resnets.{layer}")
        if f"output_blocks.{i}.1.conv.weight" in keys:
            same(f"output_blocks.{i}.1.conv", f"up_blocks.{block}.upsamplers.0.conv")
        else:
            same(f"output_blocks.{i}.1", f"up_blocks.{block}.attentions.{layer}")
        same(f"output_blocks.{i}.2.conv", f"up_blocks.{block}.upsamplers.0.conv")
    return m


def vae_key_map(tf: TensorFile, prefix: str, cfg: dict) -> dict[str, str]:
    keys = [k[len(prefix):] for k in tf.keys() if k.startswith(prefix)]
    n = len(cfg["block_out_channels"])
    m = {}

    def take(src: str, dst: str, attention: bool = False):
        for k in keys:
            if k.startswith(src + "."):
                rest = k[len(src) + 1:].replace("nin_shortcut", "conv_shortcut")
                if attention:
                    rest = {"norm.weight": "group_norm.weight", "norm.bias": "group_norm.bias",
                            "proj_out.weight": "to_out.0.weight", "proj_out.bias": "to_out.0.bias"}.get(
                        rest, re.sub(r"^([qkv])\.", r"to_\1.", rest))
                m[f"{dst}.{rest}"] = prefix + k

    for part in ("encoder", "decoder"):
        for d, s in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            take(f"{part}.{s}", f"{part}.{d}")
        take(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        take(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        take(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", attention=True)
    for i in range(n):
        take(f"encoder.down.{i}.block", f"encoder.down_blocks.{i}.resnets")
        take(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        j = n - 1 - i
        take(f"decoder.up.{j}.block", f"decoder.up_blocks.{i}.resnets")
        take(f"decoder.up.{j}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    take("quant_conv", "quant_conv")
    take("post_quant_conv", "post_quant_conv")
    return m


def clip_key_map(tf: TensorFile, prefix: str = CLIP_L) -> dict[str, str]:
    m = {}
    for k in tf.keys():
        r = _rename_clip(k)
        if r.startswith(prefix + "text_model.") and not r.endswith("position_ids"):
            m[r[len(prefix):]] = k
    return m


_OPEN_CLIP_RENAMES = ((".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".mlp.c_fc.", ".mlp.fc1."),
                      (".mlp.c_proj.", ".mlp.fc2."), (".attn.out_proj.", ".self_attn.out_proj."))


def open_clip_key_map(tf: TensorFile, layers: int, prefix: str = OPEN_CLIP) -> dict[str, str | tuple[str, int | str]]:
    """transformers CLIPTextModel(WithProjection) key -> the file's key, or (key, part) for a third
    of a packed q/k/v, or (key, "T") for OpenCLIP's projection matrix (a Linear weight transposed)."""
    m: dict[str, str | tuple[str, int | str]] = {
        "text_model.embeddings.token_embedding.weight": prefix + "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": prefix + "positional_embedding",
        "text_model.final_layer_norm.weight": prefix + "ln_final.weight",
        "text_model.final_layer_norm.bias": prefix + "ln_final.bias",
    }
    if prefix + "text_projection" in tf:  # used by SDXL's (CLIPTextModelWithProjection), not by SD 2.x's
        m["text_projection.weight"] = (prefix + "text_projection", "T")
    for i in range(layers):
        src = prefix + f"transformer.resblocks.{i}."
        for k in tf.keys():
            if not k.startswith(src):
                continue
            rest = "." + k[len(src):]
            dst = f"text_model.encoder.layers.{i}"
            if rest in (".attn.in_proj_weight", ".attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    m[f"{dst}.self_attn.{name}.{kind}"] = (k, part)
                continue
            for old, new in _OPEN_CLIP_RENAMES:
                rest = rest.replace(old, new)
            m[dst + rest] = k
    return m


def fill_module(module, tf: TensorFile, key_map: dict, what: str) -> None:
    """Put the file's tensors into `module` (built on the meta device) one at a time, in fp32."""
    import torch

    want = dict(module.state_dict())
    key_map = _module_names(want, key_map)
    _refuse_missing(tf, want, key_map, what)
    state = {}
    for dst, src in key_map.items():
        if dst not in want:
            continue
        if isinstance(src, tuple) and src[1] == "T":
            t = tf.get(src[0]).T.contiguous()
        elif isinstance(src, tuple):
            full = tf.get(src[0])
            third = full.shape[0] // 3
            t = full[src[1] * third:(src[1] + 1) * third].clone()
            del full
        else:
            t = tf.get(src)
        shape = tuple(want[dst].shape)
        if tuple(t.shape) != shape:
            _check_shape(tf, src, shape, dst, what)
            t = t.reshape(shape)  # 1x1 convolutions stored for linear layers (VAE attention)
        state[dst] = t
    for k in want:
        if k.endswith("position_ids") and k not in state:
            state[k] = torch.arange(want[k].shape[-1]).expand(want[k].shape).clone()
    module.load_state_dict(state, strict=True, assign=True)


def _module_names(want: dict, key_map: dict) -> dict:
    if not any(k.startswith("text_model.") for k in want) and any(k.startswith("text_model.") for k in key_map):
        # transformers 5.6+ names CLIPTextModel's weights without "text_model."
        return {k.removeprefix("text_model."): v for k, v in key_map.items()}
    return key_map


def _refuse_missing(tf: TensorFile, want: dict, key_map: dict, what: str) -> None:
    missing = sorted(k for k in want if k not in key_map and not k.endswith("position_ids"))
    if missing:
        raise _error(f"{tf.path.name}: the {what} lacks {len(missing)} tensors (e.g. {missing[0]}); the file is "
                     "incomplete or not a checkpoint of the family it appears to be")


def check_complete(source) -> None:
    """Refuse a file that lacks tensors any of its models needs, before any tensor is read (the
    modules are built on the meta device)."""
    for component in source.COMPONENTS:
        module, key_map, what = source.module(component)
        want = dict(module.state_dict())
        key_map = _module_names(want, key_map)
        _refuse_missing(source.tf, want, key_map, what)
        for dst, src in key_map.items():
            if dst in want:
                _check_shape(source.tf, src, tuple(want[dst].shape), dst, what)


def _file_shape(tf: TensorFile, src) -> tuple[int, ...]:
    """The shape of what key-map entry `src` reads from the file."""
    if isinstance(src, str):
        return tuple(tf.shape(src))
    shape = tuple(tf.shape(src[0]))
    return shape[::-1] if src[1] == "T" else (shape[0] // 3, *shape[1:])


def _check_shape(tf: TensorFile, src, shape: tuple[int, ...], dst: str, what: str) -> None:
    got = _file_shape(tf, src)
    # 1x1 convolutions stored for linear layers (the VAE's attention) are read as the linear weight.
    if got != shape and not (math.prod(got) == math.prod(shape) and len(got) > len(shape)):
        raise _error(f"{tf.path.name}: {src if isinstance(src, str) else src[0]} has shape {got}, the {what} "
                     f"expects {shape} for {dst}")


def load_module(source, component: str):
    """`component` of a checkpoint source, its weights read from the file in fp32."""
    module, key_map, what = source.module(component)
    fill_module(module, source.tf, key_map, what)
    return module.eval()


# ------------------------------------------------------------------------------ the export source

def is_v_prediction_a1111(unet) -> bool:
    """A1111's test for an SD 2.x v-prediction UNet: its output at t=999 on a constant input (0.5
    everywhere, context 0.5) minus that input has a mean below -1."""
    import torch

    cross = unet.config.cross_attention_dim
    with torch.no_grad():
        x = torch.ones((1, 4, 8, 8)) * 0.5
        out = unet(x, torch.tensor([999]), encoder_hidden_states=torch.ones((1, 2, cross)) * 0.5).sample
        return float((out - x).mean()) < -1


def build_module(component: str, config: dict):
    """A diffusers/transformers module for `config` with its parameters on the meta device (no
    memory, no random init; fill_module assigns them) and its buffers computed as usual."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig(**config))


def tokenizer_for(family: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"),
                         pad_token="!" if family == "sd2" else "<|endoftext|>", model_max_length=77)


class FileSource:
    """What the export sources of single files share: each model built from the file's tensors,
    one model at a time (subclasses give configs, `_text_module` and the scheduler config)."""

    def module(self, component: str):
        """(the module on the meta device, its key map, what it is called in messages)"""
        if component == "unet":
            return build_module("unet", self.unet_config), unet_key_map(self.tf, self.unet_config), "UNet"
        if component == "vae":
            return build_module("vae", self.vae_config), vae_key_map(self.tf, VAE, self.vae_config), "VAE"
        return self._text_module(component)

    def load(self, component: str):
        return load_module(self, component)

    def write_scheduler(self, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2) + "\n")


class CheckpointSource(FileSource):
    """An SD 1.x/2.x single-file checkpoint as an export source (the interface of export.DiffusersSource)."""

    def __init__(self, path: Path, prediction_type: str | None = None, log=print, tensors: TensorFile | None = None):
        from transformers import CLIPTextConfig

        self.path = self.src = Path(path)
        self.tf = tensors if tensors is not None else TensorFile(self.path)
        det = detect(self.tf, prediction_type)
        self.detected = det
        self.name = self.path.name
        self.unet_config = unet_config(self.tf, det)
        self.vae_config = vae_config(self.tf, VAE)
        self._text = text_config(self.tf, det.family)
        self.text_config = CLIPTextConfig(**self._text)
        self.tokenizer = tokenizer_for(det.family)
        self.COMPONENTS = ("text_encoder", "unet", "vae")
        self._cached = {}
        check_complete(self)
        how = det.how
        if det.prediction_type is None:
            # Decided from the UNet's output; the UNet is then exported first, from this load.
            unet = self.load("unet")
            pred = "v_prediction" if is_v_prediction_a1111(unet) else "epsilon"
            self._cached["unet"] = unet
            self.COMPONENTS = ("unet", "text_encoder", "vae")
            det = replace(det, prediction_type=pred)
            self.detected = det
            if pred == "v_prediction" and det.in_channels == 4:
                self.unet_config["sample_size"] = 96
                unet.register_to_config(sample_size=96)
        self.scheduler_config = scheduler_config(det)
        inpaint = det.in_channels == 9
        self.index = {
            "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
            "scheduler": ["diffusers", self.scheduler_config["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
        }
        text = "OpenCLIP ViT-H text encoder" if det.family == "sd2" else "CLIP ViT-L text encoder"
        ema = "; the file also holds EMA weights (model_ema.*): the UNet weights under model.diffusion_model are used, as A1111 does" if det.has_ema else ""
        log(f"  {self.name}: SD {det.family[-1]}.x{' inpainting' if inpaint else ''}, {det.in_channels}-channel UNet, "
            f"{det.prediction_type} ({how}), {text}{ema}")

    def _text_module(self, component: str):
        if self.detected.family == "sd2":
            keys = open_clip_key_map(self.tf, self._text["num_hidden_layers"])
        else:
            keys = clip_key_map(self.tf)
        return build_module("text_encoder", self._text), keys, "text encoder"

    def load(self, component: str):
        if component in self._cached:
            return self._cached.pop(component)
        return super().load(component)


def checkpoint_source(path: Path, prediction_type: str | None = None, log=print, tensors: TensorFile | None = None):
    """The export source of a single-file checkpoint: CheckpointSource, or SDXLCheckpointSource."""
    tf = tensors if tensors is not None else TensorFile(path)
    if detect(tf, prediction_type).family.startswith("sdxl"):
        from .checkpoint_sdxl import SDXLCheckpointSource

        return SDXLCheckpointSource(path, prediction_type, log=log, tensors=tf)
    return CheckpointSource(path, prediction_type, log=log, tensors=tf)


def file_weight_bytes(tf: TensorFile) -> dict[str, int]:
    """fp32 bytes of each model in the file (for the export's memory estimate)."""
    return {"unet": 4 * tf.numel(UNET), "vae": 4 * tf.numel(VAE),
            "text_encoder": 4 * (tf.numel("cond_stage_model.") + tf.numel("conditioner."))}


def scheduler_config(det: Detected) -> dict:
    """The family's training schedule with the file's prediction type (and, for a file marked
    "ztsnr", the zero-terminal-SNR rescaling, as ComfyUI reads that marker)."""
    cfg = {**_template(det.configs, "scheduler"), "prediction_type": det.prediction_type}
    if det.zero_snr:
        cfg["rescale_betas_zero_snr"] = True
    return cfg


class VaeFile:
    """A replacement VAE: an A1111-style single file (encoder.* / decoder.*, or under
    first_stage_model.) or a diffusers AutoencoderKL folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_dir():
            cfg = self.path / "config.json"
            if not cfg.is_file() and (self.path / "vae" / "config.json").is_file():
                self.path = self.path / "vae"
                cfg = self.path / "config.json"
            if not cfg.is_file():
                raise _error(f"--vae {path}: a folder without config.json; accepted: a VAE file (.safetensors, "
                             ".ckpt/.pt) or a diffusers AutoencoderKL folder")
            config = json.loads(cfg.read_text(encoding="utf-8"))
            if config.get("_class_name") != "AutoencoderKL":
                raise _error(f"--vae {path}: the folder holds a {config.get('_class_name')}, not an AutoencoderKL")
            weights = sorted(self.path.glob("diffusion_pytorch_model*.safetensors")) or sorted(self.path.glob("*.bin"))
            if not weights:
                raise _error(f"--vae {path}: the folder has no weights (diffusion_pytorch_model.safetensors)")
            self.tf, self.config, self.hash_file = None, config, weights[0]
            self.name = Path(path).name
        else:
            self.tf = TensorFile(self.path)
            keys = self.tf.keys()
            if any(k.startswith(UNET) for k in keys):
                raise _error(f"--vae {self.path.name} is a full checkpoint, not a VAE file; accepted: an A1111-style "
                             "VAE (.safetensors, .ckpt/.pt) or a diffusers AutoencoderKL folder")
            if any(k.startswith("encoder.down_blocks.") for k in keys):
                raise _error(f"--vae {self.path.name} is a VAE in diffusers' layout: pass its folder (with "
                             "config.json) instead; accepted: an A1111-style VAE (.safetensors, .ckpt/.pt) or a "
                             "diffusers AutoencoderKL folder")
            self.prefix = VAE if any(k.startswith(VAE) for k in keys) else ""
            if self.prefix + "encoder.conv_in.weight" not in self.tf or self.prefix + "decoder.conv_in.weight" not in self.tf:
                raise _error(f"--vae {self.path.name}: not a VAE file ({len(keys)} tensors without encoder.conv_in / "
                             "decoder.conv_in); accepted: an A1111-style VAE (.safetensors, .ckpt/.pt) or a diffusers "
                             "AutoencoderKL folder")
            self.config = vae_config(self.tf, self.prefix)
            self.hash_file = self.path
            self.name = self.path.name
        self.sha256, self.short_hash = sha256_and_short(self.hash_file)

    def load(self):
        if self.tf is None:
            from diffusers import AutoencoderKL
            import torch

            return AutoencoderKL.from_pretrained(self.path, local_files_only=True, torch_dtype=torch.float32).eval()
        m = build_module("vae", self.config)
        fill_module(m, self.tf, vae_key_map(self.tf, self.prefix, self.config), "VAE")
        return m.eval()

    def fp32_bytes(self) -> int:
        if self.tf is not None:
            return 4 * self.tf.numel(self.prefix)
        from . import _folder_weight_bytes

        return _folder_weight_bytes(self.path)
