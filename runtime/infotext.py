"""Generation parameters as text, in the layout AUTOMATIC1111's web UI writes and reads back
("infotext", stored in a PNG text chunk named "parameters", shown by its PNG Info tab):

    a photo of a cat
    on a sofa
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, ...

The prompt may span lines; the "Negative prompt:" line is present only when there is one; the
last line is `key: value` pairs joined by ", ". A value containing a comma, colon, newline or
double quote (or empty, or with white space at an end) is written as a JSON string. Keys A1111 knows come in its order; other keys go
where A1111 puts its extra generation parameters.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError

__all__ = [
    "PNG_KEY",
    "KEY_ORDER",
    "quote",
    "unquote",
    "format_infotext",
    "parse_infotext",
    "arguments_from_infotext",
    "save_png",
    "read_infotext",
]

PNG_KEY = "parameters"
NEGATIVE = "Negative prompt:"

# A1111's create_infotext, in order; EXTRA marks where its extra_generation_params go.
EXTRA = object()
KEY_ORDER: tuple = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
    EXTRA,
    "Version",
    "User",
)
# The img2img extras in the order A1111's img2img init adds them.
EXTRA_ORDER = ("Mask mode", "Mask blur", "Mask blur x", "Mask blur y", "Inpaint area", "Masked area padding", "Masked content", "Noise multiplier")

# One `key: value` pair of the parameters line. Keys start with a word character and go on
# with word characters, spaces, '-' and '/'; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")


def quote(value: Any) -> str:
    """The value as it appears after `key: `: as is, or as a JSON string when it holds a comma,
    colon, newline or double quote, starts or ends with white space, or is empty (A1111 quotes
    commas, colons and newlines; the other cases are quoted so that they read back unchanged).
    Whole floats are written as integers (CFG scale: 7, Denoising strength: 1), as A1111 writes the
    numbers its UI hands over."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if not text or any(c in text for c in ',:\n\r"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """A value read from the parameters line: JSON strings decoded, anything else as it is."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    return text


def _ordered(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    known = [k for k in KEY_ORDER if k is not EXTRA]
    rank = {k: i for i, k in enumerate(known)}
    extra_at = KEY_ORDER.index(EXTRA)
    extra_rank = {k: i for i, k in enumerate(EXTRA_ORDER)}

    def sort_key(item):
        pos, (k, _) = item
        if k in rank:
            r = rank[k]
            return (r if r < extra_at else r + 1, 0, pos)
        return (extra_at, extra_rank.get(k, len(EXTRA_ORDER)), pos)

    return [kv for _, kv in sorted(enumerate(params.items()), key=sort_key)]


def format_infotext(prompt: str | None, negative_prompt: str | None, params: Mapping[str, Any], *, reorder: bool = True) -> str:
    """A1111's infotext for one image.

    params: key -> value (None values are left out; a value equal to its key is written as the
    bare key). With reorder=True the keys A1111 knows follow its order (Steps, Sampler,
    Schedule type, CFG scale, Seed, Size, Model hash, Model, ..., Denoising strength, ...), the
    others come where A1111 writes its extra parameters (Mask blur, Inpaint area, ...), in the
    order given.
    """
    items = [(k, v) for k, v in params.items() if v is not None]
    for k, _ in items:
        if not isinstance(k, str) or not _KEY.fullmatch(k):
            raise ValueError(f"infotext key {k!r} must be at least 2 characters, start with a letter or digit and hold only letters, digits, spaces, '-' and '/' (what A1111 can read back)")
    if reorder:
        items = _ordered(dict(items))
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in items)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt or ''}{negative}\n{line}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative_prompt, params) from an infotext, read as A1111's
    parse_generation_parameters reads it: the last line is the parameters when it holds at least
    three `key: value` pairs, otherwise it belongs to the prompt; lines are stripped and empty
    lines before any text dropped; lines from "Negative prompt:" on are the negative prompt. Values are strings, JSON strings decoded.
    Unlike A1111 this adds no defaults for missing keys and keeps "WxH" values whole.
    """
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    parts = {"prompt": "", "negative": ""}
    part = "prompt"
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            part = "negative"
            line = line[len(NEGATIVE) :].strip()
        # a line joins with "\n" only once the text is non-empty (leading empty lines vanish)
        parts[part] = f"{parts[part]}\n{line}" if parts[part] else line
    params: dict[str, str] = {}
    for key, value in _PAIR.findall(last):
        params[key] = unquote(value)
    return parts["prompt"], parts["negative"], params


# What an infotext records, as keyword arguments of Pipeline.img2img / inpaint / txt2img:
# key -> (argument, type). Inpainting keys are handled in arguments_from_infotext.
_ARGUMENTS = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "CFG scale": ("guidance", float),
    "Seed": ("seed", int),
    "Denoising strength": ("strength", float),
    "Clip skip": ("clip_skip", int),
}
_INPAINT_NUMBERS = {"Mask blur": "mask_blur", "Mask blur x": "mask_blur_x", "Mask blur y": "mask_blur_y",
                    "Masked area padding": "padding"}
