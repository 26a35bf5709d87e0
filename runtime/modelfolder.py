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
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt.schedulers.training import check_training_schedule

MANIFEST = "sdrt.json"
FORMAT_VERSION = 1
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
FAMILIES = ("sd1", "sd2", "sdxl")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SDXL: both; its refiner: text_encoder_2 alone
# An fp32 copy of the VAE decoder next to an fp16 one (sdrt export --fp32-vae-decoder): the
# pipeline decodes with it when the fp16 decoder overflows (NaN/Inf).
FP32_VAE_DECODER = "vae_decoder_fp32"
# Written first into a folder being exported and removed just before it is renamed into place:
# a folder that still has it was interrupted and must never load.
INCOMPLETE_MARKER = ".sdrt-incomplete"
# Text encoder output with final_layer_norm(hidden_states[-k]) for k = 1..layers (A1111 clip skip).
CLIP_SKIP_OUTPUT = "hidden_states_normed"
VERIFY_MODES = ("auto", "full", "size", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("cpu", "cuda")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    # The component configs (unet, vae, text_encoder) as the folder has them ({} when absent):
    # the architecture the memory estimate is computed from.
    configs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    # The file check still running in the background (load(), verify="auto"), or None.
    verification: "Verification | None" = field(default=None, repr=False, compare=False)

    def wait_verified(self) -> None:
        """Block until the folder's files are verified; ModelFolderError if one is damaged."""
        if self.verification is not None:
            self.verification.wait()

    def graph_bytes(self, graph: str) -> int:
        """Bytes of a graph on disk: its .onnx file and its external weight files."""
        p = self.graph_files[graph]
        try:
            return sum(f.stat().st_size for f in p.parent.iterdir() if f.is_file() and f.suffix != ".json")
        except OSError:
            return 0
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
            entry = files.get("unet/model.onnx") if isinstance(files, dict) else None
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
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


_cache_lock = threading.Lock()


def _load_verified() -> dict[str, Any]:
    try:
        with open(_verified_cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_verified(new: dict[str, Any]) -> None:
    path = _verified_cache_path()
    with _cache_lock:
        entries = {**_load_verified(), **new}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs a re-hash next time


def _stamp(st: os.stat_result, digest: str) -> list:
    """What a verified file looked like. Any write to a file changes its ctime, which no program
    can set back (touch and utime set mtime and atime only), and a replaced file has another
    inode: a file whose stamp is unchanged still has the content that was hashed."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest]


class Verification:
    """The sha256 check of a folder's files, run in a background thread (load() starts it, so the
    hashing overlaps the creation of the ONNX Runtime sessions) or at once. wait() returns when
    every file matched and raises ModelFolderError naming the first one that did not.

    use_cache: a file verified before on this machine whose stamp (inode, size, mtime, ctime) is
    unchanged is not hashed again; every hashed file is recorded."""

    def __init__(self, root: Path, files: dict[str, dict[str, Any]], background: bool = True, use_cache: bool = True):
        self.root = root
        self.files = files
        self.use_cache = use_cache
        self.hashed: list[str] = []  # files hashed (not found unchanged in the cache)
        self._error: str | None = None
        self._done = threading.Event()
        if background:
            threading.Thread(target=self._run, name="sdrt-verify", daemon=True).start()
        else:
            self._run()

    def _run(self) -> None:
        recorded: dict[str, Any] = {}
        try:
            cache = _load_verified() if self.use_cache else {}
            for rel, entry in sorted(self.files.items()):
                p = self.root / rel
                try:
                    key = str(p.resolve())
                    st = p.stat()
                    if cache.get(key) == _stamp(st, entry["sha256"]):
                        continue
                    digest = sha256_file(p)
                except OSError as e:
                    self._error = f"model folder {self.root} is damaged: cannot read {rel} ({e.strerror or e})"
                    return
                self.hashed.append(rel)
                if digest != entry["sha256"]:
                    self._error = (f"model folder {self.root} is damaged: {rel} does not match its sha256 in {MANIFEST}"
                                   " (corrupted or modified file; export the model again)")
                    return
                recorded[key] = _stamp(st, digest)
        except Exception as e:  # never leave a waiter hanging
            self._error = f"model folder {self.root}: the file check failed ({e})"
        finally:
            if recorded:
                _save_verified(recorded)
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise ModelFolderError(self._error)


def verify_files(root: Path, files: dict[str, dict[str, Any]], mode: str = "auto", *,
                 background: bool = False) -> Verification | None:
    """Check every file the manifest lists: present, same size and (unless mode="size") same sha256.

    Sizes are compared at once. "full" hashes every file. "auto" hashes every file except those
    verified before on this machine and unchanged since: same inode, size, mtime and ctime (any
    write changes the ctime, and nothing can set it back, so a file rewritten with its old size and
    mtime is hashed again). With background=True the hashing runs in a thread and the returned
    Verification's wait() reports its result (load() waits for it before the first graph runs);
    otherwise it is done before returning. "size" only compares sizes; "none" skips the check.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}; got {mode!r}")
    if mode == "none":
        return None
    for rel, entry in sorted(files.items()):
        p = root / rel
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ModelFolderError(f"model folder {root} is damaged: {rel} is missing") from None
        except OSError as e:
            raise ModelFolderError(f"model folder {root} is damaged: cannot read {rel} ({e.strerror or e})") from None
        if st.st_size != entry["size"]:
            raise ModelFolderError(
                f"model folder {root} is damaged: {rel} has {st.st_size} bytes, the manifest says {entry['size']}"
                " (truncated or replaced file; export the model again)"
            )
    if mode == "size":
        return None
    v = Verification(root, files, background=background, use_cache=mode == "auto")
    if not background:
        v.wait()
    return v


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
    path = root / "scheduler" / "scheduler_config.json"
    cfg = _read_json(path, "scheduler config")
    problem = check_training_schedule(cfg, 1000)
    if problem:
        raise ModelFolderError(f"{path}: {problem}; fix the config or export the model again")
    return cfg


