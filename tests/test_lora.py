"""LoRAs at run time against diffusers' load_lora_weights + fuse_lora on the same tiny SD 1.x model.

Random LoRAs (kohya/A1111 and diffusers/PEFT layouts, UNet and text encoder, LoCon convolutions)
are written as .safetensors files; diffusers loads and fuses them into its PyTorch pipeline, sdrt
merges them into the exported graphs' weights. Both run img2img with the same noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.runtime import InputError, load
from test_pipeline_parity import NEGATIVE, SIZE, _compare, _diffusers_noise, _image, _step_noise_source

PROMPT = "a red circle on a white background"
STEPS, SEED, STRENGTH = 6, 1234, 0.75
SAMPLER = "EulerDiscreteScheduler"
ATTN = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


def _targets(module, suffixes):
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(suffixes)]


def make_lora(src, fmt: str, *, unet=True, te=True, conv=False, rank=4, alpha=2.0, seed=0, scale=0.3) -> dict:
    """A random LoRA for the diffusers folder `src`: {key: tensor} in `fmt` (kohya or peft)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    g = torch.Generator().manual_seed(seed)
    out = {}
    comps = []
    if unet:
        comps.append(("unet", UNet2DConditionModel.from_pretrained(src, subfolder="unet"), ATTN + (CONV if conv else ())))
    if te:
        comps.append(("text_encoder", CLIPTextModel.from_pretrained(src, subfolder="text_encoder"), TE))
    for comp, module, suffixes in comps:
        for name, m in _targets(module, suffixes):
            w = m.weight
            if w.ndim == 4:
                down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * scale
                up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * scale
            else:
                down = torch.randn(rank, w.shape[1], generator=g) * scale
                up = torch.randn(w.shape[0], rank, generator=g) * scale
            if fmt == "kohya":
                stem = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
                out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
                out[f"{stem}.alpha"] = torch.tensor(alpha)
            else:
                out[f"{comp}.{name}.lora_A.weight"], out[f"{comp}.{name}.lora_B.weight"] = down, up
    return out


@pytest.fixture(scope="module")
def tiny(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    src = models.source("tiny-sd1")
    specs = {
        "k_both": ("kohya", dict(seed=1)),
        "k_unet": ("kohya", dict(te=False, seed=2)),
        "k_te": ("kohya", dict(unet=False, seed=3, scale=0.5)),
        "p_both": ("peft", dict(seed=4, scale=0.2)),
        "k_conv": ("kohya", dict(conv=True, te=False, seed=5, scale=0.15)),
        "k_other": ("kohya", dict(seed=6)),
    }
    for name, (fmt, kw) in specs.items():
        save_file(make_lora(src, fmt, **kw), str(folder / f"{name}.safetensors"))
    pipe = load(models.exported("tiny-sd1"), provider="cpu", lora_dir=folder)
    return pipe, src, folder


def _noise():
    return np.random.default_rng(7).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)


def ours(pipe, prompt=PROMPT, **kw):
    return pipe.img2img(_image(), prompt, NEGATIVE, strength=STRENGTH, steps=STEPS, sampler=SAMPLER, seed=SEED,
                        noise=_noise(), sample_posterior=False, **kw).images[0]


def theirs(src, folder, loras: dict[str, float]):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    dp = StableDiffusionImg2ImgPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    dp.scheduler = EulerDiscreteScheduler.from_config(dp.scheduler.config)
    dp.set_progress_bar_config(disable=True)
    if loras:
        for name in loras:
            dp.load_lora_weights(str(folder), weight_name=f"{name}.safetensors", adapter_name=name)
        dp.set_adapters(list(loras), adapter_weights=list(loras.values()))
        dp.fuse_lora(adapter_names=list(loras))
        dp.unload_lora_weights()  # the fused weights stay
    mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"]
    with _diffusers_noise(mods, _noise(), _step_noise_source(SEED)):
        return dp(PROMPT, image=_image(), negative_prompt=NEGATIVE, strength=STRENGTH, num_inference_steps=STEPS,
                  guidance_scale=7.5).images[0]