_CHOICES = {
    "Mask mode": ("invert_mask", {"Inpaint masked": False, "Inpaint not masked": True}),
    "Masked content": ("fill", {"fill": "fill", "original": "original", "latent noise": "latent_noise",
                                "latent nothing": "latent_nothing"}),
    "Inpaint area": ("only_masked", {"Whole picture": False, "Only masked": True}),
}
MODES = ("img2img", "inpaint", "txt2img")


def arguments_from_infotext(text: str, mode: str = "img2img") -> dict[str, Any]:
    """The keyword arguments of Pipeline.<mode> an infotext records, to run a request again:
    prompt, negative_prompt, steps, sampler, schedule, guidance, seed, width and height (from
    Size), clip_skip, strength (not for txt2img) and, for inpaint, mask blur, mask mode, masked
    content, inpaint area and padding. Keys the text lacks are left out (the method's defaults
    apply); other keys (Model, Model hash, ...) are ignored. A value that does not read as its
    type is an InputError naming the key."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    prompt, negative, params = parse_infotext(text)
    out: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}

    def read(key, kind):
        value = params[key]
        try:
            if kind is int:
                f = float(value)
                if f != int(f):
                    raise ValueError
                return int(f)
            return kind(value)
        except (ValueError, OverflowError):
            what = "a whole number" if kind is int else "a number"
            raise InputError(f"infotext: {key} must be {what}, got {value!r}") from None

    for key, (arg, kind) in _ARGUMENTS.items():
        if key in params and not (kind is str and params[key] == ""):
            out[arg] = read(key, kind)
    if "Size" in params:
        w, sep, h = params["Size"].partition("x")
        if not (sep and w.strip().isdigit() and h.strip().isdigit()):
            raise InputError(f"infotext: Size must be WIDTHxHEIGHT, got {params['Size']!r}")
        out["width"], out["height"] = int(w), int(h)
    if mode == "txt2img":
        out.pop("strength", None)
    if mode == "inpaint":
        for key, arg in _INPAINT_NUMBERS.items():
            if key in params:
                out[arg] = read(key, int)
        for key, (arg, table) in _CHOICES.items():
            if key in params:
                if params[key] not in table:
                    raise InputError(f"infotext: {key} must be one of {', '.join(table)}, got {params[key]!r}")
                out[arg] = table[params[key]]
    return out


def save_png(image, path, infotext: str | None, *, overwrite: bool = False) -> Path:
    """Write `image` as a PNG with `infotext` in a text chunk named "parameters" (tEXt, or iTXt
    when the text is not Latin-1), which A1111's PNG Info and sdrt's read_infotext read.

    The file appears whole or not at all: the PNG is written to a temporary file in the same
    folder, synced, and renamed into place. An existing file is an error unless overwrite=True.
    """
    from PIL import PngImagePlugin

    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text(PNG_KEY, infotext)
    tmp = folder / f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"  # see remove_stale_temp_files
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _sync_folder(folder)
    return path


# save_png's temporary names: ".NAME.png.<pid>-<12 hex>.tmp" (and ".NAME.png.<12 hex>.tmp" from
# earlier versions).
_TEMP_NAME = re.compile(r"^\..+\.png\.(?:(?P<pid>\d+)-)?[0-9a-f]{12}\.tmp$")
STALE_TEMP_SECONDS = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number no process has): keep it to be safe
    return True


def remove_stale_temp_files(folder, now: float | None = None) -> list[Path]:
    """Delete the temporary files save_png left in `folder` when its process was killed (SIGKILL,
    power loss): names of save_png's pattern whose writer is no longer running, or that are older
    than STALE_TEMP_SECONDS (a write takes well under a second). Other files are never touched.
    Returns the files removed."""
    import time

    folder = Path(folder)
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            pid = m.group("pid")
            if pid is not None and int(pid) != os.getpid() and not _pid_alive(int(pid)) or age > STALE_TEMP_SECONDS:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _place_new(tmp: Path, path: Path) -> None:
    """Rename tmp to path unless path exists, without a window where another writer could be
    overwritten (a hard link fails if the name is taken)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_infotext(path) -> str | None:
    """The "parameters" text of an image file (PNG tEXt/iTXt/zTXt), or None when it has none."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image: file not found: {path}" if not path.exists() else f"image: {path} is not a file")
    try:
        with Image.open(path) as img:
            text = img.info.get(PNG_KEY)
            if text is None and img.format == "PNG":
                img.load()  # text chunks after the image data are read with it
                text = img.info.get(PNG_KEY)
    except Exception as e:
        raise InputError(f"image: cannot read {path} ({e}); expected a PNG written by sdrt or A1111") from None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text


def sdrt_version() -> str:
    """sdrt's version as installed ("unknown" when running from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdrt")
    except PackageNotFoundError:
        return "unknown"