def read_model_folder(path: str | os.PathLike, verify: str = "auto", *, partial: bool = False,
                      wait: bool = True) -> ModelInfo:
    """Describe and validate the model folder at `path` (an sdrt export or an optimum export).

    The manifest's values are checked against what sdrt can run and against the component
    configs in the folder; with a manifest, every file it lists is checked (see verify_files).
    wait=False returns while the files are still being hashed: ModelInfo.wait_verified() then
    gives the result (load() does this so the hashing overlaps creating the sessions).
    partial=True reads a folder whose export is still in progress (for the exporter itself)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}; got {verify!r}")
    try:
        root = Path(path).expanduser()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"model path {path!r} is not a usable path ({e})") from None
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"model path {root} cannot be read ({e})") from None
    if not exists:
        raise ModelFolderError(f"model folder {root} does not exist")
    if not is_dir:
        raise ModelFolderError(f"model path {root} is not a folder")
    if (root / INCOMPLETE_MARKER).exists() and not partial:
        raise ModelFolderError(f"model folder {root} is an interrupted export; delete it and export again")
    if (root / MANIFEST).is_file():
        return _from_manifest(root, verify, partial=partial, wait=wait)
    return _from_configs(root)


def _manifest_files(root: Path, files: Any, partial: bool, graphs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The manifest's "files" table, checked: relative paths inside the folder, each with its size
    and sha256, and an entry for every graph."""
    where = root / MANIFEST

    def bad(what: str) -> ModelFolderError:
        return ModelFolderError(f"{where} is malformed: {what}; export the model again")

    if not isinstance(files, dict):
        raise bad(f'"files" must map each file to its size and sha256, got {type(files).__name__}')
    out = {}
    for rel, entry in files.items():
        parts = Path(rel).parts if isinstance(rel, str) else ()
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise bad(f"file name {rel!r} is not a path inside the folder")
        if not isinstance(entry, dict):
            raise bad(f'the entry of {rel} must be {{"size": bytes, "sha256": hex digest}}, got {entry!r}')
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"the size of {rel} must be a whole number of bytes, got {size!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f"the sha256 of {rel} must be 64 lowercase hex digits, got {digest!r}")
        out[rel] = {"size": size, "sha256": digest}
    if not partial:
        missing = [f"{g}/model.onnx" for g in graphs if f"{g}/model.onnx" not in out]
        if missing:
            raise bad(f"it lists no size and sha256 for {', '.join(missing)}, so they cannot be checked")
    return out


