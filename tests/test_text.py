"""sdrt.runtime.text against independent references: transformers' CLIPTokenizer and a plain
Python implementation of CLIP's BPE (token ids), the examples in AUTOMATIC1111's prompt_parser
docstring (prompt syntax), A1111's chunking and emphasis rules computed by hand from vocab.json
ids (chunks, embeddings), and diffusers' StableDiffusionPipeline.encode_prompt with a real
CLIPTextModel (plain prompts)."""

from __future__ import annotations

import json
import math
import shutil
import random
import re
import subprocess
import sys
import types
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.modelfolder import ModelFolderError
from sdrt.runtime.text import (
    BREAK,
    ClipTokenizer,
    apply_emphasis,
    encode_prompts,
    encode_schedules,
    parse_prompt_attention,
    prompt_chunks,
)

VOCAB_DIR = Path(__file__).resolve().parents[1] / "models" / "clip-tokenizer"
VOCAB = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
BOS, EOS = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]
PADS = {"sd1": "<|endoftext|>", "sd2": "!"}


def w(word: str) -> int:
    """The id of a whole word, from vocab.json (not from the tokenizer under test)."""
    return VOCAB[word + "</w>"]


A, CAT, DOG, COMMA = w("a"), w("cat"), w("dog"), w(",")

STRINGS = [
    "a photograph of an astronaut riding a horse",
    "",
    " ",
    "Hello, World! How's it going?",
    "don't stop believin' - it's 3:45pm, I'm sure you're right; we've said they'll know he'd go",
    "'s 'S 'T 'RE O'Neil rock'n'roll",
    "numbers 1234567890 and 3.14159, 1e-5, 0x1F, 1,000,000",
    "Café naïve résumé façade Ångström crème brûlée",
    "Cafe\u0301 decomposed e\u0301 and precomposed \u00e9",
    "emoji 🐱🚀 👩‍👩‍👧 ❤️ 👍🏽 🇫🇷",
    "CJK 漢字 かな カタカナ 한국어 中文提示词",
    "multiple    spaces\tand\ttabs\n\nnewlines\r\nand\u00a0nbsp\u3000ideographic",
    "   leading and trailing   ",
    "UPPER lower MiXeD CamelCase ALLCAPS",
    "punctuation!!! ??? ... ,,, ;;; ''' \"\"\" (((brackets))) [[x]] {y} <z> --- ___ ~~~",
    "masterpiece, best quality, ultra-detailed, 8k, (red hair:1.2), [blue eyes], \\(escaped\\)",
    "ÀÉÎÕÜ ß ẞ İstanbul ΣΊΣΥΦΟΣ Ǆ ǅ",
    "Arabic مرحبا بالعالم, Hindi नमस्ते दुनिया, Thai สวัสดี",
    "math ∑ ∞ ≈ ± ½ ² √2 x→y",
    "https://example.com/a_b?c=d&e=f#frag user@mail.org",
    "&amp; &lt;tag&gt; &#39;",
    "zero\u200bwidth soft\u00adhyphen",
    "wow!!! hey! !!",
    "a,b;c:d.e/f\\g|h",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(["a very long prompt with many words, commas, and details"] * 12),
]
SPECIAL_STRINGS = [
    "<|endoftext|> inside text",
    "a <|startoftext|>b<|endoftext|>c",
    "<|ENDOFTEXT|> upper",
]


