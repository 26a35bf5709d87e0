"""sdrt.runtime.infotext against A1111's infotext format: expected texts written out by hand from
the format A1111 writes (processing.py create_infotext, infotext_utils.quote) and infotexts as
A1111 saves them, PNG chunks checked with Pillow and by walking the file's chunks."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import infotext as it
from sdrt.runtime.errors import InputError

A1111_TXT2IMG = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)

A1111_INPAINT = (
    "a red fox sitting in the snow, <lora:detail:0.6>\n"
    "Negative prompt: lowres\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 768x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.6, Clip skip: 2, "
    'Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, Masked content: fill, '
    'Lora hashes: "detail: 0123abcd4567", Version: v1.10.1'
)


# --------------------------------------------------------------------------- format


def test_format_a1111_layout():
    params = {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": 7, "Seed": 1,
              "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
              "Denoising strength": 0.75, "Mask blur": 4}
    assert it.format_infotext("a cat", "blurry", params) == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Mask blur: 4"
    )


def test_format_without_negative_prompt_and_none_values():
    params = {"Steps": 20, "Sampler": "Euler", "CFG scale": 7.0, "Seed": 5, "Clip skip": None}
    assert it.format_infotext("x", "", params) == "x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5"  # whole floats as A1111 writes them
    assert it.format_infotext("x", None, params) == it.format_infotext("x", "", params)
    assert it.format_infotext("", "", params) == "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 5"
    assert it.format_infotext("", "neg", {"Steps": 1}) == "Negative prompt: neg\nSteps: 1"


def test_format_reproduces_a1111_texts():
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 965400086, "Size": "512x512", "Model hash": "45dee52b"}
    prompt, neg = A1111_TXT2IMG.split("\n")[:2]
    assert it.format_infotext(prompt, neg[len("Negative prompt: "):], params) == A1111_TXT2IMG
    params = {
        "Steps": 30, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 1234, "Size": "768x512",
        "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Denoising strength": 0.6, "Clip skip": 2,
        "Mask blur": 4, "Inpaint area": "Only masked", "Masked area padding": 32, "Masked content": "fill",
        "Lora hashes": "detail: 0123abcd4567", "Version": "v1.10.1",
    }
    assert it.format_infotext("a red fox sitting in the snow, <lora:detail:0.6>", "lowres", params) == A1111_INPAINT


def test_format_key_order():
    # given in a scrambled order: A1111's fixed keys first in its order, extras before Version
    params = {"Version": "v1", "Masked content": "fill", "Seed": 3, "My extra": "x", "Steps": 4, "Mask blur": 2,
              "Denoising strength": 0.5, "Size": "64x64", "Sampler": "Euler", "Inpaint area": "Only masked", "CFG scale": 7}
    assert it.format_infotext("p", "", params) == (
        "p\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Denoising strength: 0.5, "
        "Mask blur: 2, Inpaint area: Only masked, Masked content: fill, My extra: x, Version: v1"
    )
    assert it.format_infotext("p", "", {"Seed": 1, "Steps": 2, "Bb": 3}, reorder=False) == "p\nSeed: 1, Steps: 2, Bb: 3"


def test_quoting():
    assert it.quote("Euler a") == "Euler a"
    assert it.quote(7.5) == "7.5"
    assert it.quote("a, b") == '"a, b"'
    assert it.quote("C:\\models\\x") == '"C:\\\\models\\\\x"'
    assert it.quote("two\nlines") == '"two\\nlines"'
    assert it.quote('say "hi"') == '"say \\"hi\\""'
    assert it.quote("ünïcödé: ✓") == '"ünïcödé: ✓"'  # not \u-escaped
    assert it.unquote('"a, b"') == "a, b" and it.unquote("plain") == "plain" and it.unquote('"bad\\') == '"bad\\'
    # a value equal to its key is written bare, as A1111 does for flags
    assert it.format_infotext("p", "", {"Steps": 1, "Sampler": "x", "Seed": 2, "Hires fix": "Hires fix"}).endswith(", Hires fix")


def test_bad_keys():
    with pytest.raises(ValueError, match="infotext key 'a: b'"):
        it.format_infotext("p", "", {"a: b": 1})
    with pytest.raises(ValueError, match="infotext key"):
        it.format_infotext("p", "", {"Steps, x": 1})
    with pytest.raises(ValueError, match="at least 2 characters"):
        it.format_infotext("p", "", {"B": 1})


# --------------------------------------------------------------------------- parse


def test_parse_a1111_texts():
    prompt, neg, params = it.parse_infotext(A1111_TXT2IMG)
    assert prompt.startswith("girl with an artist's beret") and prompt.endswith("detailed, intricate")
    assert neg.startswith("ugly, fat") and neg.endswith("messy drawing")
    assert params == {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512", "Model hash": "45dee52b"}
    prompt, neg, params = it.parse_infotext(A1111_INPAINT)
    assert prompt == "a red fox sitting in the snow, <lora:detail:0.6>" and neg == "lowres"
    assert params["Lora hashes"] == "detail: 0123abcd4567"
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "32"
    assert list(params)[:3] == ["Steps", "Sampler", "Schedule type"] and params["Version"] == "v1.10.1"


def test_parse_short_last_line_is_prompt():
    # fewer than three pairs on the last line: A1111 reads it as part of the prompt
    prompt, neg, params = it.parse_infotext("first line\nweight: 1.2, style: x")
    assert prompt == "first line\nweight: 1.2, style: x" and neg == "" and params == {}
    prompt, neg, params = it.parse_infotext("only a prompt")
    assert (prompt, neg, params) == ("only a prompt", "", {})


def test_parse_windows_newlines_and_multiline_negative():
    text = "line one\r\nline two\r\nNegative prompt: bad\r\nworse\r\nSteps: 5, Sampler: Euler, Seed: 9\r\n"
    assert it.parse_infotext(text) == ("line one\nline two", "bad\nworse", {"Steps": "5", "Sampler": "Euler", "Seed": "9"})


def test_parse_empty_leading_lines_vanish():
    # A1111 joins a line with "\n" only once the prompt (or negative prompt) has text
    text = "\n\nfirst\n\nthird\nNegative prompt:\nneg\nSteps: 1, Sampler: a, Seed: 2"
    assert it.parse_infotext(text)[:2] == ("first\n\nthird", "neg")


ROUND_TRIP = [
    ("a cat", "", {}),
    ("a cat\non a sofa\n(best quality:1.2), [dog|cat]", "blurry, lowres\nugly", {}),
    ("日本語のプロンプト, ünïcödé ✓ emoji 🦊", "нет", {"Model": "мой-модель", "Note": "naïve, café: ☕"}),
    ('quotes "inside" the prompt', 'and "here"', {"Lora hashes": 'a: 1, b: 2', "Path": "C:\\models\\v1.safetensors",
                                                   "Quoted": '"fully quoted"', "Multi": "x\ny", "Empty": ""}),
    ("", "", {}),
]


@pytest.mark.parametrize("prompt, neg, extra", ROUND_TRIP)
def test_round_trip(prompt, neg, extra):
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 4294967295,
              "Size": "768x512", "Model hash": "6ce0161689", "Denoising strength": 0.75, "Mask blur": 4, **extra}
    text = it.format_infotext(prompt, neg, params)
    assert "\n" not in text.split("\n")[-1] and text.split("\n")[-1].startswith("Steps: 20, ")
    p, n, back = it.parse_infotext(text)
    assert (p, n) == (prompt, neg)
    assert back == {k: str(v) for k, v in params.items()}


# --------------------------------------------------------------------------- PNG


def png_chunks(path):
    """(type, data) of every chunk, read from the file's bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        out.append((kind.decode(), body))
        pos += 12 + length
    return out