def _from_manifest(root: Path, verify: str, partial: bool = False, wait: bool = True) -> ModelInfo:
    m = _read_json(root / MANIFEST, "sdrt manifest")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFolderError(
            f"{root / MANIFEST} has format version {version!r}; this sdrt reads version {FORMAT_VERSION}"
        )
    missing = [k for k in ("family", "prediction_type", "unet_in_channels", "latent_channels", "vae_scale_factor",
                           "vae_scaling_factor", "sample_size", "text_hidden_size", "target", "precision", "files")
               if k not in m]
    if missing:
        raise ModelFolderError(f"{root / MANIFEST} is incomplete or malformed (missing {', '.join(missing)}); "
                               "export the model again")
    if m["family"] not in FAMILIES:
        raise ModelFolderError(f"{root / MANIFEST} describes a {m['family']!r} model; this sdrt runs {', '.join(FAMILIES)}")
    try:
        xl = XLConfig.from_dict(m["sdxl"]) if m["family"] == "sdxl" else None
        text_encoders = tuple(m.get("text_encoders", ("text_encoder",)))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{root / MANIFEST} is incomplete or malformed ({e!r}); export the model again") from None
    if not text_encoders or any(not isinstance(t, str) or t not in TEXT_ENCODERS for t in text_encoders) \
            or len(set(text_encoders)) != len(text_encoders):
        raise ModelFolderError(f"{root / MANIFEST} is malformed: text_encoders is {list(text_encoders)!r}; accepted: "
                               f"one or both of {', '.join(TEXT_ENCODERS)}; export the model again")
    files = _manifest_files(root, m["files"], partial, graph_names(text_encoders))
    precision = m["precision"]
    if not isinstance(precision, dict):
        raise ModelFolderError(f"{root / MANIFEST} is malformed: precision must map each graph to fp32, fp16 or int8, "
                               f"got {precision!r}; export the model again")
    info = ModelInfo(
        path=root,
        family=m["family"],
        prediction_type=m["prediction_type"],
        unet_in_channels=m["unet_in_channels"],
        latent_channels=m["latent_channels"],
        vae_scale_factor=m["vae_scale_factor"],
        vae_scaling_factor=m["vae_scaling_factor"],
        sample_size=m["sample_size"],
        text_hidden_size=m["text_hidden_size"],
        target=m["target"],
        precision=dict(precision),
        scheduler_config={},
        graph_files={},
        manifest=m,
        text_encoders=text_encoders,
        xl=xl,
    )
    _check_values(info, f"{root / MANIFEST}", manifest=True)
    configs = _component_configs(root)
    _check_against_configs(info, configs)
    verification = verify_files(root, files, verify, background=not wait)
    return _replace(info, scheduler_config=_scheduler_config(root), graph_files=_graph_files(root, info.text_encoders),
                    configs=configs,
                    verification=verification)