# ----------------------------------------------------------------------------- references
def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    """CLIP's tokenizer as its paper's code describes it (rank-ordered pair merges on the bytes
    of each word, "</w>" on the last symbol), without ftfy; in plain Python."""

    def __init__(self, folder: Path):
        regex = pytest.importorskip("regex")
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(x.split()) for x in lines if x and not x.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.split = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
        self.byte = _bytes_to_unicode()

    def word(self, token: str) -> list[str]:
        parts = list(token[:-1]) + [token[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return parts

    def encode(self, text: str) -> list[int]:
        # lowercase one character at a time, as the tokenizers library (so transformers and
        # diffusers) does: no final-sigma rule ("Σ" at a word's end gives "σ", not "ς")
        text = "".join(c.lower() for c in " ".join(unicodedata.normalize("NFC", text).split()))
        ids = []
        for piece in self.split.findall(text):
            token = "".join(self.byte[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[p] for p in self.word(token)]
        return ids


@pytest.fixture(scope="module")
def hf_tokenizers():
    """transformers' CLIPTokenizer built from the same vocab.json/merges.txt, per pad convention."""
    pytest.importorskip("transformers")
    from transformers import CLIPTokenizer

    return {
        k: CLIPTokenizer(str(VOCAB_DIR / "vocab.json"), str(VOCAB_DIR / "merges.txt"), pad_token=pad, model_max_length=77)
        for k, pad in PADS.items()
    }


def _write_v4_folder(dst: Path, pad: str, *, pad_in: str = "config") -> Path:
    """A tokenizer folder as diffusers checkpoints ship it (transformers 4 layout): vocab.json,
    merges.txt, tokenizer_config.json with AddedToken dicts, special_tokens_map.json."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy2(VOCAB_DIR / f, dst / f)

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    config = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>"),
    }
    specials = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"), "unk_token": added("<|endoftext|>")}
    if pad_in == "config":
        config["pad_token"] = pad
    else:
        specials["pad_token"] = pad
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dst / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, ClipTokenizer]:
    root = tmp_path_factory.mktemp("tok")
    return {k: ClipTokenizer.from_folder(_write_v4_folder(root / k, pad)) for k, pad in PADS.items()}


# ------------------------------------------------------------------------------ tokenizer
def test_known_ids(toks):
    ids = toks["sd1"].encode_padded("a photograph of an astronaut riding a horse")
    assert ids.shape == (1, 77) and ids.dtype == np.int64
    assert ids[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert (ids[0, 10:] == 49407).all()
    sd2 = toks["sd2"].encode_padded("a photograph of an astronaut riding a horse")
    assert sd2[0, :10].tolist() == ids[0, :10].tolist() and (sd2[0, 10:] == 0).all()
    t = toks["sd2"]
    assert (t.bos_id, t.eos_id, t.pad_id, t.comma_id, t.max_length, t.vocab_size) == (49406, 49407, 0, COMMA, 77, 49408)


@pytest.mark.parametrize("pad", PADS)
def test_ids_match_transformers(toks, hf_tokenizers, pad):
    hf = hf_tokenizers[pad]
    strings = STRINGS + SPECIAL_STRINGS
    theirs = hf(strings, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ours = toks[pad].encode_padded(strings)
    for s, a, b in zip(strings, ours.tolist(), theirs):
        assert a == b, s
    bare = hf(strings, add_special_tokens=False)["input_ids"]
    assert toks[pad].tokenize(strings) == bare


def test_ids_match_reference_bpe(toks):
    ref = ReferenceBPE(VOCAB_DIR)
    assert ref.encode("a photograph of an astronaut riding a horse") == [320, 8853, 539, 550, 18376, 6765, 320, 4558]
    for s in STRINGS:
        assert toks["sd1"].tokenize([s])[0] == ref.encode(s), s


def test_from_folder_layouts(tmp_path, hf_tokenizers, toks):
    strings = STRINGS + SPECIAL_STRINGS
    for pad, hf in hf_tokenizers.items():
        # transformers' own save: tokenizer.json + tokenizer_config.json
        saved = tmp_path / f"saved-{pad}"
        hf.save_pretrained(saved)
        assert (saved / "tokenizer.json").is_file()
        t = ClipTokenizer.from_folder(saved)
        assert t.pad_id == hf.pad_token_id
        assert t.encode_padded(strings).tolist() == hf(strings, padding="max_length", max_length=77, truncation=True)["input_ids"]
        # tokenizer.json alone: the pad token is its extra special token, if any
        (saved / "tokenizer_config.json").unlink()
        assert ClipTokenizer.from_folder(saved).pad_id == hf.pad_token_id
        # pad token given only by special_tokens_map.json
        t2 = ClipTokenizer.from_folder(_write_v4_folder(tmp_path / f"map-{pad}", PADS[pad], pad_in="map"))
        assert t2.pad_id == hf.pad_token_id
        assert t2.encode_padded(strings).tolist() == toks[pad].encode_padded(strings).tolist()
    # the vocabulary committed with sdrt, and from_files
    plain = ClipTokenizer.from_folder(VOCAB_DIR)
    assert plain.pad_id == EOS and plain.encode_padded(strings).tolist() == toks["sd1"].encode_padded(strings).tolist()
    f2 = ClipTokenizer.from_files(VOCAB_DIR / "vocab.json", VOCAB_DIR / "merges.txt", pad_token="!")
    assert f2.encode_padded(strings).tolist() == toks["sd2"].encode_padded(strings).tolist()


def test_from_folder_is_cached_until_files_change(tmp_path):
    folder = _write_v4_folder(tmp_path / "t", "<|endoftext|>")
    a = ClipTokenizer.from_folder(folder)
    assert ClipTokenizer.from_folder(str(folder)) is a
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "!"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg) + "\n")
    b = ClipTokenizer.from_folder(folder)
    assert b is not a and b.pad_id == 0


def test_from_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ClipTokenizer.from_folder(tmp_path / "nowhere")
    folder = _write_v4_folder(tmp_path / "t", "!")
    (folder / "merges.txt").unlink()
    with pytest.raises(ModelFolderError) as e:
        ClipTokenizer.from_folder(folder)
    assert str(folder) in str(e.value) and "is missing merges.txt (" in str(e.value)
    (folder / "vocab.json").unlink()
    with pytest.raises(ValueError, match="missing vocab.json and merges.txt"):
        ClipTokenizer.from_folder(folder)
    broken = _write_v4_folder(tmp_path / "b", "!")
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        ClipTokenizer.from_folder(broken)
    bad_pad = _write_v4_folder(tmp_path / "p", "<nonexistent-pad>")
    with pytest.raises(ValueError, match="pad token"):
        ClipTokenizer.from_folder(bad_pad)
    bad_json = _write_v4_folder(tmp_path / "j", "!")
    (bad_json / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        ClipTokenizer.from_folder(bad_json)


def test_prompt_is_tokenized_in_one_backend_call(toks):
    """A prompt with emphasis is split into pieces, and all of them go to the Rust tokenizer in one
    batch call (not one call per piece, nor a Python BPE); benchmarks/startup.py times it."""
    prompt = "masterpiece, best quality, (a photograph:1.2) of an astronaut riding a [horse] on the moon, highly detailed, 8k"
    t = toks["sd1"]
    expected = prompt_chunks(prompt, t)
    calls = []

    class Counting:
        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            attr = getattr(self._backend, name)
            if name.startswith("encode"):
                def counted(*a, **kw):
                    calls.append(name)
                    return attr(*a, **kw)
                return counted
            return attr

    backend = t.backend
    t.backend = Counting(backend)
    try:
        got = prompt_chunks(prompt, t)
    finally:
        t.backend = backend
    assert len(parse_prompt_attention(prompt)) > 1 and calls == ["encode_batch"]
    assert np.array_equal(got.ids, expected.ids) and np.array_equal(got.weights, expected.weights)


def test_text_module_imports_no_torch():
    code = "import sys, sdrt.runtime.text; bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------ prompt syntax
def _p(text):
    return [[t, wt] for t, wt in parse_prompt_attention(text)]


def test_parse_a1111_docstring_examples():
    # the examples in the docstring of A1111's modules/prompt_parser.py, floats compared exactly
    assert _p("normal text") == [["normal text", 1.0]]
    assert _p("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert _p("(unbalanced") == [["unbalanced", 1.1]]
    assert _p("\\(literal\\]") == [["(literal]", 1.0]]
    assert _p("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert _p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0],
        ["house", 1.5730000000000004],
        [" ", 1.1],
        ["on", 1.0],
        [" a ", 1.1],
        ["hill", 0.55],
        [", sun, ", 1.1],
        ["sky", 1.4641000000000006],
        [".", 1.1],
    ]


def test_parse_rules():
    assert _p("") == [["", 1.0]]
    assert _p("[x]") == [["x", 1 / 1.1]]
    assert _p("[[x]]") == [["x", 1 / 1.1 / 1.1]]
    assert _p("((x))") == [["x", 1.1 * 1.1]]
    assert _p("([x])") == [["x", 1 / 1.1 * 1.1]]
    assert _p("(x:1.5)") == [["x", 1.5]]
    assert _p("(x:-0.5) (y:+2)") == [["x", -0.5], [" ", 1.0], ["y", 2.0]]
    assert _p("((x:2)") == [["x", 2 * 1.1]]  # the outer bracket is closed at the end
    assert _p("[(x") == [["x", 1.1 / 1.1]]  # unclosed: round ones first, then square ones
    assert _p("a \\\\ b") == [["a \\ b", 1.0]]
    assert _p("a\\b \\:") == [["ab :", 1.0]]  # a backslash that escapes nothing vanishes
    assert _p("a) b] c:d :1.2) e") == [["a) b] c:d :1.2) e", 1.0]]  # nothing open: literal
    assert _p("(x:1.2 )") == [["x", 1.2]]  # whitespace around the weight is allowed
    assert _p("(x:1.2 y)") == [["x:1.2 y", 1.1]]  # not a weight: literal, bracket closes with 1.1
    assert _p("(a:1.5)(b:1.5)") == [["ab", 1.5]]
    with pytest.raises(InputError, match="1.2.3"):
        parse_prompt_attention("(x:1.2.3)")
    with pytest.raises(InputError):
        parse_prompt_attention(None)


# AUTOMATIC1111's emphasis syntax, re-derived from its documented token grammar (the regex
# alternatives of modules/prompt_parser.py, tried in this order at every position):
_A1111_TOKENS = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes; a lone backslash
\(|\[|                           # open
:\s*([+-]?[.\d]+)\s*\)|            # weight, closing a round bracket
\)|]|                             # close
[^\\()\[\]:]+|                     # text
:
""", re.X)


def _reference_attention(text):
    """Weights by the rules of A1111's docstring: an opening bracket starts a group, its close
    multiplies everything since it opened (1.1, 1/1.1, or the weight); a close with nothing open
    is text; groups still open at the end close there, round ones first; equal neighbours merge."""
    pieces, opened = [], {"(": [], "[": []}

    def close(kind, factor):
        start = opened[kind].pop()
        for p in pieces[start:]:
            p[1] *= factor

    for m in _A1111_TOKENS.finditer(text):
        tok = m.group(0)
        if tok[0] == "\\":
            pieces.append([tok[1:], 1.0])
        elif tok in ("(", "["):
            opened[tok].append(len(pieces))
        elif m.group(1) is not None and opened["("]:
            close("(", float(m.group(1)))
        elif tok == ")" and opened["("]:
            close("(", 1.1)
        elif tok == "]" and opened["["]:
            close("[", 1 / 1.1)
        else:
            for k, part in enumerate(re.split(r"\s*\bBREAK\b\s*", tok)):
                if k:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for kind, factor in (("(", 1.1), ("[", 1 / 1.1)):
        for start in opened[kind]:
            for p in pieces[start:]:
                p[1] *= factor
    merged = []
    for p in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == p[1]:
            merged[-1][0] += p[0]
        else:
            merged.append(list(p))
    return merged


def test_parse_weight_whitespace_hand_checked():
    # A1111's weight pattern is :\s*([+-]?[.\d]+)\s*\) (checked by hand against A1111 v1.10.1)
    assert _p("a (cat: 1.2) dog") == [["a ", 1.0], ["cat", 1.2], [" dog", 1.0]]
    assert _p("(cat:1.2 )") == [["cat", 1.2]]
    assert _p("(cat : 1.2)") == [["cat ", 1.2]]  # whitespace before the colon stays in the text
    assert _p("(a:\t1.2)") == [["a", 1.2]]
    assert _p("(a:\n 0.5\n)") == [["a", 0.5]]
    assert _p("(a: +2 ) b") == [["a", 2.0], [" b", 1.0]]
    assert _p("(a: 1.2 b)") == [["a: 1.2 b", 1.1]]  # text after the number: not a weight
    assert _p("a: 1.2) b") == [["a: 1.2) b", 1.0]]  # a weight with nothing open is text
    assert _p("((a: 2 ))") == [["a", 2.2]]


def _random_prompts(n, seed):
    rng = random.Random(seed)
    atoms = ["a", "cat", " ", "  ", "\t", "(", ")", "[", "]", ":", "1.2", "0.5", "-1", "+2", ".", "\\(", "\\",
             "\\]", "BREAK", " BREAK ", ",", "\n"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 14))) for _ in range(n)]


