"""LoRAs on the fused fp16 cuda export, checked on the CPU against diffusers' fused weights.

The cuda target holds the LoRA-able weights in fp16, the UNet's attention q/k/v (k/v) packed per
head, its convolution weights NHWC-transposed (NhwcConv), its feed-forward projection ahead of
BiasSplitGelu. The CPU provider has no kernel for the UNet's fused ops (NhwcConv, GroupNorm,
packed MultiHeadAttention), so the UNet is checked up to the initializers the runtime hands to
ONNX Runtime; the fp16 text encoder runs on the CPU provider with them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from safetensors.torch import save_file

from sdrt.runtime import lora
from sdrt.runtime.modelfolder import read_model_folder
from sdrt.runtime.pipeline import Pipeline
from test_lora import PROMPT, make_lora

LORAS = {"k16": ("kohya", dict(conv=True, seed=21, scale=0.2)), "p16": ("peft", dict(conv=True, seed=22, scale=0.2))}


@pytest.fixture(scope="module")
def fp16(models, tmp_path_factory):
    """A Pipeline on the fp16 cuda folder whose text encoder runs on the CPU provider."""
    folder = tmp_path_factory.mktemp("loras16")
    src = models.source("tiny-sd1")
    for name, (fmt, kw) in LORAS.items():
        save_file(make_lora(src, fmt, **kw), str(folder / f"{name}.safetensors"))
    info = read_model_folder(models.exported("tiny-sd1", target="cuda", precision="fp16"))
    assert info.precision["unet"] == info.precision["text_encoder"] == "fp16"
    pipe = Pipeline(dataclasses.replace(info, target="cpu"), "cpu", lora_dir=folder)
    return pipe, src, folder


def _pytorch_layout(arr: np.ndarray, at: dict, shape: list[int]) -> np.ndarray:
    """The weight of `shape` that the initializer `arr` holds at `at`, as PyTorch holds it."""
    out = shape[0]
    if at["layout"] == "same":
        return arr.reshape(shape)
    if at["layout"] == "T":
        return arr[:, at["offset"]:at["offset"] + out].T.reshape(shape)
    if at["layout"] == "nhwc":
        return arr.transpose(0, 3, 1, 2)
    assert at["layout"] == "packed"
    return arr.reshape(arr.shape[0], at["heads"], at["count"], -1)[:, :, at["index"], :].reshape(arr.shape[0], out).T


def _fused_modules(src, folder, name, weight):
    """diffusers' UNet and text encoder with the LoRA loaded (load_lora_weights) and fused (fuse_lora)."""
    from diffusers import StableDiffusionPipeline

    dp = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    base = {c: {n: m.weight.detach().numpy().copy() for n, m in getattr(dp, c).named_modules() if hasattr(m, "weight")
                and m.weight is not None} for c in ("unet", "text_encoder")}
    dp.load_lora_weights(str(folder), weight_name=f"{name}.safetensors")
    dp.fuse_lora(lora_scale=weight)
    dp.unload_lora_weights()
    return dp, base


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-sd2-v"])
def test_fp16_map_covers_what_the_fp32_map_covers(models, fp16, kind):
    """Every LoRA-able layer is located in the fp16 cuda graphs (SD 2.x: per-block head counts)."""
    cuda = read_model_folder(models.exported(kind, target="cuda", precision="fp16"))
    cpu = read_model_folder(models.exported(kind))
    for graph in lora.GRAPHS:
        m16, m32 = lora.read_map(cuda.graph_files[graph]), lora.read_map(cpu.graph_files[graph])
        assert m16["missing"] == [] and m32["missing"] == []
        assert sorted(m16["modules"]) == sorted(m32["modules"]) and len(m16["modules"]) > 10
        assert {at["dtype"] for e in m16["modules"].values() for at in e["at"]} == {"float16"}
    layouts = {}
    for module, e in lora.read_map(cuda.graph_files["unet"])["modules"].items():
        for at in e["at"]:
            layouts.setdefault((at["layout"], at.get("count")), []).append(module)
    assert all(m.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v")) for m in layouts[("packed", 3)])
    assert all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in layouts[("packed", 2)])
    assert any(m.endswith("resnets.0.conv1") for m in layouts[("nhwc", None)])
    assert any(m.endswith("ff.net.0.proj") for m in layouts[("T", None)])


