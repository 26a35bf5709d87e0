"""Textual-inversion embeddings against diffusers' load_textual_inversion on the same tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.runtime import InputError, load
from test_pipeline_parity import NEGATIVE, SIZE, _compare, _diffusers_noise, _image, _step_noise_source

STEPS, SEED, STRENGTH = 4, 1234, 0.75
WIDTH = 32  # the tiny text encoder's
EMBEDDINGS = {"tiemb": 1, "multiemb": 3, "negemb": 2}


@pytest.fixture(scope="module")
def tiny(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(11)
    for name, n in EMBEDDINGS.items():
        save_file({"emb_params": torch.randn(n, WIDTH, generator=g)}, str(folder / f"{name}.safetensors"))
    save_file({"emb_params": torch.randn(2, 768, generator=g)}, str(folder / "wide.safetensors"))
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(folder / "xlemb.safetensors"))
    (folder / "pickled.pt").write_bytes(b"\x80\x04 not read")
    pipe = load(models.exported("tiny-sd1"), provider="cpu", embeddings_dir=folder, lora_dir=folder)
    return pipe, models.source("tiny-sd1"), folder


@pytest.fixture(scope="module")
def theirs(tiny):
    """diffusers' img2img with the embeddings loaded by load_textual_inversion."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    _, src, folder = tiny
    dp = StableDiffusionImg2ImgPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    dp.scheduler = EulerDiscreteScheduler.from_config(dp.scheduler.config)
    dp.set_progress_bar_config(disable=True)
    for name in EMBEDDINGS:
        dp.load_textual_inversion(str(folder / f"{name}.safetensors"), token=name)

    def run(prompt, negative):
        noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
        with _diffusers_noise(["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"], noise,
                              _step_noise_source(SEED)):
            return dp(prompt, image=_image(), negative_prompt=negative, strength=STRENGTH, num_inference_steps=STEPS,
                      guidance_scale=7.5).images[0]

    return run


@pytest.fixture(scope="module")
def plain(tiny):
    """The same model without embeddings: the names are plain words."""
    return load(tiny[0].info.path, provider="cpu", embeddings_dir=tiny[2] / "none")


def _ours(pipe, prompt, negative):
    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    return pipe.img2img(_image(), prompt, negative, strength=STRENGTH, steps=STEPS, sampler="EulerDiscreteScheduler",
                        seed=SEED, noise=noise, sample_posterior=False).images[0]


CASES = [
    ("a tiemb circle on a white background", NEGATIVE, "single vector"),
    ("a multiemb circle on a white background", NEGATIVE, "three vectors"),
    ("a tiemb circle, multiemb", "negemb, blurry", "several, and in the negative prompt"),
]


@pytest.mark.parametrize("prompt,negative,what", CASES, ids=[c[2].replace(" ", "-") for c in CASES])
def test_embedding_matches_diffusers(tiny, theirs, plain, prompt, negative, what):
    got = _ours(tiny[0], prompt, negative)
    assert _compare(what, got, theirs(prompt, negative)) <= 2
    # Without the folder the names are plain words: the embeddings changed the image.
    assert _compare(f"{what} vs plain words", got, _ours(plain, prompt, negative)) > 4


def test_token_table_is_a_gather_initializer(tiny):
    """The exported text encoder reads token vectors with a Gather on an initializer of the
    vocabulary's size, which the runtime extends."""
    import onnx

    pipe, _, _ = tiny
    m = onnx.load(str(pipe.graphs["text_encoder"].path), load_external_data=False)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and inits.get(n.input[0]) == [49408, WIDTH]]
    assert len(gathers) == 1 and gathers[0].input[1] in {i.name for i in m.graph.input} | {
        o for n in m.graph.node for o in n.output}


def test_embedding_ids_and_chunks(tiny):
    """A name becomes the embedding's ids, one per vector; an embedding never straddles two chunks."""
    from sdrt.runtime.text import prompt_chunks

    pipe, _, _ = tiny
    emb = pipe.embedding_set()
    matcher = (emb.lookup(pipe.tokenizer), emb.replacement)
    c = prompt_chunks("a multiemb", pipe.tokenizer, embeddings=matcher)
    a = pipe.tokenizer.tokenize(["a"])[0]
    assert list(c.ids[0, 1:5]) == a + emb.ids["multiemb"] and c.ids[0, 5] == pipe.tokenizer.eos_id
    assert all(i >= 49408 for i in emb.ids["multiemb"])
    c = prompt_chunks("a " * 74 + "multiemb", pipe.tokenizer, embeddings=matcher, comma_backtrack=0)
    assert len(c) == 2 and list(c.ids[1, 1:4]) == emb.ids["multiemb"]


BAD = [("a wide circle", "width 768"), ("a xlemb circle", "SDXL"), ("a pickled circle", "pickle")]


@pytest.mark.parametrize("prompt,expect", BAD, ids=[b[1] for b in BAD])
def test_unusable_embedding_named_in_prompt_is_refused(tiny, prompt, expect):
    pipe, _, _ = tiny
    for kw in ({"prompt": prompt}, {"prompt": "a circle", "negative_prompt": prompt}):
        with pytest.raises(InputError) as e:
            pipe.img2img(_image(), steps=2, dry_run=True, **kw)
        assert expect in str(e.value) and "\n" not in str(e.value)


def test_pt_converter(tmp_path):
    from safetensors.numpy import load_file

    from sdrt.export.embedding import EmbeddingError, convert

    vec = torch.randn(2, WIDTH)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "x", "step": 3}, tmp_path / "x.pt")
    out = convert(tmp_path / "x.pt", tmp_path / "x.safetensors")
    np.testing.assert_array_equal(load_file(str(out))["emb_params"], vec.numpy())

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"string_to_param": {"*": vec}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="weights-only"):
        convert(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()


def test_infotext_ti_hashes(tiny):
    import hashlib

    from sdrt.runtime.infotext import parse_infotext

    pipe, _, folder = tiny
    r = pipe.img2img(_image(), "a tiemb circle, multiemb, tiemb", "negemb", steps=2, dry_run=True)
    _, _, params = parse_infotext(r.infotexts[0])
    want = ", ".join(f"{n}: {hashlib.sha256((folder / f'{n}.safetensors').read_bytes()).hexdigest()[:12]}"
                     for n in ("tiemb", "multiemb", "negemb"))
    assert params["TI hashes"] == want
    assert "TI hashes" not in parse_infotext(pipe.img2img(_image(), "a circle", steps=2, dry_run=True).infotexts[0])[2]