def test_parse_matches_a1111_grammar_on_generated_prompts():
    checked = 0
    for text in _random_prompts(3000, seed=13):
        try:
            want = _reference_attention(text)
        except ValueError:  # a weight like "1.2.": A1111 fails on float(); sdrt says which weight
            with pytest.raises(InputError):
                parse_prompt_attention(text)
            continue
        assert _p(text) == want, text
        checked += 1
    assert checked > 2500


@pytest.mark.parametrize("seed", range(5))
def test_parse_weight_whitespace_property(seed):
    """Whitespace between the colon, the weight and the bracket never changes the result."""
    rng = random.Random(seed)
    ws = [" ", "  ", "\t", "\n", "\u3000", ""]
    for _ in range(200):
        inner = rng.choice(["cat", "a (b) c", "[x] y", "BREAK z", ""])
        w = rng.choice(["1.2", "0.5", "-1", "+2", "3", ".7"])
        plain = f"p ({inner}:{w}) q"
        spaced = f"p ({inner}:{rng.choice(ws)}{w}{rng.choice(ws)}) q"
        assert _p(spaced) == _p(plain), spaced


def test_parse_break():
    assert _p("a BREAK b") == [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]
    assert _p("a,BREAK,b") == [["a,", 1.0], ["BREAK", -1.0], [",b", 1.0]]
    assert _p("BREAK") == [["", 1.0], ["BREAK", -1.0], ["", 1.0]]
    assert _p("a  BREAK\n b (c) BREAK") == [["a", 1.0], ["BREAK", -1.0], ["b ", 1.0], ["c", 1.1], ["", 1.0], ["BREAK", -1.0], ["", 1.0]]
    for literal in ("a break b", "BREAKS", "xBREAK", "BREAK_x"):
        assert _p(literal) == [[literal, 1.0]]
    # inside brackets the entry is scaled and so no longer a break (as in A1111)
    assert _p("(a BREAK b)") == [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]
    assert BREAK == ("BREAK", -1.0)


