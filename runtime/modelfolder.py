"""The model folder: its layout, its manifest (sdrt.json) and its validation. No torch here.

A model folder holds four ONNX graphs (text_encoder, unet, vae_encoder, vae_decoder) plus the
tokenizer and the scheduler configuration, in the layout `optimum-cli export onnx` writes; an
SDXL folder has a second text encoder and tokenizer (text_encoder_2/, tokenizer_2/; a refiner has
only those).
Folders exported by sdrt carry `sdrt.json`, which records what the graphs are and a sha256 per
file; folders written by other tools have no manifest and are described from their configs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "sdrt.json"
FORMAT_VERSION = 1
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
FAMILIES = ("sd1", "sd2", "sdxl")
# An fp32 copy of the VAE decoder next to an fp16 one (sdrt export --fp32-vae-decoder): the
# pipeline decodes with it when the fp16 decoder overflows (NaN/Inf).
FP32_VAE_DECODER = "vae_decoder_fp32"
# Written first into a folder being exported and removed just before it is renamed into place:
# a folder that still has it was interrupted and must never load.
INCOMPLETE_MARKER = ".sdrt-incomplete"
# Text encoder output with final_layer_norm(hidden_states[-k]) for k = 1..layers (A1111 clip skip).
CLIP_SKIP_OUTPUT = "hidden_states_normed"


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete, damaged or of a kind sdrt cannot run."""


