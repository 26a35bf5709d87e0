"""LoRAs at run time: `<lora:NAME:WEIGHT>` in the prompt, merged into the graphs' weights in NumPy.

A LoRA file holds, per layer, a low-rank update: W' = W + multiplier * alpha / rank * up @ down.
The export records where each layer's weight W lives in the UNet and text encoder graphs
(`lora_map.json`, see sdrt.export.loramap): an initializer in fp32 or fp16, maybe transposed,
NHWC-transposed, or a part of a packed q/k/v (k/v) tensor. The merged initializers replace the
originals when the graph's session is created (ONNX Runtime's SessionOptions.add_initializer);
nothing is exported again.

Formats: kohya/A1111 (`lora_unet_<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
`lora_te_...`), including LoCon convolution layers in that layout; diffusers/PEFT
(`unet.<layer>.lora_A.weight` / `lora_B.weight`, `text_encoder.<layer>...`, or the older
`.lora.down.weight` / `.lora.up.weight`). Other LyCORIS formats are refused by name.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .onnxinit import initializers

MAP_FILE = "lora_map.json"
GRAPHS = ("text_encoder", "unet")
EXTENSIONS = (".safetensors",)
ENV_DIR = "SDRT_LORA_DIR"

# A1111's extra-network syntax: <TYPE:ARG:ARG...> (modules/extra_networks.py)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a request: its name and multipliers for the text encoder and the UNet."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def parse_prompt(prompt: str) -> tuple[str, list[LoraUse]]:
    """Remove A1111's `<lora:NAME[:TE[:UNET]]>` tags (also `te=`, `unet=` by name) from `prompt`.

    As A1111: the first number is the text encoder's multiplier (default 1), the second the
    UNet's (default: the first). Other extra networks (`<hypernet:...>`) are removed too, as
    A1111 removes every extra-network tag, and refused."""
    found: list[LoraUse] = []

    def take(m: re.Match) -> str:
        kind, items = m.group(1), m.group(2).split(":")
        if kind != "lora":
            raise InputError(f"prompt: <{kind}:...> is not supported; accepted extra networks: <lora:NAME:WEIGHT>")
        positional = [x for x in items if "=" not in x]
        named = dict(x.split("=", 1) for x in items if "=" in x)
        if not positional or not positional[0].strip():
            raise InputError(f"prompt: {m.group(0)} names no LoRA; accepted: <lora:NAME>, <lora:NAME:WEIGHT>, "
                             "<lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise InputError(f"prompt: {m.group(0)} has a weight that is not a number; accepted: <lora:NAME:0.8>, "
                             "<lora:NAME:TE_WEIGHT:UNET_WEIGHT>") from None
        found.append(LoraUse(positional[0].strip(), te, unet))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def uses_from_dict(loras) -> list[LoraUse]:
    """`loras={"name": 0.8}` or {"name": (te, unet)} -> LoraUse list."""
    if loras is None:
        return []
    if not isinstance(loras, dict):
        raise InputError(f"loras must be a dict of name -> weight, got {type(loras).__name__}")
    out = []
    for name, w in loras.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"loras: a LoRA name must be a non-empty string, got {name!r}")
        if isinstance(w, (tuple, list)) and len(w) == 2:
            te, unet = w
        else:
            te = unet = w
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in (te, unet)):
            raise InputError(f"loras[{name!r}]: weight must be a number or a (text encoder, UNet) pair, got {w!r}")
        out.append(LoraUse(name, float(te), float(unet)))
    return out


def as_tags(uses: list[LoraUse]) -> str:
    """The prompt tags that reproduce `uses` (for the infotext of a call given loras=...)."""
    return "".join(f"<lora:{u.name}:{u.te:g}>" if u.te == u.unet else f"<lora:{u.name}:{u.te:g}:{u.unet:g}>" for u in uses)


def rename_by_hash(prompt: str, lora_hashes: str, folder: Path) -> str:
    """A prompt read back from an infotext, its `<lora:NAME...>` tags renamed where NAME is not in
    `folder` but a file there has the short hash the infotext's "Lora hashes" gives NAME (as
    A1111 does when parameters are pasted)."""
    wanted = {}
    for part in lora_hashes.split(","):
        name, sep, h = part.strip().rpartition(":")
        if sep:
            wanted[name.strip()] = h.strip()
    files = available(folder)
    by_hash: dict[str, str] = {}

    def fix(m: re.Match) -> str:
        items = m.group(2).split(":")
        if m.group(1) != "lora" or items[0] in files or items[0] not in wanted:
            return m.group(0)
        if not by_hash:
            by_hash.update((short_hash(p), n) for n, p in files.items())
        new = by_hash.get(wanted[items[0]])
        return m.group(0) if new is None else "<lora:" + ":".join([new] + items[1:]) + ">"

    return _EXTRA_NETWORK.sub(fix, prompt)


def default_dir(model_path: Path) -> Path:
    """The LoRA folder: SDRT_LORA_DIR, else `Lora` beside the model folder."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path(model_path).resolve().parent / "Lora"