# ------------------------------------------------------------------------------- chunking
def _row(tokens, pad=EOS):
    """A chunk as A1111 builds it: BOS, tokens, EOS padding to 76, EOS; for a pad id other than
    EOS every id after the first EOS is the pad id."""
    row = [BOS] + list(tokens) + [EOS] * (75 - len(tokens)) + [EOS]
    if pad != EOS:
        first = row.index(EOS)
        row = row[: first + 1] + [pad] * (76 - first)
    return row


def _wrow(weights):
    return [1.0] + list(weights) + [1.0] * (76 - len(weights))


def test_chunk_short_prompt_matches_diffusers_ids(toks):
    for pad, t in toks.items():
        for s in STRINGS[:-1]:
            c = prompt_chunks(s, t, emphasis=False)
            assert c.ids.tolist() == t.encode_padded(s).tolist(), s
            assert (c.weights == 1).all()


def test_chunk_weights_and_layout(toks):
    c = prompt_chunks("a (cat:1.5) [dog]", toks["sd1"])
    assert c.ids.dtype == np.int64 and c.weights.dtype == np.float32 and c.ids.shape == (1, 77)
    assert c.ids.tolist() == [_row([A, CAT, DOG])]
    np.testing.assert_array_equal(c.weights, np.array([_wrow([1.0, 1.5, 1 / 1.1])], np.float32))
    assert c.token_count == 3
    c2 = prompt_chunks("a (cat:1.5) [dog]", toks["sd2"])
    assert c2.ids.tolist() == [_row([A, CAT, DOG], pad=0)]
    # emphasis off: brackets and weights are text
    plain = prompt_chunks("(cat:1.5)", toks["sd1"], emphasis=False)
    assert plain.ids.tolist() == [_row([w("("), CAT, w(":"), w("1"), w("."), w("5"), w(")")])]
    # pieces are tokenized on their own, as A1111 does: "(cat)s" is "cat" + "s"
    assert prompt_chunks("(cat)s", toks["sd1"]).ids.tolist() == [_row([CAT, w("s")])]


