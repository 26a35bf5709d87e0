"""Derive CLIP's BPE vocabulary files (vocab.json, merges.txt) from open_clip's bundled BPE list.

    python scripts/derive_clip_vocab.py [path/to/bpe_simple_vocab_16e6.txt.gz] [OUT_DIR]

This follows CLIP's own SimpleTokenizer construction: 256 byte symbols, the same with '</w>',
the first 48894 merges, then <|startoftext|> and <|endoftext|> (49408 tokens in all).
The output folder is what `models/clip-tokenizer/` holds; the test models and the default model
copy it into their `tokenizer/` folders.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def derive(bpe_gz: Path, out: Path) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(dict(zip(vocab, range(len(vocab)))), ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")


def main() -> None:
    if len(sys.argv) > 1:
        src = Path(sys.argv[1])
    else:
        import importlib.util  # locate the file without importing open_clip (it needs torchvision)

        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("open_clip_torch is not installed: pass the path of bpe_simple_vocab_16e6.txt.gz")
        src = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "models" / "clip-tokenizer"
    derive(src, out)
    print(f"wrote {out}/vocab.json and merges.txt")


if __name__ == "__main__":
    main()