def available(folder: Path) -> dict[str, Path]:
    """LoRA name (file stem) -> file, for the files under `folder` (subfolders too, as A1111)."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in EXTENSIONS and p.is_file():
            out.setdefault(p.stem, p)
    return out


def find(name: str, folder: Path) -> Path:
    """The file of LoRA `name` in `folder`, or an InputError listing the close names."""
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise InputError(f"LoRA {name!r}: a LoRA is named by its file name without extension, not a path")
    files = available(folder)
    if name in files:
        return files[name]
    for p in (folder / (name + ext) for ext in (".pt", ".ckpt", ".bin")):
        if p.is_file():
            raise InputError(f"LoRA {name!r}: {p.name} is a pickle file; sdrt reads LoRAs in .safetensors only")
    close = difflib.get_close_matches(name, list(files), n=5, cutoff=0.5)
    if not files:
        hint = f"the LoRA folder {folder} holds no .safetensors files"
    elif close:
        hint = f"close names: {', '.join(close)}"
    else:
        hint = f"{len(files)} LoRAs available, e.g. {', '.join(list(files)[:5])}"
    raise InputError(f"LoRA {name!r} not found in {folder} ({hint}); set the folder with --lora-dir or {ENV_DIR}")


# ------------------------------------------------------------------------------------ reading
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float tensors of a .safetensors file as float32 arrays (no PyTorch)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise InputError(f"LoRA file {path.name} is not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise InputError(f"LoRA file {path.name} is not a safetensors file (its header is not JSON)") from None
        base = 8 + n
        out = {}
        for key, info in header.items():
            if key == "__metadata__" or not isinstance(info, dict):
                continue
            dt = _ST_DTYPES.get(info.get("dtype"))
            if dt is None:
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= size - base:
                raise InputError(f"LoRA file {path.name}: tensor {key} lies outside the file (truncated?)")
            f.seek(base + start)
            raw = f.read(end - start)
            if dt == "bf16":
                a = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(raw, dt).astype(np.float32)
            shape = tuple(info["shape"])
            if a.size != int(np.prod(shape, dtype=np.int64)):
                raise InputError(f"LoRA file {path.name}: tensor {key} has {a.size} values for shape {shape}")
            out[key] = a.reshape(shape)
    return out


def short_hash(path: Path) -> str:
    """A1111's short hash of a LoRA file (the infotext's "Lora hashes"): the first 12 hex digits of
    the sha256 of a .safetensors file's bytes after its header (the "addnet" hash)."""
    import hashlib

    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n if 8 + n <= size else 0)  # not a safetensors file: the whole file
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------ formats
# LyCORIS and other layouts recognised by a key suffix, refused by name.
_OTHER_FORMATS = (
    (".hada_w1_a", "LoHa (LyCORIS)"),
    (".lokr_w1", "LoKr (LyCORIS)"),
    (".lokr_w1_a", "LoKr (LyCORIS)"),
    (".lora_mid.weight", "LoCon with a CP-decomposed middle weight (LyCORIS lora_mid)"),
    (".on_input", "(IA)^3 (LyCORIS)"),
    (".diff", "full weight difference (LyCORIS diff)"),
    (".dora_scale", "DoRA"),
    (".oft_blocks", "OFT"),
    (".oft_diag", "OFT"),
    (".w_norm", "LyCORIS norm layers"),
)
_SDXL_MARKS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "te1_", "te2_")
_LDM_MARKS = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_", "lora_unet_label_emb")