def test_chunk_lengths(toks):
    t = toks["sd1"]
    for n, k in ((0, 1), (1, 1), (74, 1), (75, 1), (76, 2), (150, 2), (151, 3)):
        c = prompt_chunks(" ".join(["a"] * n), t)
        assert c.ids.shape == (k, 77) and c.token_count == n, n
        flat = [x for row in c.ids.tolist() for x in row[1:-1] if x != EOS]
        assert flat == [A] * n
    assert prompt_chunks("", t).ids.tolist() == [_row([])]
    assert prompt_chunks("", toks["sd2"]).ids.tolist() == [_row([], pad=0)]
    c = prompt_chunks(" ".join(["a"] * 80), toks["sd2"])
    assert c.ids.tolist() == [_row([A] * 75, pad=0), _row([A] * 5, pad=0)]


def test_chunk_comma_backtrack(toks):
    t = toks["sd1"]
    # comma at position 60 of the full chunk (15 from its end): the 14 words after it move
    c = prompt_chunks("a " * 60 + ", " + "cat " * 20, t)
    assert c.ids.tolist() == [_row([A] * 60 + [COMMA]), _row([CAT] * 20)]
    assert c.token_count == 75 + 20
    # comma 20 tokens from the end: still moves; 21: does not
    c = prompt_chunks("a " * 55 + ", " + "cat " * 25, t)
    assert c.ids.tolist() == [_row([A] * 55 + [COMMA]), _row([CAT] * 25)]
    c = prompt_chunks("a " * 54 + ", " + "cat " * 25, t)
    assert c.ids.tolist() == [_row([A] * 54 + [COMMA] + [CAT] * 20), _row([CAT] * 5)]
    # disabled
    c = prompt_chunks("a " * 60 + ", " + "cat " * 20, t, comma_backtrack=0)
    assert c.ids.tolist() == [_row([A] * 60 + [COMMA] + [CAT] * 14), _row([CAT] * 6)]
    # the 76th token is a comma: no backtrack, the comma opens the next chunk
    c = prompt_chunks("a " * 70 + ", " + "cat " * 4 + ", dog", t)
    assert c.ids.tolist() == [_row([A] * 70 + [COMMA] + [CAT] * 4), _row([COMMA, DOG])]
    # weights travel with the moved tokens; the last comma counts
    c = prompt_chunks("a " * 50 + ", " + "a " * 10 + ", (cat:1.5) " * 1 + "cat " * 13 + "dog", t)
    assert c.ids.tolist() == [_row([A] * 50 + [COMMA] + [A] * 10 + [COMMA]), _row([CAT] * 14 + [DOG])]
    np.testing.assert_array_equal(c.weights[1], np.array(_wrow([1.5] + [1.0] * 14), np.float32))
    # a text without comma is cut at 75
    c = prompt_chunks("cat " * 80, t)
    assert c.ids.tolist() == [_row([CAT] * 75), _row([CAT] * 5)]