@dataclass(frozen=True)
class XLConfig:
    """What an SDXL folder adds: the UNet's extra conditioning and the pipeline's rules for it."""

    time_ids: int = 6  # original size, crop, target size; a refiner: original size, crop, aesthetic score (5)
    pooled_size: int = 1280  # the second text encoder's projection (the UNet's text_embeds)
    force_zeros_for_empty_prompt: bool = True  # diffusers: an empty negative prompt conditions on zeros
    requires_aesthetics_score: bool = False  # a refiner

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XLConfig":
        return cls(int(d.get("time_ids", 6)), int(d.get("pooled_size", 1280)),
                   bool(d.get("force_zeros_for_empty_prompt", True)), bool(d.get("requires_aesthetics_score", False)))


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model folder."""

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    unet_in_channels: int  # 4, or 9 for inpainting models
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel (8 for SD)
    vae_scaling_factor: float  # latents = vae_mean * this
    sample_size: int  # the UNet's native latent size (64 for SD 1.5 = 512 px)
    text_hidden_size: int
    target: str  # "cpu" | "cuda"
    precision: dict[str, str]  # graph -> "fp32" | "fp16" | "int8"
    scheduler_config: dict[str, Any]
    graph_files: dict[str, Path]
    manifest: dict[str, Any] | None = field(default=None, repr=False)
    # The text encoder graphs, in the order their hidden states are concatenated (SDXL: two).
    text_encoders: tuple[str, ...] = ("text_encoder",)
    xl: XLConfig | None = None  # SDXL folders only

    @property
    def is_inpainting_model(self) -> bool:
        return self.unet_in_channels == 9

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def native_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def default_size(self) -> int:
        """txt2img's default width and height: an SDXL model's native size (its UNet's sample
        size x the VAE factor: 1024 for SDXL 1.0), 512 for SD 1.x/2.x (A1111's default)."""
        return self.native_size if self.is_sdxl else 512

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizer folder of each text encoder."""
        return tuple(t.replace("text_encoder", "tokenizer") for t in self.text_encoders)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_name(self) -> str:
        """The infotext's "Model": for a folder exported from a checkpoint file, the file's name
        without its extension (as A1111 writes it); otherwise the folder's name."""
        source = (self.manifest or {}).get("source_file") or {}
        return Path(source["name"]).stem if source.get("name") else self.name

    @property
    def vae(self) -> dict[str, str] | None:
        """The replacement VAE the folder was exported with ({"name", "sha256", "short_hash"}), if any."""
        return (self.manifest or {}).get("vae")

    @property
    def short_hash(self) -> str:
        """A1111-style short model hash: the first 10 hex digits of the checkpoint file's sha256 for
        a folder exported from one (A1111's "Model hash" of the same file), else of the UNet graph's."""
        if self.manifest:
            source = self.manifest.get("source_file") or {}
            if source.get("short_hash"):
                return source["short_hash"]
            files = self.manifest.get("files", {})
            entry = files.get("unet/model.onnx")
            if entry:
                return entry["sha256"][:10]
        return ""


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFolderError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{what}: {path} does not hold a JSON object")
    return data


def _cache_dir() -> Path:
    base = os.environ.get("SDRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sdrt"
    )
    return Path(base)


def _verified_cache_path() -> Path:
    return _cache_dir() / "verified-files.json"


def _load_verified() -> dict[str, Any]:
    try:
        with open(_verified_cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_verified(entries: dict[str, Any]) -> None:
    path = _verified_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def verify_files(root: Path, files: dict[str, dict[str, Any]], mode: str = "auto") -> None:
    """Check every file the manifest lists: present, same size and (unless mode="size") same sha256.

    mode "auto" hashes a file only when it changed (size or mtime) since it was last verified on
    this machine; "full" always hashes; "size" only compares sizes; "none" skips the check.
    """
    if mode == "none":
        return
    if mode not in ("auto", "full", "size"):
        raise ValueError(f"verify must be one of auto, full, size, none; got {mode!r}")
    cache = _load_verified() if mode == "auto" else {}
    changed = False
    for rel, entry in sorted(files.items()):
        p = root / rel
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ModelFolderError(f"model folder {root} is damaged: {rel} is missing") from None
        if st.st_size != entry.get("size"):
            raise ModelFolderError(
                f"model folder {root} is damaged: {rel} has {st.st_size} bytes, the manifest says {entry.get('size')}"
                " (truncated or replaced file; export the model again)"
            )
        if mode == "size":
            continue
        key = str(p.resolve())
        stamp = [st.st_size, st.st_mtime_ns, entry["sha256"]]
        if mode == "auto" and cache.get(key) == stamp:
            continue
        if sha256_file(p) != entry["sha256"]:
            raise ModelFolderError(
                f"model folder {root} is damaged: {rel} does not match its sha256 in {MANIFEST}"
                " (corrupted file; export the model again)"
            )
        cache[key] = stamp
        changed = True
    if changed and mode == "auto":
        _save_verified(cache)


def graph_names(text_encoders: tuple[str, ...] = ("text_encoder",)) -> tuple[str, ...]:
    """The graphs a folder with these text encoders must have."""
    return (*text_encoders, *GRAPHS[1:])


def _graph_files(root: Path, text_encoders: tuple[str, ...] = ("text_encoder",)) -> dict[str, Path]:
    out = {}
    names = graph_names(text_encoders)
    for g in names:
        p = root / g / "model.onnx"
        if not p.is_file():
            raise ModelFolderError(f"model folder {root} has no {g}/model.onnx (expected graphs: {', '.join(names)})")
        out[g] = p
    fallback = root / FP32_VAE_DECODER / "model.onnx"
    if fallback.is_file():
        out[FP32_VAE_DECODER] = fallback
    return out


def _family(cross_attention_dim: int, pad_token: str | None, prediction_type: str) -> str:
    if cross_attention_dim == 1024:
        return "sd2"
    if cross_attention_dim == 768:
        return "sd1"
    return "sd2" if pad_token == "!" or prediction_type == "v_prediction" else "sd1"


def _pad_token(root: Path) -> str | None:
    cfg = root / "tokenizer" / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    pad = _read_json(cfg, "tokenizer config").get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return pad


def _scheduler_config(root: Path) -> dict[str, Any]:
    return _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")


def read_model_folder(path: str | os.PathLike, verify: str = "auto", *, partial: bool = False) -> ModelInfo:
    """Describe and validate the model folder at `path` (an sdrt export or an optimum export).

    partial=True reads a folder whose export is still in progress (for the exporter itself)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelFolderError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise ModelFolderError(f"model path {root} is not a folder")
    if (root / INCOMPLETE_MARKER).exists() and not partial:
        raise ModelFolderError(f"model folder {root} is an interrupted export; delete it and export again")
    if (root / MANIFEST).is_file():
        return _from_manifest(root, verify)
    return _from_configs(root)


def _from_manifest(root: Path, verify: str) -> ModelInfo:
    m = _read_json(root / MANIFEST, "sdrt manifest")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFolderError(
            f"{root / MANIFEST} has format version {version!r}; this sdrt reads version {FORMAT_VERSION}"
        )
    try:
        files = m["files"]
        if m["family"] not in FAMILIES:
            raise ModelFolderError(f"{root / MANIFEST} describes a {m['family']!r} model; this sdrt runs {', '.join(FAMILIES)}")
        info = ModelInfo(
            path=root,
            family=m["family"],
            prediction_type=m["prediction_type"],
            unet_in_channels=int(m["unet_in_channels"]),
            latent_channels=int(m["latent_channels"]),
            vae_scale_factor=int(m["vae_scale_factor"]),
            vae_scaling_factor=float(m["vae_scaling_factor"]),
            sample_size=int(m["sample_size"]),
            text_hidden_size=int(m["text_hidden_size"]),
            target=m["target"],
            precision=dict(m["precision"]),
            scheduler_config={},
            graph_files={},
            manifest=m,
            text_encoders=tuple(m.get("text_encoders", ("text_encoder",))),
            xl=XLConfig.from_dict(m["sdxl"]) if m["family"] == "sdxl" else None,
        )
    except ModelFolderError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{root / MANIFEST} is incomplete or malformed ({e!r}); export the model again") from None
    verify_files(root, files, verify)
    return _replace(info, scheduler_config=_scheduler_config(root), graph_files=_graph_files(root, info.text_encoders))


def _replace(info: ModelInfo, **kw: Any) -> ModelInfo:
    from dataclasses import replace

    return replace(info, **kw)


def _from_configs(root: Path) -> ModelInfo:
    """A folder without sdrt.json (e.g. from `optimum-cli export onnx`): read the component configs."""
    if not (root / "model_index.json").is_file() and not (root / "unet").is_dir():
        raise ModelFolderError(
            f"{root} is not a model folder: it has neither {MANIFEST} nor model_index.json "
            "(export one with `sdrt export SRC OUT`)"
        )
    unet = _read_json(root / "unet" / "config.json", "UNet config")
    xl = _xl_from_configs(root, unet) if unet.get("addition_embed_type") == "text_time" else None
    encoders = tuple(t for t in ("text_encoder", "text_encoder_2") if (root / t / "model.onnx").is_file()) if xl else ("text_encoder",)
    graphs = _graph_files(root, encoders or ("text_encoder", "text_encoder_2"))
    vae_cfg_path = next(
        (root / d / "config.json" for d in ("vae_decoder", "vae_encoder", "vae") if (root / d / "config.json").is_file()),
        root / "vae_decoder" / "config.json",
    )
    vae = _read_json(vae_cfg_path, "VAE config")
    sched = _scheduler_config(root)
    text_cfg = root / encoders[0] / "config.json"
    text = _read_json(text_cfg, "text encoder config") if text_cfg.is_file() else {}
    prediction_type = sched.get("prediction_type", "epsilon")
    cross = int(unet.get("cross_attention_dim", 768))
    return ModelInfo(
        path=root,
        family="sdxl" if xl else _family(cross, _pad_token(root), prediction_type),
        prediction_type=prediction_type,
        unet_in_channels=int(unet.get("in_channels", 4)),
        latent_channels=int(vae.get("latent_channels", 4)),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1),
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        sample_size=int(unet.get("sample_size", 64)),
        text_hidden_size=cross if xl else int(text.get("hidden_size", cross)),
        # Not recorded by other exporters: the sessions read the graphs' input types when they load.
        target="unknown",
        precision={g: "unknown" for g in graphs},
        scheduler_config=sched,
        graph_files=graphs,
        manifest=None,
        text_encoders=encoders,
        xl=xl,
    )


def _xl_from_configs(root: Path, unet: dict[str, Any]) -> XLConfig:
    """An SDXL folder of another exporter: the pipeline's flags from model_index.json, the sizes
    from the UNet's config (its added embedding takes time_ids x addition_time_embed_dim + pooled)."""
    index_path = root / "model_index.json"
    index = _read_json(index_path, "model index") if index_path.is_file() else {}
    aesthetic = bool(index.get("requires_aesthetics_score", False))
    n = 5 if aesthetic else 6
    pooled = int(unet.get("projection_class_embeddings_input_dim", 2816)) - n * int(unet.get("addition_time_embed_dim", 256))
    return XLConfig(n, pooled, bool(index.get("force_zeros_for_empty_prompt", True)), aesthetic)