@pytest.mark.parametrize("name,weight", [("k16", 1.0), ("p16", 0.5)])
def test_fp16_merged_weights_equal_pytorch(fp16, name, weight):
    """The fp16 initializers the runtime hands to ONNX Runtime, mapped back to PyTorch's layout,
    equal diffusers' fused weights cast to fp16, within fp16 rounding: the stored fp16 weight
    (rounded once) plus the update, rounded again."""
    pipe, src, folder = fp16
    resolved = pipe._resolve_loras(lora.parse_prompt(f"{PROMPT}<lora:{name}:{weight}>")[1])
    pipe._apply_loras(resolved)
    dp, base = _fused_modules(src, folder, name, weight)
    for graph in lora.GRAPHS:
        given = pipe.graphs[graph]._initializers
        lmap = lora.read_map(pipe.info.graph_files[graph])
        mods = dict(getattr(dp, graph).named_modules())
        layers = resolved[0][2][graph]
        checked, layouts = 0, set()
        for module in layers:
            key = module if module in mods else module[len("text_model."):]
            ref, orig = mods[key].weight.detach().numpy(), base[graph][key]
            assert np.abs(ref - orig).max() > 1e-3  # the LoRA changes this layer
            for at in lmap["modules"][module]["at"]:
                got = _pytorch_layout(given[at["initializer"]], at, lmap["modules"][module]["shape"])
                assert got.dtype == np.float16
                # |W16 - W| <= |W| u, and each of the two roundings to fp16 <= |result| u (u = 2^-11)
                bound = (np.abs(orig) + 2 * np.abs(ref)) * 2.0 ** -11 + 2.0 ** -24
                err = np.abs(got.astype(np.float32) - ref.astype(np.float16).astype(np.float32))
                assert (err <= bound).all(), (graph, module, float(err.max()))
                checked += 1
                layouts.add((at["layout"], at.get("count")))
        assert checked == len(layers) >= len(lmap["modules"]) - 4, graph
        if graph == "unet":  # every layout of the cuda UNet was merged and checked
            assert layouts == {("same", None), ("T", None), ("nhwc", None), ("packed", 3), ("packed", 2)}


def test_fp16_text_encoder_runs_with_merged_weights_on_cpu(fp16):
    """The session is created with the replaced fp16 initializers and computes the LoRA'd encoder."""
    import torch

    pipe, src, folder = fp16
    ids = np.asarray(pipe.tokenizer.encode_padded([PROMPT]), dtype=np.int64)
    outs = {}
    for weight in (0.0, 1.0):
        uses = lora.parse_prompt(f"<lora:k16:{weight}>")[1] if weight else []
        pipe._apply_loras(pipe._resolve_loras(uses))
        outs[weight] = pipe.graphs["text_encoder"].run({"input_ids": ids})[0].astype(np.float32)
        dp, _ = _fused_modules(src, folder, "k16", weight)
        with torch.no_grad():
            ref = dp.text_encoder(torch.from_numpy(ids))[0].numpy()
        outs[f"ref{weight}"] = ref
        tol = 0.01 * np.abs(ref).max()
        assert np.abs(outs[weight] - ref).max() <= tol, weight
    # The LoRA moved the output far beyond that tolerance: the check above could fail.
    assert np.abs(outs[1.0] - outs[0.0]).max() > 10 * 0.01 * np.abs(outs["ref1.0"]).max()


def test_int8_still_refused(fp16):
    pipe, _, folder = fp16
    int8 = Pipeline(dataclasses.replace(pipe.info, precision={**pipe.info.precision, "unet": "int8"}), "cpu",
                    lora_dir=folder)
    from sdrt.runtime import InputError

    with pytest.raises(InputError, match="int8") as e:
        int8._resolve_loras(lora.parse_prompt("<lora:k16:1>")[1])
    assert "\n" not in str(e.value)