CASES = [
    ({"k_both": 1.0}, "kohya UNet + text encoder"),
    ({"k_both": 0.5}, "kohya weight 0.5"),
    ({"k_unet": 1.0}, "kohya UNet only"),
    ({"k_te": 0.5}, "kohya text encoder only"),
    ({"p_both": 1.0}, "PEFT UNet + text encoder"),
    ({"p_both": 0.5}, "PEFT weight 0.5"),
    ({"k_conv": 1.0}, "kohya LoCon convolutions"),
    ({"k_unet": 0.5, "k_te": 1.0}, "two LoRAs"),
]


@pytest.mark.parametrize("loras,what", CASES, ids=[c[1].replace(" ", "-") for c in CASES])
def test_lora_matches_diffusers(tiny, loras, what):
    pipe, src, folder = tiny
    tags = "".join(f"<lora:{n}:{w}>" for n, w in loras.items())
    got = ours(pipe, PROMPT + tags)
    ref = theirs(src, folder, loras)
    assert _compare(what, got, ref) <= 2
    # The LoRA changes the image: the comparison above could fail.
    assert _compare(f"{what} vs no LoRA", got, ours(pipe)) > 8


def test_loras_argument_equals_prompt_tags(tiny):
    pipe, _, _ = tiny
    a = np.asarray(ours(pipe, PROMPT + "<lora:k_unet:0.5><lora:k_te:1>"))
    b = np.asarray(ours(pipe, loras={"k_unet": 0.5, "k_te": 1.0}))
    assert np.array_equal(a, b)


def test_te_and_unet_weights_apart(tiny):
    """<lora:NAME:TE:UNET> as A1111: text encoder first, UNet second."""
    pipe, _, _ = tiny
    split = np.asarray(ours(pipe, PROMPT + "<lora:k_both:0:1>"))
    unet_only = np.asarray(ours(pipe, PROMPT + "<lora:k_both:te=0:unet=1>"))
    assert np.array_equal(split, unet_only)
    both = np.asarray(ours(pipe, PROMPT + "<lora:k_both:1>"))
    assert np.abs(split.astype(int) - both).max() > 8


def test_switching_equals_fresh_loads(models, tiny):
    """A -> B -> none -> A in one pipeline gives what a fresh pipeline gives for each."""
    pipe, _, folder = tiny
    seq = [{"k_both": 1.0}, {"k_other": 0.8}, {}, {"k_both": 1.0}]
    switched = [np.asarray(ours(pipe, loras=s)) for s in seq]
    for s, got in zip(seq, switched):
        fresh = load(models.exported("tiny-sd1"), provider="cpu", lora_dir=folder)
        assert np.array_equal(got, np.asarray(ours(fresh, loras=s))), s


def test_merged_weights_equal_pytorch(tiny):
    """The merged initializers, read back through the map, equal diffusers' fused weights."""
    from diffusers import UNet2DConditionModel

    from sdrt.runtime import lora

    pipe, src, folder = tiny
    resolved = pipe._resolve_loras([lora.LoraUse("k_conv", 0.7, 0.7)])
    g = pipe.graphs["unet"]
    lmap = lora.read_map(g.path)
    merged = lora.merge(g.path, lmap, [(resolved[0][2]["unet"], 0.7)])
    from diffusers import StableDiffusionPipeline

    dp = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    dp.load_lora_weights(str(folder), weight_name="k_conv.safetensors")
    dp.fuse_lora(lora_scale=0.7)
    dp.unload_lora_weights()
    mods = dict(dp.unet.named_modules())
    checked = 0
    for module, entry in lmap["modules"].items():
        for at in entry["at"]:
            if at["initializer"] not in merged:
                continue
            w = mods[module].weight.detach().numpy()
            arr = merged[at["initializer"]]
            if at["layout"] == "same":
                got = arr
            else:
                got = arr[:, at["offset"]:at["offset"] + w.shape[0]].T
            np.testing.assert_allclose(got.reshape(w.shape), w, atol=1e-5)
            checked += 1
    assert checked >= 30


def test_map_covers_every_layer(tiny):
    from sdrt.runtime import lora

    pipe, _, _ = tiny
    for graph in lora.GRAPHS:
        lmap = lora.read_map(pipe.graphs[graph].path)
        assert lmap["missing"] == []
        assert any(at["layout"] == "T" and at["offset"] > 0 for e in lmap["modules"].values() for at in e["at"]) or graph != "unet"
