"""Prompt text to CLIP token ids and text embeddings. NumPy and `tokenizers` only.

    tok = ClipTokenizer.from_folder("model/tokenizer")
    cond, uncond = encode_prompts(["a (red:1.2) circle"], [""], tok, text_encoder)

Two conventions live here:

- diffusers: `ClipTokenizer.encode_padded` gives what `CLIPTokenizer(text, padding="max_length",
  max_length=77, truncation=True)` gives: BOS, at most 75 tokens, EOS, then the pad token
  (`<|endoftext|>` on SD 1.x, `!` = id 0 on SD 2.x).
- AUTOMATIC1111: prompts of any length, with its emphasis syntax. `parse_prompt_attention` reads
  `(x)`, `[x]`, `(x:w)`, escapes and BREAK; `prompt_chunks` splits the weighted tokens into chunks
  of 75 (BOS + 75 + EOS each, comma backtrack, BREAK); `encode_prompts` encodes every chunk, joins
  each prompt's chunks along the sequence axis (77*k), applies the emphasis (z *= weight, then
  the chunk's mean restored) and gives cond and uncond the same length for batched CFG.

A short plain prompt gives the same ids (and so the same embeddings) both ways.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import InputError
from .modelfolder import ModelFolderError

__all__ = [
    "ClipTokenizer",
    "PromptChunks",
    "BREAK",
    "CHUNK_LENGTH",
    "COMMA_BACKTRACK",
    "parse_prompt_attention",
    "prompt_chunks",
    "apply_emphasis",
    "encode_prompts",
    "encode_schedules",
    "pad_with_empty",
    "common_length",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context: BOS + 75 tokens + EOS
CHUNK_LENGTH = MAX_LENGTH - 2
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
BREAK = ("BREAK", -1.0)  # the entry parse_prompt_attention gives for a BREAK keyword

# CLIP's word split: the special tokens, English contractions, runs of letters, single digits,
# runs of everything else; whitespace separates and is dropped.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# ------------------------------------------------------------------------------------ tokenizer
class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer, as transformers' CLIPTokenizer builds it.

    Normalisation NFC, whitespace runs collapsed to one space, lowercase; CLIP's split; byte-level
    BPE with "</w>" closing each word. The special tokens (BOS, EOS, pad) are matched in the text
    before normalisation, as transformers does. Encoding never adds BOS/EOS by itself: `tokenize`
    gives the bare ids, `encode_padded` and `prompt_chunks` add them.
    """

    def __init__(
        self,
        backend: Tokenizer,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        max_length: int = MAX_LENGTH,
        source: str = "",
    ):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.source = source
        where = f" of {source}" if source else ""
        ids = {}
        for role, token in (("BOS", bos_token), ("EOS", eos_token), ("pad", pad_token)):
            ids[role] = backend.token_to_id(token)
            if ids[role] is None:
                raise ModelFolderError(f"the tokenizer{where} has no {role} token {token!r} in its vocabulary")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id, self.eos_id, self.pad_id = ids["BOS"], ids["EOS"], ids["pad"]
        comma = backend.token_to_id(",</w>")
        self.comma_id: int | None = comma  # None: no comma backtrack for this vocabulary
        if not 3 <= int(max_length) <= 4096:
            raise ModelFolderError(f"the tokenizer{where} has model_max_length {max_length}; expected a context such as 77")
        self.max_length = int(max_length)

    def __repr__(self) -> str:
        return f"ClipTokenizer({self.source!r}, vocab={self.vocab_size}, pad={self.pad_token!r})"

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chunk_length(self) -> int:
        """Prompt tokens per chunk (75 for CLIP)."""
        return self.max_length - 2

    # -------------------------------------------------------------------------- construction
    @classmethod
    def from_files(
        cls,
        vocab: str | Path,
        merges: str | Path,
        *,
        pad_token: str = EOS_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        max_length: int = MAX_LENGTH,
    ) -> "ClipTokenizer":
        """Build the tokenizer from CLIP's vocab.json and merges.txt."""
        backend = _build_backend(str(vocab), str(merges), (bos_token, eos_token, unk_token, pad_token), unk_token)
        return cls(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, max_length=max_length, source=str(Path(vocab).parent))

    @classmethod
    def from_folder(cls, path: str | Path) -> "ClipTokenizer":
        """Load a diffusers/optimum `tokenizer/` folder.

        tokenizer.json when present, else vocab.json + merges.txt; tokenizer_config.json (then
        special_tokens_map.json) give the BOS/EOS/pad tokens and model_max_length. Loaded once per
        folder state: later calls return the same object until a file changes.
        """
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise ModelFolderError(f"tokenizer folder {folder} does not exist (expected vocab.json and merges.txt, or tokenizer.json)")
        stamp = []
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            p = folder / name
            try:
                st = p.stat()
                stamp.append((name, st.st_size, st.st_mtime_ns))
            except OSError:
                pass
        return _load_folder(str(folder), tuple(stamp))

    # ------------------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS, never truncated."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts")
        if len(texts) == 1:
            return [self.backend.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_padded(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, max_length) int64: BOS, the first max_length-2 tokens, EOS, then pad ids; what
        transformers gives with padding="max_length", truncation=True (diffusers' encode_prompt)."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        for row, ids in zip(out, self.tokenize(texts)):
            ids = ids[: self.chunk_length]
            row[0] = self.bos_id
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eos_id
        return out


def _build_backend(vocab: str, merges: str, specials: Sequence[str], unk_token: str) -> Tokenizer:
    model = BPE.from_file(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    seen = []
    for s in specials:  # a special token must be in the vocabulary (the text encoder's embedding table)
        if s not in seen and model.token_to_id(s) is not None:
            seen.append(s)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in seen])
    return tok


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFolderError(f"cannot read the {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"the {what} {path} is not a JSON object")
    return data


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # transformers 4 writes {"__type": "AddedToken", "content": ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=16)
def _load_folder(folder: str, stamp: tuple) -> ClipTokenizer:
    root = Path(folder)
    names = {name for name, *_ in stamp}
    config: dict = {}
    for name, what in (("special_tokens_map.json", "special tokens map"), ("tokenizer_config.json", "tokenizer config")):
        if name in names:  # tokenizer_config.json wins over special_tokens_map.json
            config.update({k: v for k, v in _read_json(root / name, what).items() if v is not None})
    tokens = {}
    for key, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("unk_token", EOS_TOKEN), ("pad_token", None)):
        tokens[key] = _token_content(config.get(key)) or default
    pad_given = tokens["pad_token"] is not None
    tokens["pad_token"] = tokens["pad_token"] or tokens["eos_token"]
    max_length = config.get("model_max_length")
    if not isinstance(max_length, (int, float)) or not 3 <= max_length <= 4096:
        max_length = MAX_LENGTH  # absent, or transformers' "no limit" placeholder (1e30)
    kwargs = dict(bos_token=tokens["bos_token"], eos_token=tokens["eos_token"], pad_token=tokens["pad_token"], max_length=int(max_length), source=folder)

    if "tokenizer.json" in names:
        path = root / "tokenizer.json"
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises its own exception type
            raise ModelFolderError(f"cannot read the tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise ModelFolderError(f"{path} is not a CLIP tokenizer (expected a BPE model with the '</w>' end-of-word suffix)")
        if not pad_given:  # no config: the padding settings, else the one extra special token (SD 2.x "!")
            padding = spec.get("padding") or {}
            extra = [t.get("content") for t in spec.get("added_tokens") or [] if t.get("special") and t.get("content") not in (tokens["bos_token"], tokens["eos_token"], tokens["unk_token"])]
            pad = padding.get("pad_token") or (extra[0] if len(extra) == 1 else None)
            if isinstance(pad, str) and pad:
                kwargs["pad_token"] = pad
        return ClipTokenizer(backend, **kwargs)

    missing = [n for n in ("vocab.json", "merges.txt") if n not in names]
    if missing:
        raise ModelFolderError(
            f"tokenizer folder {root} has no tokenizer.json and is missing {' and '.join(missing)} "
            "(a CLIP tokenizer needs vocab.json and merges.txt, or tokenizer.json)"
        )
    specials = (tokens["bos_token"], tokens["eos_token"], tokens["unk_token"], tokens["pad_token"])
    try:
        backend = _build_backend(str(root / "vocab.json"), str(root / "merges.txt"), specials, tokens["unk_token"])
    except Exception as e:
        raise ModelFolderError(f"cannot read the tokenizer vocabulary in {root} (vocab.json, merges.txt): {e}") from None
    return ClipTokenizer(backend, **kwargs)


# ------------------------------------------------------------------------- A1111 prompt syntax
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
# ":1.25)" or ": 1.25 )" closes a round bracket with weight 1.25 (A1111's `:\s*([+-]?[.\d]+)\s*\)`)
_WEIGHT_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_TEXT_RE = re.compile(r"[^\\()\[\]:]+")
_ESCAPABLE = "()[]\\"
ROUND = 1.1
SQUARE = 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt written in AUTOMATIC1111's emphasis syntax into (text, weight) pieces.

    "(x)" multiplies x's weight by 1.1, "[x]" divides it by 1.1, "(x:w)" multiplies it by w
    (whitespace around w allowed: "(x: 1.2 )"); nesting multiplies. "\\(" "\\)" "\\[" "\\]" "\\\\" are the literal characters; any other
    backslash vanishes. A ")" or "]" with nothing open is literal text; brackets still open at
    the end are closed there. "BREAK" as a separate word gives the entry ("BREAK", -1.0) (it
    swallows the whitespace around it); a bracket around BREAK scales that entry too, which
    then no longer counts as a break, exactly as in A1111. Adjacent pieces of equal weight are
    merged; an empty prompt gives [("", 1.0)].

    Weights are multiplied in A1111's order (innermost bracket first, open brackets last: round
    ones, then square ones) so the floats are identical to A1111's.
    """
    if not isinstance(text, str):
        raise InputError(f"a prompt must be a string, got {type(text).__name__}")
    items: list[list] = []  # [text, weight], mutable while brackets close
    rounds: list[int] = []  # index into items where each open bracket started
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in items[start:]:
            item[1] *= factor

    def add_text(s: str) -> None:
        for k, part in enumerate(_BREAK_RE.split(s)):
            if k:
                items.append(list(BREAK))
            items.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in _ESCAPABLE:
                items.append([nxt, 1.0])
                i += 2
            else:  # a backslash that escapes nothing is dropped
                items.append(["", 1.0])
                i += 1
        elif c == "(":
            rounds.append(len(items))
            i += 1
        elif c == "[":
            squares.append(len(items))
            i += 1
        elif c == ":":
            m = _WEIGHT_RE.match(text, i)
            if m is None:
                add_text(":")
                i += 1
            else:
                if rounds:
                    scale(rounds.pop(), _weight(m.group(1), text))
                else:
                    add_text(m.group(0))
                i = m.end()
        elif c == ")":
            if rounds:
                scale(rounds.pop(), ROUND)
            else:
                add_text(c)
            i += 1
        elif c == "]":
            if squares:
                scale(squares.pop(), SQUARE)
            else:
                add_text(c)
            i += 1
        else:
            m = _TEXT_RE.match(text, i)
            add_text(m.group(0))
            i = m.end()

    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if not items:
        items = [["", 1.0]]

    merged = [items[0]]
    for item in items[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, float(w)) for t, w in merged]


def _weight(s: str, prompt: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise InputError(f"prompt weight {s!r} is not a number in {prompt!r}; write weights as (text:1.2)") from None


# ------------------------------------------------------------------------------- A1111 chunks
@dataclass(frozen=True)
class PromptChunks:
    """A prompt as chunks of CLIP context: ids and per-token weights, both (k, 77)."""

    ids: np.ndarray  # int64; each row BOS + 75 + EOS, padded as the tokenizer's convention says
    weights: np.ndarray  # float32; 1.0 on BOS, EOS and padding
    token_count: int  # prompt tokens as A1111 counts them (75 per full chunk + the last one's)

    def __len__(self) -> int:
        return self.ids.shape[0]


def prompt_chunks(
    text: str,
    tokenizer: ClipTokenizer,
    *,
    emphasis: bool = True,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings=None,
) -> PromptChunks:
    """A prompt as AUTOMATIC1111 feeds it to CLIP: chunks of 75 tokens, each BOS + 75 + EOS.

    With `emphasis` the prompt is read with `parse_prompt_attention` and each piece tokenized on
    its own (so "(x)" costs no tokens); without it the prompt is plain text, brackets and BREAK
    included (A1111's emphasis "None"). A chunk is padded with EOS; with a pad token other than
    EOS (SD 2.x) every id after the chunk's first EOS becomes the pad id. A BREAK closes the
    chunk. When a chunk is full and the next token is not a comma, the tokens after the chunk's
    last comma move to the next chunk if that comma is among its last `comma_backtrack` tokens.
    An empty prompt gives one chunk BOS, EOS, padding.

    embeddings: (lookup, replacement) of textual-inversion embeddings (runtime/embeddings.py):
    where a name's tokens start, the longest matching name is replaced by its embedding's ids.
    """
    if not isinstance(text, str):
        raise InputError(f"a prompt must be a string, got {type(text).__name__}")
    parsed = parse_prompt_attention(text) if emphasis else [(text, 1.0)]
    tokenized = tokenizer.tokenize([t for t, _ in parsed])
    size = tokenizer.chunk_length
    comma = tokenizer.comma_id if comma_backtrack > 0 else None

    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    count = 0

    def close(last: bool = False) -> None:
        nonlocal ids, weights, last_comma, count
        count += len(ids) if last else size
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for tokens, (piece, weight) in zip(tokenized, parsed):
        if (piece, weight) == BREAK:
            close()
            continue
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma:
                last_comma = len(ids)
            elif comma is not None and len(ids) == size and last_comma != -1 and size - last_comma <= comma_backtrack:
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == size:
                close()
            found = _embedding_at(tokens, pos, embeddings) if embeddings else None
            if found is None:
                ids.append(token)
                weights.append(weight)
                pos += 1
                continue
            length, new_ids = found
            if len(ids) + len(new_ids) > size:  # an embedding is not split between chunks (A1111)
                close()
            ids.extend(new_ids)
            weights.extend([weight] * len(new_ids))
            pos += length
    if ids or not chunks:
        close(last=True)

    k = len(chunks)
    out_ids = np.full((k, size + 2), tokenizer.eos_id, dtype=np.int64)
    out_w = np.ones((k, size + 2), dtype=np.float32)
    out_ids[:, 0] = tokenizer.bos_id
    for row, (t, w) in enumerate(chunks):
        out_ids[row, 1 : 1 + len(t)] = t
        out_w[row, 1 : 1 + len(w)] = w
    if tokenizer.pad_id != tokenizer.eos_id:
        for row in out_ids:
            first = int(np.argmax(row == tokenizer.eos_id))
            row[first + 1 :] = tokenizer.pad_id
    return PromptChunks(out_ids, out_w, count)


def _embedding_at(tokens, pos: int, embeddings) -> tuple[int, list[int]] | None:
    """(tokens the name takes, the embedding's ids) when an embedding's name starts at tokens[pos]."""
    lookup, replacement = embeddings
    for name_tokens, name in lookup.get(tokens[pos], ()):
        if tuple(tokens[pos:pos + len(name_tokens)]) == name_tokens:
            return len(name_tokens), replacement(name)
    return None


# ---------------------------------------------------------------------------------- embeddings
def apply_emphasis(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one chunk's embeddings z (77, D): every token's vector is
    multiplied by its weight, then the whole chunk by mean(z before) / mean(z after)."""
    w = np.asarray(weights, dtype=np.float32)
    if np.all(w == 1.0):
        return z
    before = z.mean(dtype=np.float64)
    weighted = z * w[:, None]
    after = weighted.mean(dtype=np.float64)
    return weighted * np.float32(before / after)


TextEncoder = Callable[[np.ndarray, int], np.ndarray]


def encode_prompts(
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None,
    tokenizer: ClipTokenizer,
    text_encoder: TextEncoder,
    *,
    clip_skip: int = 1,
    emphasis: bool = True,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(cond, uncond) text embeddings, each (N, 77*k, D) float32, in AUTOMATIC1111's manner.

    `text_encoder(ids, clip_skip)` maps int ids (M, 77) to embeddings (M, 77, D); it is called
    once, on every distinct chunk of all prompts and negative prompts together. `clip_skip` is
    passed through as it is. `negative_prompts` is one string per prompt, one string for all, or
    None (empty).

    Each prompt's chunks are encoded separately and joined along the sequence axis; with
    `emphasis` each chunk gets `apply_emphasis`. Prompts of one side (cond or uncond) shorter
    than the longest there are extended by repeating their last vector (A1111's batch stacking).
    When cond and uncond differ in length, both are tiled to the least common multiple of their
    chunk counts, so they run as one CFG batch: cross-attention over a sequence repeated r times
    equals cross-attention over the sequence (each key's softmax weight and value appear r
    times), which is what A1111 computes by default (separate model calls for the two lengths,
    pad_cond_uncond off) and what ComfyUI does (it repeats conds to a common length).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("encode_prompts needs at least one prompt")
    if negative_prompts is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
        negatives = [negative_prompts] * len(prompts)
    else:
        negatives = list(negative_prompts)
        if len(negatives) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts; give one negative prompt per prompt, or one for all")
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or clip_skip < 1:
        raise InputError(f"clip_skip must be an integer of at least 1, got {clip_skip!r}")

    parsed: dict[str, PromptChunks] = {}

    def chunks_of(text: str) -> PromptChunks:
        if text not in parsed:
            parsed[text] = prompt_chunks(text, tokenizer, emphasis=emphasis, comma_backtrack=comma_backtrack,
                                         embeddings=embeddings)
        return parsed[text]

    cond_chunks = [chunks_of(p) for p in prompts]
    uncond_chunks = [chunks_of(p) for p in negatives]
    k_cond = max(len(c) for c in cond_chunks)
    k_uncond = max(len(c) for c in uncond_chunks)
    rows, z = _encode_rows(cond_chunks + uncond_chunks, text_encoder, clip_skip)

    def embed(c: PromptChunks) -> np.ndarray:
        return _embed(c, rows, z, emphasis)

    def stack(side: list[PromptChunks], k: int) -> np.ndarray:
        length = k * z.shape[1]
        out = []
        for c in side:
            e = embed(c)
            if e.shape[0] < length:
                e = np.concatenate([e, np.repeat(e[-1:], length - e.shape[0], axis=0)], axis=0)
            out.append(e)
        return np.stack(out)

    return common_length(stack(cond_chunks, k_cond), stack(uncond_chunks, k_uncond))


def common_length(cond: np.ndarray, uncond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cond and uncond (..., L, D) of different sequence lengths (whole chunks) repeated along the
    sequence axis to the least common multiple of their lengths: one CFG batch whose
    cross-attention equals separate calls at each one's own length (see encode_prompts)."""
    n = math.lcm(cond.shape[-2], uncond.shape[-2])
    reps = [1] * (cond.ndim - 2)
    cond = np.tile(cond, (*reps, n // cond.shape[-2], 1))
    uncond = np.tile(uncond, (*reps, n // uncond.shape[-2], 1))
    return np.ascontiguousarray(cond, dtype=np.float32), np.ascontiguousarray(uncond, dtype=np.float32)


def _encode_rows(groups: Sequence[PromptChunks], text_encoder: TextEncoder, clip_skip: int):
    """One encoder call on the distinct chunk rows of `groups`: (row bytes -> index, z)."""
    rows: dict[bytes, int] = {}
    unique: list[np.ndarray] = []
    for c in groups:
        for row in c.ids:
            key = row.tobytes()
            if key not in rows:
                rows[key] = len(unique)
                unique.append(row)
    ids = np.stack(unique)
    z = np.asarray(text_encoder(ids, int(clip_skip)))
    if z.ndim != 3 or z.shape[:2] != ids.shape:
        raise ValueError(f"the text encoder returned shape {z.shape} for ids of shape {ids.shape}; expected {ids.shape + ('D',)}")
    return rows, z.astype(np.float32, copy=False)


def _embed(c: PromptChunks, rows: dict, z: np.ndarray, emphasis: bool) -> np.ndarray:
    parts = []
    for row, w in zip(c.ids, c.weights):
        zi = z[rows[row.tobytes()]]
        parts.append(apply_emphasis(zi, w) if emphasis else zi)
    return np.concatenate(parts, axis=0)


def encode_schedules(
    schedules: Sequence[Sequence[str]],
    tokenizer: ClipTokenizer,
    text_encoder: TextEncoder,
    *,
    clip_skip: int = 1,
    emphasis: bool = True,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings=None,
) -> list[list[np.ndarray]]:
    """Embeddings (77*k, D) of every text of every schedule (the texts a prompt takes over the
    steps with prompt editing), as A1111's get_learned_conditioning makes them: a schedule's
    texts are encoded as one batch, so the shorter ones are extended by whole chunks of the
    empty prompt to the longest. One encoder call on the distinct chunks of all texts."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or clip_skip < 1:
        raise InputError(f"clip_skip must be an integer of at least 1, got {clip_skip!r}")
    parsed: dict[str, PromptChunks] = {}
    for text in ["", *(t for sched in schedules for t in sched)]:
        if text not in parsed:
            parsed[text] = prompt_chunks(text, tokenizer, emphasis=emphasis, comma_backtrack=comma_backtrack,
                                         embeddings=embeddings)
    rows, z = _encode_rows(list(parsed.values()), text_encoder, clip_skip)
    empty = _embed(parsed[""], rows, z, emphasis)
    out = []
    for sched in schedules:
        k = max(len(parsed[t]) for t in sched)
        out.append([pad_with_empty(_embed(parsed[t], rows, z, emphasis), k * empty.shape[0], empty) for t in sched])
    return out


def pad_with_empty(z: np.ndarray, length: int, empty: np.ndarray) -> np.ndarray:
    """z (n, D) extended to `length` rows by whole chunks of the empty prompt's embedding `empty`."""
    extra = (length - z.shape[0]) // empty.shape[0]
    if extra <= 0:
        return np.ascontiguousarray(z, dtype=np.float32)
    return np.ascontiguousarray(np.concatenate([z, np.tile(empty, (extra, 1))]), dtype=np.float32)