# (graph, prefix, suffix of down, suffix of up) of the accepted layouts
_LAYOUTS = (
    ("unet", "lora_unet_", ".lora_down.weight", ".lora_up.weight"),
    ("text_encoder", "lora_te_", ".lora_down.weight", ".lora_up.weight"),
    ("unet", "unet.", ".lora_A.weight", ".lora_B.weight"),
    ("text_encoder", "text_encoder.", ".lora_A.weight", ".lora_B.weight"),
    ("unet", "unet.", ".lora.down.weight", ".lora.up.weight"),
    ("text_encoder", "text_encoder.", ".lora.down.weight", ".lora.up.weight"),
)


@dataclass(frozen=True)
class Layer:
    """One layer's low-rank update: delta = scale * up @ down, reshaped to `shape`."""

    up: np.ndarray  # [out, rank]
    down: np.ndarray  # [rank, rest]
    scale: float  # alpha / rank


def _module_names(lmap: dict, graph: str, prefix: str) -> dict[str, str]:
    """Key stem in the file -> module name in the map (kohya: dots as underscores)."""
    names = lmap.get("modules", {})
    if prefix.startswith("lora_"):
        return {prefix + n.replace(".", "_"): n for n in names}
    return {prefix + n: n for n in names}


def parse_layers(name: str, tensors: dict[str, np.ndarray], maps: dict[str, dict]) -> dict[str, dict[str, Layer]]:
    """graph -> module -> Layer for the LoRA `name`'s tensors; an InputError for a file that is not
    a LoRA this model can take (another format, another architecture, shapes that do not fit)."""
    keys = list(tensors)
    for suffix, what in _OTHER_FORMATS:
        hit = next((k for k in keys if k.endswith(suffix)), None)
        if hit is not None:
            raise InputError(f"LoRA {name!r} is a {what} network ({hit}); sdrt applies LoRA and LoCon "
                             "(lora_down/lora_up, lora_A/lora_B) networks")
    if any(k.startswith(_SDXL_MARKS) for k in keys):
        raise InputError(f"LoRA {name!r} is for SDXL (it has weights for two text encoders); this model is "
                         "SD 1.x/2.x")
    hit = next((k for k in keys if k.startswith(_LDM_MARKS)), None)
    if hit is not None:
        raise InputError(f"LoRA {name!r} names its UNet layers as SDXL/LDM checkpoints do ({hit}); sdrt reads kohya "
                         "LoRAs for SD 1.x/2.x, whose keys name diffusers layers (lora_unet_down_blocks_...)")
    layers: dict[str, dict[str, Layer]] = {}
    used: set[str] = set()
    for graph, prefix, down_sfx, up_sfx in _LAYOUTS:
        lookup = _module_names(maps.get(graph, {}), graph, prefix)
        for key in keys:
            if not (key.startswith(prefix) and key.endswith(down_sfx)):
                continue
            stem = key[: -len(down_sfx)]
            if stem not in lookup:
                continue
            up_key = stem + up_sfx
            if up_key not in tensors:
                raise InputError(f"LoRA {name!r}: {key} has no {up_key} beside it (damaged file?)")
            down, up = tensors[key], tensors[up_key]
            module = lookup[stem]
            shape = maps[graph]["modules"][module]["shape"]
            _check_fit(name, module, shape, down, up)
            rank = down.shape[0]
            alpha = tensors.get(stem + ".alpha")
            scale = float(np.asarray(alpha).reshape(-1)[0]) / rank if alpha is not None else 1.0
            layers.setdefault(graph, {})[module] = Layer(up.reshape(up.shape[0], -1), down.reshape(rank, -1), scale)
            used.update((key, up_key, stem + ".alpha"))
    lora_keys = [k for k in keys if any(s in k for s in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up."))]
    if not lora_keys:
        raise InputError(f"{name!r} is not a LoRA: its file has no lora_down/lora_up or lora_A/lora_B weights")
    left = [k for k in lora_keys if k not in used]
    if left:
        raise InputError(f"LoRA {name!r} does not fit this model: {len(left)} of its {len(lora_keys)} weights name layers "
                         f"this model lacks (e.g. {left[0]}); a LoRA for another architecture?")
    return layers


def _check_fit(name: str, module: str, shape: list[int], down: np.ndarray, up: np.ndarray) -> None:
    rest = shape[1:]
    ok = (
        down.ndim in (2, 4) and up.ndim in (2, 4) and up.shape[0] == shape[0] and up.shape[1] == down.shape[0]
        and int(np.prod(up.shape[2:], dtype=np.int64)) == 1
        and int(np.prod(down.shape[1:], dtype=np.int64)) == int(np.prod(rest, dtype=np.int64))
        and (down.ndim == 2 or list(down.shape[1:]) == list(rest))
    )
    if not ok:
        raise InputError(f"LoRA {name!r} does not fit this model: layer {module} is {list(shape)} here, the LoRA's "
                         f"update is {list(up.shape)} x {list(down.shape)} (a LoRA for another model family, e.g. SD 2.x "
                         "or SDXL?)")


# ------------------------------------------------------------------------------------ merging
def read_map(graph_path: Path) -> dict | None:
    p = Path(graph_path).parent / MAP_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def merge(graph_path: Path, lmap: dict, updates: list[tuple[dict[str, Layer], float]]) -> dict[str, np.ndarray]:
    """The initializers of the graph at `graph_path` that `updates` (each a module -> Layer dict and
    its multiplier) change, merged: W + sum(multiplier * scale * up @ down), in the graph's layout
    and dtype (the sum in fp32, added to the fp32 value of an fp16 weight, cast back to fp16). The
    originals are read from the model's files, one tensor at a time."""
    touched: dict[str, list] = {}
    for layers, mult in updates:
        if mult == 0:
            continue
        for module, layer in layers.items():
            entry = lmap["modules"][module]
            for at in entry["at"]:
                touched.setdefault(at["initializer"], []).append((at, entry["shape"], layer, mult))
    if not touched:
        return {}
    inits = initializers(graph_path)
    out = {}
    for init, parts in touched.items():
        if init not in inits:
            raise InputError(f"{graph_path}: initializer {init} of {MAP_FILE} is missing; export the model again")
        base = inits[init].read()
        w = base.astype(np.float32)
        for at, shape, layer, mult in parts:
            _add(w, at, shape, (layer.up @ layer.down) * np.float32(mult * layer.scale))
        out[init] = np.ascontiguousarray(w.astype(base.dtype, copy=False))
    return out


def _add(w: np.ndarray, at: dict, shape: list[int], delta: np.ndarray) -> None:
    """w += delta ([out, rest], the update of a weight of `shape`) in the layout `at` records."""
    layout = at["layout"]
    if layout == "same":
        w += delta.reshape(w.shape)
    elif layout == "T":
        k = at["offset"]
        w[:, k:k + delta.shape[0]] += delta.T
    elif layout == "nhwc":
        w += delta.reshape(shape).transpose(0, 2, 3, 1)
    elif layout == "packed":
        view = w.reshape(w.shape[0], at["heads"], at["count"], -1)  # a view: w changes
        view[:, :, at["index"], :] += delta.T.reshape(w.shape[0], at["heads"], -1)
    else:
        raise InputError(f"{MAP_FILE}: layout {layout!r} is not known to this sdrt version; update sdrt")