def test_chunk_break(toks):
    t = toks["sd1"]
    assert prompt_chunks("a BREAK cat", t).ids.tolist() == [_row([A]), _row([CAT])]
    assert prompt_chunks("a BREAK cat", toks["sd2"]).ids.tolist() == [_row([A], pad=0), _row([CAT], pad=0)]
    assert prompt_chunks("BREAK cat", t).ids.tolist() == [_row([]), _row([CAT])]
    assert prompt_chunks("a BREAK", t).ids.tolist() == [_row([A])]
    assert prompt_chunks("a BREAK BREAK cat", t).ids.tolist() == [_row([A]), _row([]), _row([CAT])]
    c = prompt_chunks("(a) BREAK [cat]", t)
    assert c.ids.tolist() == [_row([A]), _row([CAT])]
    np.testing.assert_array_equal(c.weights, np.array([_wrow([1.1]), _wrow([1 / 1.1])], np.float32))
    # BREAK right after 75 tokens closes that chunk and adds no empty one; after 76 the 76th
    # token's chunk closes
    assert len(prompt_chunks("a " * 75 + "BREAK cat", t)) == 2
    assert len(prompt_chunks("a " * 76 + "BREAK cat", t)) == 3
    # emphasis off: BREAK is a word
    assert prompt_chunks("a BREAK cat", t, emphasis=False).ids.tolist() == [_row([A, w("break"), CAT])]
    # inside brackets it is a weighted word, as in A1111
    c = prompt_chunks("(a BREAK cat)", t)
    assert c.ids.tolist() == [_row([A, w("break"), CAT])]
    np.testing.assert_allclose(c.weights[0, 1:4], [1.1, -1.1, 1.1], rtol=1e-7)


# ------------------------------------------------------------------------------ embedding
D = 6


def fake_encoder():
    """A stand-in text encoder whose output depends on id, position and channel."""
    calls = []

    def f(ids):
        ids = np.asarray(ids, np.float64)[..., None]
        pos = np.arange(ids.shape[-2], dtype=np.float64)[:, None]
        d = np.arange(D, dtype=np.float64)
        return np.sin(ids * 0.37 + d) + 0.01 * pos * (d + 1) + 0.5

    def encode(ids, clip_skip):
        assert ids.dtype in (np.int32, np.int64) and ids.ndim == 2 and ids.shape[1] == 77
        calls.append((ids.copy(), clip_skip))
        return f(ids).astype(np.float32)

    encode.calls = calls
    encode.f = f
    return encode


def emphasised(z, weights):
    """A1111's "Original" emphasis, in float64."""
    zw = z * np.asarray(weights, np.float64)[:, None]
    return zw * (z.mean() / zw.mean())


def test_emphasis_math():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((77, 16)).astype(np.float32) + 0.3
    weights = np.ones(77, np.float32)
    weights[3:6] = [1.5, 0.5, 1.21]
    out = apply_emphasis(z, weights)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, emphasised(z.astype(np.float64), weights.astype(np.float64)), rtol=1e-5, atol=1e-6)
    assert np.isclose(out.mean(dtype=np.float64), z.mean(dtype=np.float64), rtol=1e-5)
    assert apply_emphasis(z, np.ones(77)) is z