def _check_values(info: ModelInfo, where: str, manifest: bool) -> None:
    """The values the runtime computes with, within what it can run (a NaN scaling factor, a zero
    scale factor or a channel count no graph has would fail much later, and unclearly)."""
    fix = "export the model again" if manifest else "fix the config or export the model with `sdrt export`"

    def bad(key: str, value, accepted: str) -> ModelFolderError:
        return ModelFolderError(f"{where}: {key} is {value!r}; accepted: {accepted} ({fix})")

    def whole(key: str, value, lo: int, hi: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(key, value, f"a whole number from {lo} to {hi}")

    if not isinstance(info.family, str) or not info.family:
        raise bad("family", info.family, "a model family such as sd1 or sd2")
    if info.prediction_type not in PREDICTION_TYPES:
        raise bad("prediction_type", info.prediction_type, ", ".join(PREDICTION_TYPES))
    whole("latent_channels", info.latent_channels, 1, 64)
    whole("unet_in_channels", info.unet_in_channels, 1, 129)
    if info.unet_in_channels not in (info.latent_channels, 2 * info.latent_channels + 1):
        raise bad("unet_in_channels", info.unet_in_channels,
                  f"{info.latent_channels} (the latent channels) or {2 * info.latent_channels + 1} (an inpainting UNet: "
                  "latents, mask and masked-image latents)")
    whole("vae_scale_factor", info.vae_scale_factor, 1, 64)
    if info.vae_scale_factor & (info.vae_scale_factor - 1):
        raise bad("vae_scale_factor", info.vae_scale_factor, "a power of two from 1 to 64 (8 for Stable Diffusion)")
    v = info.vae_scaling_factor
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 1e-4 <= v <= 1e4:
        raise bad("vae_scaling_factor", v, "a finite number from 0.0001 to 10000 (0.18215 for SD 1.x and 2.x)")
    whole("sample_size", info.sample_size, 1, 4096)
    whole("text_hidden_size", info.text_hidden_size, 1, 65536)
    if manifest:
        if info.target not in TARGETS:
            raise bad("target", info.target, ", ".join(TARGETS))
        for g in graph_names(info.text_encoders):
            if info.precision.get(g) not in PRECISIONS:
                raise bad(f"precision of {g}", info.precision.get(g), ", ".join(PRECISIONS))


def _component_configs(root: Path) -> dict[str, dict[str, Any]]:
    """unet, vae and text_encoder configs (diffusers / transformers config.json), where present."""
    out: dict[str, dict[str, Any]] = {}
    for key, dirs in (("unet", ("unet",)), ("vae", ("vae_decoder", "vae_encoder", "vae")),
                      ("text_encoder", ("text_encoder",))):
        for d in dirs:
            p = root / d / "config.json"
            if p.is_file():
                out[key] = _read_json(p, f"{key} config")
                break
    return out


def _check_against_configs(info: ModelInfo, configs: dict[str, dict[str, Any]]) -> None:
    """The manifest against the component configs exported beside the graphs (they are in its
    file list, so a damaged config is caught by the sha256 check instead)."""
    unet, vae, text = configs.get("unet", {}), configs.get("vae", {}), configs.get("text_encoder", {})
    pairs = [
        ("unet_in_channels", info.unet_in_channels, "unet/config.json in_channels", unet.get("in_channels")),
        ("latent_channels", info.latent_channels, "VAE config latent_channels", vae.get("latent_channels")),
        ("text_hidden_size", info.text_hidden_size, *(("unet/config.json cross_attention_dim", unet.get("cross_attention_dim"))
                                                      if info.is_sdxl else
                                                      ("text_encoder/config.json hidden_size", text.get("hidden_size")))),
    ]
    blocks = vae.get("block_out_channels")
    if isinstance(blocks, list) and blocks:
        pairs.append(("vae_scale_factor", info.vae_scale_factor, "the VAE config (2 ** (len(block_out_channels) - 1))",
                      2 ** (len(blocks) - 1)))
    for key, ours, what, theirs in pairs:
        if theirs is not None and ours != theirs:
            raise ModelFolderError(f"{info.path / MANIFEST} says {key} {ours!r} but {what} is {theirs!r}: the manifest "
                                   "does not describe these graphs (edited or damaged); export the model again")
    sf = vae.get("scaling_factor")
    if isinstance(sf, (int, float)) and not isinstance(sf, bool) and not math.isclose(sf, info.vae_scaling_factor, rel_tol=1e-6):
        raise ModelFolderError(f"{info.path / MANIFEST} says vae_scaling_factor {info.vae_scaling_factor!r} but the VAE "
                               f"config's scaling_factor is {sf!r}: the manifest does not describe these graphs (edited "
                               "or damaged); export the model again")


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
    cross = unet.get("cross_attention_dim", 768)
    blocks = vae.get("block_out_channels", [0, 0, 0, 0])
    if not isinstance(blocks, list) or not blocks or not isinstance(cross, int) or isinstance(cross, bool):
        raise ModelFolderError(f"{root}: the UNet or VAE config is malformed (cross_attention_dim {cross!r}, "
                               f"block_out_channels {blocks!r}); export the model again")
    info = ModelInfo(
        path=root,
        family="sdxl" if xl else _family(cross, _pad_token(root), prediction_type),
        prediction_type=prediction_type,
        unet_in_channels=unet.get("in_channels", 4),
        latent_channels=vae.get("latent_channels", 4),
        vae_scale_factor=2 ** (len(blocks) - 1),
        vae_scaling_factor=vae.get("scaling_factor", 0.18215),
        sample_size=unet.get("sample_size", 64),
        text_hidden_size=cross if xl else text.get("hidden_size", cross),
        # Not recorded by other exporters: the sessions read the graphs' input types when they load.
        target="unknown",
        precision={g: "unknown" for g in graphs},
        scheduler_config=sched,
        graph_files=graphs,
        manifest=None,
        configs={"unet": unet, "vae": vae, **({"text_encoder": text} if text else {})},
        text_encoders=encoders,
        xl=xl,
    )
    _check_values(info, f"model folder {root} (from its configs)", manifest=False)
    return info


def _xl_from_configs(root: Path, unet: dict[str, Any]) -> XLConfig:
    """An SDXL folder of another exporter: the pipeline's flags from model_index.json, the sizes
    from the UNet's config (its added embedding takes time_ids x addition_time_embed_dim + pooled)."""
    index_path = root / "model_index.json"
    index = _read_json(index_path, "model index") if index_path.is_file() else {}
    aesthetic = bool(index.get("requires_aesthetics_score", False))
    n = 5 if aesthetic else 6
    pooled = int(unet.get("projection_class_embeddings_input_dim", 2816)) - n * int(unet.get("addition_time_embed_dim", 256))
    return XLConfig(n, pooled, bool(index.get("force_zeros_for_empty_prompt", True)), aesthetic)