def test_save_png_writes_a_parameters_text_chunk(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    text = it.format_infotext("a cat, on a sofa", "blurry", {"Steps": 20, "Sampler": "Euler a", "Seed": 1})
    p = tmp_path / "out.png"
    assert it.save_png(img, p, text) == p
    chunks = png_chunks(p)
    texts = [body for kind, body in chunks if kind == "tEXt"]
    assert texts == [b"parameters\x00" + text.encode("latin-1")]
    assert [k for k, _ in chunks].index("tEXt") < [k for k, _ in chunks].index("IDAT")
    with Image.open(p) as back:
        assert back.info["parameters"] == text  # what A1111's PNG Info reads
        assert np.array_equal(np.asarray(back), np.asarray(img))
    assert it.read_infotext(p) == text
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no temporary file left


def test_save_png_unicode_goes_to_itxt(tmp_path):
    text = it.format_infotext("猫, 🦊", "", {"Steps": 1, "Sampler": "Euler", "Seed": 2})
    p = tmp_path / "u.png"
    it.save_png(Image.new("RGB", (4, 4)), p, text)
    itxt = [body for kind, body in png_chunks(p) if kind == "iTXt"]
    assert len(itxt) == 1 and itxt[0].startswith(b"parameters\x00")
    assert itxt[0].endswith(text.encode("utf-8"))
    with Image.open(p) as back:
        assert back.info["parameters"] == text
    assert it.read_infotext(p) == text


def test_save_png_refuses_to_overwrite(tmp_path):
    p = tmp_path / "x.png"
    it.save_png(Image.new("RGB", (4, 4), "red"), p, "first\nSteps: 1, Sampler: a, Seed: 1")
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="x.png already exists; pass overwrite=True"):
        it.save_png(Image.new("RGB", (4, 4), "blue"), p, "second")
    assert p.read_bytes() == before
    it.save_png(Image.new("RGB", (4, 4), "blue"), p, "second\nSteps: 2, Sampler: b, Seed: 2", overwrite=True)
    assert it.read_infotext(p).startswith("second")
    with Image.open(p) as back:
        assert back.getpixel((0, 0)) == (0, 0, 255)
    assert sorted(os.listdir(tmp_path)) == ["x.png"]


class Exploding:
    """An image whose encoder fails half way through writing."""

    def save(self, fp, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError("disk full")


def test_save_png_crash_leaves_nothing_half_written(tmp_path):
    p = tmp_path / "y.png"
    with pytest.raises(OSError, match="disk full"):
        it.save_png(Exploding(), p, "t")
    assert os.listdir(tmp_path) == []
    it.save_png(Image.new("RGB", (2, 2)), p, "old")
    before = p.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        it.save_png(Exploding(), p, "t", overwrite=True)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["y.png"]


def test_read_infotext_without_parameters_and_errors(tmp_path):
    p = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(p)
    assert it.read_infotext(p) is None
    with pytest.raises(InputError, match="file not found"):
        it.read_infotext(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    with pytest.raises(InputError, match="cannot read"):
        it.read_infotext(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        it.save_png(Image.new("RGB", (2, 2)), tmp_path / "no" / "such.png", "t")
