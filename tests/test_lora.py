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
STEPS, SEED, STRENGTH = 4, 1234, 0.75
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
            if comp == "text_encoder" and not name.startswith("text_model."):
                name = "text_model." + name  # as LoRA files name the layers (transformers 5 has no text_model)
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


@pytest.fixture(scope="module")
def reference(tiny):
    """diffusers' img2img with `loras` loaded (load_lora_weights) and fused (fuse_lora)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    _, src, folder = tiny
    dp = StableDiffusionImg2ImgPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    dp.scheduler = EulerDiscreteScheduler.from_config(dp.scheduler.config)
    dp.set_progress_bar_config(disable=True)

    def run(loras: dict[str, float]):
        for name in loras:
            dp.load_lora_weights(str(folder), weight_name=f"{name}.safetensors", adapter_name=name)
        dp.set_adapters(list(loras), adapter_weights=list(loras.values()))
        dp.fuse_lora(adapter_names=list(loras))
        try:
            mods = ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"]
            with _diffusers_noise(mods, _noise(), _step_noise_source(SEED)):
                return dp(PROMPT, image=_image(), negative_prompt=NEGATIVE, strength=STRENGTH,
                          num_inference_steps=STEPS, guidance_scale=7.5).images[0]
        finally:
            dp.unfuse_lora()
            dp.unload_lora_weights()

    return run


CASES = [  # weights 1.0 and 0.5 across the cases
    ({"k_both": 1.0}, "kohya UNet + text encoder"),
    ({"k_unet": 1.0}, "kohya UNet only"),
    ({"k_te": 0.5}, "kohya text encoder only"),
    ({"p_both": 0.5}, "PEFT UNet + text encoder"),
    ({"k_conv": 1.0}, "kohya LoCon convolutions"),
    ({"k_unet": 0.5, "k_te": 1.0}, "two LoRAs"),
]


@pytest.fixture(scope="module")
def no_lora(tiny):
    return ours(tiny[0])


@pytest.mark.parametrize("loras,what", CASES, ids=[c[1].replace(" ", "-") for c in CASES])
def test_lora_matches_diffusers(tiny, reference, no_lora, loras, what):
    pipe, src, folder = tiny
    tags = "".join(f"<lora:{n}:{w}>" for n, w in loras.items())
    got = ours(pipe, PROMPT + tags)
    ref = reference(loras)
    assert _compare(what, got, ref) <= 2
    # The LoRA changes the image: the comparison above could fail.
    assert _compare(f"{what} vs no LoRA", got, no_lora) > 8


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
    """Every Linear and Conv weight is located, the UNet's self-attention q/k/v as slices of one
    packed tensor (ONNX Runtime's attention fusion)."""
    from sdrt.runtime import lora

    pipe, _, _ = tiny
    maps = {g: lora.read_map(pipe.graphs[g].path) for g in lora.GRAPHS}
    assert maps["unet"]["missing"] == [] and maps["text_encoder"]["missing"] == []
    packed = [m for m, e in maps["unet"]["modules"].items() if any(at["offset"] > 0 for at in e["at"])]
    assert packed and all(m.endswith(("attn1.to_k", "attn1.to_v")) for m in packed)


# ------------------------------------------------------------------------------------ bad inputs
def _t(*shape):
    return torch.randn(*shape)


def _sdxl():
    return {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _t(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": _t(768, 4),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _t(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": _t(1280, 4)}


def _sgm_unet():
    s = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    return {f"{s}.lora_down.weight": _t(4, 640), f"{s}.lora_up.weight": _t(640, 4)}


def _wrong_shape():  # an SD 2.x-sized text encoder layer under an SD 1.x name
    s = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {f"{s}.lora_down.weight": _t(4, 1024), f"{s}.lora_up.weight": _t(1024, 4), f"{s}.alpha": torch.tensor(4.0)}


def _unknown_layer():
    s = "lora_unet_down_blocks_7_attentions_0_proj_in"
    return {f"{s}.lora_down.weight": _t(4, 32), f"{s}.lora_up.weight": _t(32, 4)}


def _lycoris(suffix):
    s = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {f"{s}.{suffix}": _t(4, 32), f"{s}.alpha": torch.tensor(1.0)}


def _no_up():
    s = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {f"{s}.lora_down.weight": _t(4, 32, 1, 1)}


def _rank_mismatch():
    s = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {f"{s}.lora_down.weight": _t(4, 32, 1, 1), f"{s}.lora_up.weight": _t(32, 3, 1, 1)}


def _kernel_mismatch():
    s = "lora_unet_down_blocks_0_resnets_0_conv1"
    return {f"{s}.lora_down.weight": _t(4, 32, 1, 1), f"{s}.lora_up.weight": _t(32, 4, 1, 1)}


FILES = {  # file stem -> tensors (None: raw bytes below)
    "sdxl_lora": (_sdxl, "SDXL"),
    "sgm_names": (_sgm_unet, "input_blocks"),
    "sd2_lora": (_wrong_shape, "is [32, 32] here"),
    "unknown_layer": (_unknown_layer, "lacks"),
    "loha": (lambda: _lycoris("hada_w1_a"), "LoHa"),
    "lokr": (lambda: _lycoris("lokr_w1"), "LoKr"),
    "cp_locon": (lambda: _lycoris("lora_mid.weight"), "lora_mid"),
    "ia3": (lambda: _lycoris("on_input"), "(IA)^3"),
    "dora": (lambda: _lycoris("dora_scale"), "DoRA"),
    "not_a_lora": (lambda: {"model.diffusion_model.input_blocks.0.0.weight": _t(8, 4, 3, 3)}, "not a LoRA"),
    "no_up": (_no_up, "no lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"),
    "rank_mismatch": (_rank_mismatch, "does not fit"),
    "kernel_mismatch": (_kernel_mismatch, "does not fit"),
}
RAW = {
    "text_file": (b"hello, this is not a safetensors file at all\n" * 4, "not a safetensors file"),
    "empty": (b"", "not a safetensors file"),
    "bad_json": (struct_header := (16).to_bytes(8, "little") + b"{not json at all", "not JSON"),
    "truncated": (b"", "outside the file"),  # filled in by the fixture
}
PROMPTS = [
    ("<lora:k_bth:1>", "close names: k_both"),
    ("<lora:K_BOTH:1>", "not found"),
    ("<lora:nothing_like_it:1>", "not found"),
    ("<lora:../k_both:1>", "not a path"),
    ("<lora:sub/k_both:1>", "not a path"),
    ("<lora:k_both:abc>", "not a number"),
    ("<lora:k_both:1:x>", "not a number"),
    ("<lora:k_both:te=x>", "not a number"),
    ("<lora: :1>", "names no LoRA"),
    ("<hypernet:k_both:1>", "not supported"),
    ("<lora:pickled:1>", "pickle"),
] + [(f"<lora:{n}:1>", msg) for n, (_, msg) in {**FILES, **RAW}.items()]
ARGS = [
    ("not a dict", ["k_both"]),
    ("weight a string", {"k_both": "1"}),
    ("weight NaN", {"k_both": float("nan")}),
    ("weight a triple", {"k_both": (1, 2, 3)}),
    ("name empty", {"": 1.0}),
    ("name not a string", {3: 1.0}),
]


@pytest.fixture(scope="module")
def bad_folder(tiny):
    _, _, folder = tiny
    for name, (make, _) in FILES.items():
        save_file(make(), str(folder / f"{name}.safetensors"))
    for name, (data, _) in RAW.items():
        (folder / f"{name}.safetensors").write_bytes(data)
    good = (folder / "k_both.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "pickled.pt").write_bytes(b"\x80\x04not really a pickle")
    return folder


def _refused(pipe, **kw):
    steps = []
    with pytest.raises(InputError) as e:
        pipe.img2img(_image(), progress=lambda i, n: steps.append(i), steps=2, **kw)
    assert steps == []  # nothing ran
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("tag,expect", PROMPTS, ids=[p[0] for p in PROMPTS])
def test_bad_lora_in_prompt_is_one_clear_line(tiny, bad_folder, tag, expect):
    pipe, _, _ = tiny
    msg = _refused(pipe, prompt=PROMPT + tag)
    assert expect in msg, msg


@pytest.mark.parametrize("what,loras", ARGS, ids=[a[0] for a in ARGS])
def test_bad_loras_argument(tiny, what, loras):
    pipe, _, _ = tiny
    assert "loras" in _refused(pipe, prompt=PROMPT, loras=loras)


def test_int8_and_old_folders_refuse_loras(tiny, models, tmp_path):
    import dataclasses
    import shutil

    from sdrt.runtime.pipeline import Pipeline

    pipe, _, folder = tiny
    int8 = Pipeline(dataclasses.replace(pipe.info, precision={**pipe.info.precision, "unet": "int8"}), "cpu",
                    lora_dir=folder)
    assert "int8" in _refused(int8, prompt=PROMPT + "<lora:k_both:1>")
    old = tmp_path / "old"
    shutil.copytree(pipe.info.path, old)
    for graph in ("unet", "text_encoder"):
        (old / graph / "lora_map.json").unlink()
    msg = _refused(load(old, provider="cpu", verify="none", lora_dir=folder), prompt=PROMPT + "<lora:k_both:1>")
    assert "export it again" in msg


def test_cli_refuses_missing_lora_and_writes_nothing(tiny, tmp_path):
    from typer.testing import CliRunner

    from sdrt.cli.app import app

    pipe, _, folder = tiny
    src = tmp_path / "in.png"
    _image().save(src)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["img2img", str(src), "-p", "a cat <lora:k_bth:0.8>", "-m", str(pipe.info.path),
                                 "--lora-dir", str(folder), "--steps", "2", "-o", str(out), "--provider", "cpu"])
    assert r.exit_code != 0
    assert "k_both" in r.output and "Traceback" not in r.output
    assert not out.exists()


# ------------------------------------------------------------------------------------ infotext
def _addnet_hash(path) -> str:
    """A1111's hashes.addnet_hash_safetensors: sha256 of the bytes after the header, 12 digits."""
    import hashlib

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_infotext_lora_hashes(tiny):
    from sdrt.runtime.infotext import parse_infotext

    pipe, _, folder = tiny
    r = pipe.img2img(_image(), PROMPT + "<lora:k_unet:0.5>", loras={"k_te": 1.0}, steps=2, dry_run=True)
    prompt, _, params = parse_infotext(r.infotexts[0])
    assert prompt == PROMPT + "<lora:k_unet:0.5><lora:k_te:1>"
    want = ", ".join(f"{n}: {_addnet_hash(folder / f'{n}.safetensors')}" for n in ("k_unet", "k_te"))
    assert params["Lora hashes"] == want
    assert f'Lora hashes: "{want}"' in r.infotexts[0]
    keys = list(params)
    assert keys.index("Lora hashes") < keys.index("Version")


def test_from_png_finds_a_renamed_lora_by_hash(tiny, tmp_path):
    from typer.testing import CliRunner

    from sdrt.cli.app import app
    from sdrt.runtime.infotext import read_infotext, save_png
    from PIL import Image

    pipe, _, folder = tiny
    src = tmp_path / "in.png"
    _image().save(src)
    common = ["-m", str(pipe.info.path), "--lora-dir", str(folder), "--steps", "2", "--seed", "5", "--provider", "cpu",
              "--sampler", SAMPLER, "-q"]
    r = CliRunner().invoke(app, ["img2img", str(src), "-p", "a cat <lora:k_both:0.7>", "-o", str(tmp_path / "a.png"), *common])
    assert r.exit_code == 0, r.output
    text = read_infotext(tmp_path / "a.png").replace("<lora:k_both:", "<lora:renamed_since:").replace(
        "k_both: ", "renamed_since: ")
    save_png(Image.open(tmp_path / "a.png"), tmp_path / "old.png", text)
    r = CliRunner().invoke(app, ["img2img", str(src), "--from-png", str(tmp_path / "old.png"), "-o", str(tmp_path / "b.png"),
                                 *common])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    without = ours(pipe, "a cat")
    assert not np.array_equal(np.asarray(without), np.asarray(Image.open(tmp_path / "b.png")))
