"""Textual-inversion embeddings, used as A1111 uses them: by writing the file's name in a prompt.

Every embedding in the embeddings folder whose width fits the text encoder gets new token ids
past the vocabulary; the text encoder's session is created with its token-embedding table
(a plain Gather initializer) extended by their vectors, so nothing is exported again. A prompt
is matched as A1111 matches it: at each token position, the longest embedding name whose CLIP
tokens start there is replaced by the embedding's ids (one per vector); an embedding that does
not fit in what is left of a 75-token chunk starts the next one.

Files: A1111's `.safetensors` embeddings (one tensor, [vectors, width] or [width]). `.pt` files
are pickles: convert them first with `python -m sdrt.export.embedding IN.pt OUT.safetensors`
(PyTorch's weights-only loader), the runtime does not read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .lora import read_safetensors

ENV_DIR = "SDRT_EMBEDDINGS_DIR"


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: np.ndarray  # [n, width] float32
    path: Path


@dataclass
class EmbeddingSet:
    """The embeddings of a folder that fit a text encoder, with their token ids, and the files that do not."""

    embeddings: dict[str, Embedding] = field(default_factory=dict)
    ids: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be used
    key: tuple = ()

    def rows(self) -> np.ndarray | None:
        """The vectors to append to the token-embedding table, in id order (None: no embedding)."""
        if not self.embeddings:
            return None
        return np.concatenate([self.embeddings[n].vectors for n in sorted(self.embeddings)])

    def lookup(self, tokenizer) -> dict[int, list[tuple[tuple[int, ...], str]]]:
        """First CLIP token of a name -> [(the name's tokens, name)], longest first (A1111's ids_lookup)."""
        out: dict[int, list] = {}
        names = list(self.embeddings) + list(self.skipped)
        for name, toks in zip(names, tokenizer.tokenize(names)):
            if toks:
                out.setdefault(toks[0], []).append((tuple(toks), name))
        for v in out.values():
            v.sort(key=lambda x: -len(x[0]))
        return out

    def replacement(self, name: str) -> list[int]:
        """The token ids of embedding `name`, or an InputError when its file cannot be used."""
        if name in self.skipped:
            raise InputError(f"embedding {name!r} in the prompt cannot be used: {self.skipped[name]}")
        return self.ids[name]


def short_hash(path: Path) -> str:
    """A1111's short hash of an embedding file (the infotext's "TI hashes"): the first 12 hex
    digits of the file's sha256."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def default_dir(model_path: Path) -> Path:
    """The embeddings folder: SDRT_EMBEDDINGS_DIR, else `embeddings` beside the model folder."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path(model_path).resolve().parent / "embeddings"


def read_embedding(path: Path, width: int) -> Embedding:
    """One A1111 embedding file; an InputError saying why it cannot be used with a `width` text encoder."""
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path.name} is a pickle file: convert it with `python -m sdrt.export.embedding "
                         f"{path.name} {path.stem}.safetensors` (PyTorch's weights-only loader)")
    tensors = read_safetensors(path)
    if "clip_g" in tensors or "clip_l" in tensors:
        raise InputError(f"{path.name} is an SDXL embedding (clip_l/clip_g); this model is SD 1.x/2.x")
    if len(tensors) != 1:
        raise InputError(f"{path.name} holds {len(tensors)} tensors; an embedding file holds one ([vectors, width])")
    vec = next(iter(tensors.values()))
    vec = vec[None] if vec.ndim == 1 else vec
    if vec.ndim != 2 or vec.shape[0] < 1:
        raise InputError(f"{path.name}: the tensor's shape {list(vec.shape)} is not [vectors, width]")
    if vec.shape[1] != width:
        raise InputError(f"{path.name} has vectors of width {vec.shape[1]}{_family(vec.shape[1])}, this text encoder "
                         f"takes {width}{_family(width)}: an embedding for another model family")
    return Embedding(path.stem, np.ascontiguousarray(vec, dtype=np.float32), path)


# Text encoder widths of the SD families (CLIP ViT-L/14, OpenCLIP ViT-H/14).
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x"}


def _family(width: int) -> str:
    return f" ({_FAMILIES[width]})" if width in _FAMILIES else ""


def scan(folder: Path, width: int, vocab_size: int, previous: EmbeddingSet | None = None) -> EmbeddingSet:
    """The embeddings in `folder` (and subfolders), token ids from `vocab_size` on in name order;
    `previous` is returned when no file changed."""
    files = {}
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() in (".safetensors", ".pt", ".bin") and p.is_file():
                files.setdefault(p.stem, p)
    key = tuple((n, str(p), p.stat().st_mtime_ns, p.stat().st_size) for n, p in sorted(files.items()))
    if previous is not None and previous.key == key:
        return previous
    out = EmbeddingSet(key=key)
    for name, p in sorted(files.items()):
        try:
            out.embeddings[name] = read_embedding(p, width)
        except InputError as e:
            out.skipped[name] = str(e)
    nxt = vocab_size
    for name in sorted(out.embeddings):
        n = out.embeddings[name].vectors.shape[0]
        out.ids[name] = list(range(nxt, nxt + n))
        nxt += n
    return out