def test_encode_emphasis_and_layout(toks):
    enc = fake_encoder()
    cond, uncond = encode_prompts(["a (cat:1.5) [dog]"], ["(dog)"], toks["sd1"], enc, clip_skip=2)
    assert len(enc.calls) == 1 and enc.calls[0][1] == 2
    assert cond.shape == uncond.shape == (1, 77, D) and cond.dtype == uncond.dtype == np.float32
    want_c = emphasised(enc.f(np.array([_row([A, CAT, DOG])]))[0], _wrow([1.0, 1.5, 1 / 1.1]))
    want_u = emphasised(enc.f(np.array([_row([DOG])]))[0], _wrow([1.1]))
    np.testing.assert_allclose(cond[0], want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(uncond[0], want_u, rtol=1e-5, atol=1e-6)
    # emphasis off: brackets are words, nothing is scaled
    cond, uncond = encode_prompts("(cat)", None, toks["sd1"], enc, emphasis=False)
    np.testing.assert_array_equal(cond[0], enc.f(np.array([_row([w("("), CAT, w(")")])]))[0].astype(np.float32))
    np.testing.assert_array_equal(uncond[0], enc.f(np.array([_row([])]))[0].astype(np.float32))


def test_encode_multichunk_and_cond_uncond_padding(toks):
    t = toks["sd1"]
    enc = fake_encoder()
    long = "a " * 60 + ", (cat:1.3) " + "cat " * 19 + "BREAK dog"
    rows = [_row([A] * 60 + [COMMA]), _row([CAT] * 20), _row([DOG])]
    weights = [_wrow([1.0] * 61), _wrow([1.3] + [1.0] * 19), _wrow([1.0])]
    cond, uncond = encode_prompts([long], ["cat"], t, enc)
    assert cond.shape == uncond.shape == (1, 3 * 77, D)
    (ids, _), = enc.calls
    # every distinct chunk once: the three of the prompt and the negative
    assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, rows + [_row([CAT])]))
    want = np.concatenate([emphasised(enc.f(np.array([r]))[0], wt) for r, wt in zip(rows, weights)])
    np.testing.assert_allclose(cond[0], want, rtol=1e-5, atol=1e-6)
    cat = enc.f(np.array([_row([CAT])]))[0]
    # the shorter side is repeated to the common length (3 = lcm(3, 1) chunks)
    np.testing.assert_allclose(uncond[0], np.concatenate([cat, cat, cat]), rtol=1e-6)
    # the negative prompt is the longer one: cond is repeated
    cond2, uncond2 = encode_prompts(["cat"], [long], t, enc)
    np.testing.assert_allclose(uncond2[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cond2[0], np.concatenate([cat, cat, cat]), rtol=1e-6)
    # 2 and 3 chunks: both tiled to 6
    two = "a " * 80  # 2 chunks
    cond3, uncond3 = encode_prompts([two], [long], t, enc)
    assert cond3.shape == uncond3.shape == (1, 6 * 77, D)
    np.testing.assert_array_equal(cond3[0], np.tile(cond3[0, : 2 * 77], (3, 1)))
    np.testing.assert_array_equal(uncond3[0], np.tile(uncond3[0, : 3 * 77], (2, 1)))


def test_encode_schedules_pads_a_schedule_to_its_longest_text(toks):
    """A1111 encodes a prompt's schedule texts as one batch: shorter ones get empty-prompt chunks."""
    t = toks["sd1"]
    enc = fake_encoder()
    long = "a " * 60 + ", " + "cat " * 20
    (short_z, long_z), (neg,) = encode_schedules([["cat", long], ["dog"]], t, enc)
    (ids, _), = enc.calls
    assert len({tuple(r) for r in ids.tolist()}) == len(ids)  # each distinct chunk once
    empty = enc.f(np.array([_row([])]))[0]
    np.testing.assert_allclose(short_z, np.concatenate([enc.f(np.array([_row([CAT])]))[0], empty]), rtol=1e-6)
    np.testing.assert_allclose(long_z, np.concatenate([enc.f(np.array([_row([A] * 60 + [COMMA])]))[0],
                                                       enc.f(np.array([_row([CAT] * 20)]))[0]]), rtol=1e-6)
    np.testing.assert_allclose(neg, enc.f(np.array([_row([DOG])]))[0], rtol=1e-6)  # its own schedule: no padding


def test_encode_batch(toks):
    t = toks["sd2"]
    enc = fake_encoder()
    long = "cat " * 80
    cond, uncond = encode_prompts(["dog", long, "dog"], "a", t, enc)
    assert cond.shape == uncond.shape == (3, 154, D)
    ids = enc.calls[0][0]
    assert ids.shape[0] == 4  # dog, cat x75, cat x5, a
    dog = enc.f(np.array([_row([DOG], pad=0)]))[0]
    np.testing.assert_allclose(cond[0, :77], dog, rtol=1e-6)
    # a side's shorter prompts repeat their last vector (A1111's batch stacking)
    np.testing.assert_allclose(cond[0, 77:], np.repeat(dog[-1:], 77, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(cond[0], cond[2])
    want_long = enc.f(np.array([_row([CAT] * 75, pad=0), _row([CAT] * 5, pad=0)])).reshape(154, D)
    np.testing.assert_allclose(cond[1], want_long, rtol=1e-6)
    # cond and uncond sides differ in length: uncond is repeated to cond's length
    a = enc.f(np.array([_row([A], pad=0)]))[0]
    for i in range(3):
        np.testing.assert_allclose(uncond[i], np.concatenate([a, a]), rtol=1e-6)


def test_encode_input_errors(toks):
    enc = fake_encoder()
    with pytest.raises(InputError, match="negative"):
        encode_prompts(["a", "b"], ["x"], toks["sd1"], enc)
    with pytest.raises(InputError, match="at least one"):
        encode_prompts([], [], toks["sd1"], enc)
    with pytest.raises(InputError, match="clip_skip"):
        encode_prompts("a", "", toks["sd1"], enc, clip_skip=0)
    with pytest.raises(InputError, match="string"):
        encode_prompts([3], [""], toks["sd1"], enc)
    with pytest.raises(ValueError, match="text encoder returned shape"):
        encode_prompts("a", "", toks["sd1"], lambda ids, k: np.zeros((1, 77, 4), np.float32))


# ------------------------------------------------------------------- real CLIP text model
@pytest.fixture(scope="module")
def clip_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = transformers.CLIPTextModel(config).eval()
    if not hasattr(model, "text_model"):
        # transformers 5 dropped the text_model level that diffusers' clip_skip path still reads
        object.__setattr__(model, "text_model", types.SimpleNamespace(final_layer_norm=model.final_layer_norm))
    return model


def torch_encoder(model):
    """The text encoder callable, in torch: clip_skip k = final_layer_norm(hidden_states[-k])."""
    import torch

    def encode(ids, clip_skip):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), output_hidden_states=True)
            z = out.last_hidden_state if clip_skip == 1 else model.final_layer_norm(out.hidden_states[-clip_skip])
        return z.numpy()

    return encode


def test_real_clip_text_model(clip_model, toks):
    import torch

    t = toks["sd1"]
    enc = torch_encoder(clip_model)
    cond, uncond = encode_prompts(["a (red:1.2) cat, " + "dog " * 80], ["blurry"], t, enc)
    assert cond.shape == uncond.shape == (1, 154, 32) and cond.dtype == uncond.dtype == np.float32
    assert np.isfinite(cond).all() and np.isfinite(uncond).all()
    with torch.no_grad():
        blurry = clip_model(input_ids=torch.from_numpy(t.encode_padded("blurry"))).last_hidden_state.numpy()[0]
    np.testing.assert_allclose(uncond[0, :77], blurry, atol=1e-5)
    # the shorter side is repeated to the longer one's length
    np.testing.assert_array_equal(uncond[0, 77:], uncond[0, :77])


@pytest.mark.parametrize("pad", PADS)
def test_matches_diffusers_encode_prompt(clip_model, hf_tokenizers, toks, pad):
    """Plain prompts under 75 tokens: the same ids and the same embeddings as diffusers."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=clip_model,
        tokenizer=hf_tokenizers[pad],
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    import torch

    prompts = ["a photograph of an astronaut riding a horse!", "Café, 漢字 & emoji 🐱 don't   stop"]
    negatives = ["blurry, low quality!!", ""]
    seen = []
    hook = clip_model.register_forward_pre_hook(lambda m, args: seen.append(args[0].numpy().copy()))
    try:
        with torch.no_grad():
            theirs_c, theirs_u = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)
            their_ids = np.concatenate(seen)
            skip_c, _ = pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=1)
    finally:
        hook.remove()
    enc = torch_encoder(clip_model)
    calls = []
    cond, uncond = encode_prompts(prompts, negatives, toks[pad], lambda ids, k: calls.append(ids) or enc(ids, k), emphasis=False)
    assert sorted(map(tuple, calls[0].tolist())) == sorted(map(tuple, their_ids.tolist()))
    np.testing.assert_allclose(cond, theirs_c.numpy(), atol=1e-5)
    np.testing.assert_allclose(uncond, theirs_u.numpy(), atol=1e-5)
    # diffusers' clip_skip=1 is A1111's (and this callable's) clip skip 2
    cond2, _ = encode_prompts(prompts, negatives, toks[pad], enc, clip_skip=2, emphasis=False)
    np.testing.assert_allclose(cond2, skip_c.numpy(), atol=1e-5)
    # with emphasis on, a prompt without brackets gives the same result
    cond3, uncond3 = encode_prompts(prompts, negatives, toks[pad], enc)
    np.testing.assert_allclose(cond3, theirs_c.numpy(), atol=1e-5)
    np.testing.assert_allclose(uncond3, theirs_u.numpy(), atol=1e-5)
