"""`sdrt export FILE OUT`: single-file checkpoints (CompVis / A1111 / ComfyUI layout), offline.

Reference: diffusers' own single-file loader (`from_single_file`, pointed at local configs, run
offline). The files are written from the random-weight test models with the key mapping in
tests/ckpt_layout.py; diffusers must load them back to the same weights, and sdrt's export of
the file must give the graphs (same outputs on the same inputs) that sdrt's export of diffusers'
loaded pipeline gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ckpt_layout import original_state_dict, save, training_extras, vae_to_original, without_text_model_prefix, write_checkpoint
from transformers import CLIPTokenizer
from sdrt.export import ExportError, export_model
from sdrt.runtime.modelfolder import read_model_folder

FAMILIES = {  # test model kind -> (OpenCLIP text encoder, diffusers pipeline class)
    "ckpt-sd1": (False, "StableDiffusionPipeline"),
    "ckpt-sd1-inpaint": (False, "StableDiffusionInpaintPipeline"),
    "ckpt-sd2": (True, "StableDiffusionPipeline"),
    "ckpt-sd2-inpaint": (True, "StableDiffusionInpaintPipeline"),
}
# SD 2.x 768 (v-prediction) has SD 2.x 512's architecture: its checkpoints differ in weights and
# schedule only, which a file does not state. The ckpt-sd2 file exported with --prediction-type
# v_prediction stands for it below, and the A1111 test that tells them apart is tested on its own.
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def _quiet(msg):
    pass


def _diffusers_pipeline(path: Path, folder: Path, kind: str):
    import diffusers

    cls = getattr(diffusers, FAMILIES[kind][1])
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, safety_checker=None,
                                requires_safety_checker=False, torch_dtype=torch.float32)


def _feeds(model, rng) -> dict[str, np.ndarray]:
    sizes = {"batch": 2, "height": 6, "width": 10, "sequence": 77}
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or sizes[d.dim_param] for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == onnx.TensorProto.INT32:
            feeds[i.name] = rng.integers(0, 49408, dims).astype(np.int32)
        elif i.name == "timestep":
            feeds[i.name] = np.array(411.5, np.float32)
        else:
            feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _max_output_diff(a: Path, b: Path, graphs=GRAPHS) -> dict[str, float]:
    out = {}
    for g in graphs:
        pa, pb = a / g / "model.onnx", b / g / "model.onnx"
        feeds = _feeds(onnx.load(str(pa), load_external_data=False), np.random.default_rng(0))
        ra = ort.InferenceSession(str(pa), providers=["CPUExecutionProvider"]).run(None, feeds)
        rb = ort.InferenceSession(str(pb), providers=["CPUExecutionProvider"]).run(None, feeds)
        out[g] = max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(ra, rb))
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


STORAGE = {  # family -> (floating-point dtype, suffix, wrapped in "state_dict"): every storage in some family
    "ckpt-sd1": (torch.float32, ".safetensors", False),
    "ckpt-sd1-inpaint": (torch.bfloat16, ".ckpt", True),
    "ckpt-sd2": (torch.float16, ".ckpt", False),
    "ckpt-sd2-inpaint": (torch.bfloat16, ".safetensors", False),
}


def _folder_modules(folder: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")}


def _assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, (what, bad[:5])


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_written_files_load_in_diffusers(models, tmp_path, offline, kind):
    """The test's original-layout files (fp32, fp16 or bf16 storage; .safetensors or .ckpt, wrapped
    in "state_dict" or not) are what diffusers' single-file loader (local configs, offline) reads
    back into the folder's weights: the files are real SD checkpoints, not sdrt's own idea of one.
    The test models' weights are exact in fp16 and bf16, so the file holds the folder's model."""
    folder = models.source(kind)
    dtype, suffix, wrap = STORAGE[kind]
    path = write_checkpoint(folder, tmp_path / f"{kind}{suffix}", open_clip=FAMILIES[kind][0], dtype=dtype, wrap=wrap)
    pipe = _diffusers_pipeline(path, folder, kind)
    for name, ref in _folder_modules(folder).items():
        got = {k: v.float() for k, v in getattr(pipe, name).state_dict().items()}
        _assert_same_weights(got, ref.state_dict(), name)


def _variants(kind: str, sd: dict) -> list[tuple[str, dict, torch.dtype, str, bool]]:
    """(name, state dict, storage dtype, suffix, wrapped) of file layouts met in the wild, spread
    over the families (the key mapping does not depend on the storage)."""
    full = {**sd, **training_extras(sd)}
    return {
        "ckpt-sd1": [("full-with-ema-fp32.ckpt", full, torch.float32, ".ckpt", True),
                     ("old-clip-names-with-ema-fp16.safetensors", without_text_model_prefix(full), torch.float16,
                      ".safetensors", False)],
        "ckpt-sd1-inpaint": [("pruned-fp16.safetensors", sd, torch.float16, ".safetensors", False),
                             ("bf16.pt", sd, torch.bfloat16, ".pt", False)],
        "ckpt-sd2": [("full-with-ema-bf16.safetensors", full, torch.bfloat16, ".safetensors", False),
                     ("fp32.ckpt", sd, torch.float32, ".ckpt", False)],
        "ckpt-sd2-inpaint": [("full-with-ema-fp16.ckpt", full, torch.float16, ".ckpt", True)],
    }[kind]


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_checkpoint_layouts_convert_to_the_same_models(models, tmp_path, offline, kind):
    """Every layout (fp32/fp16/bf16; .safetensors, .ckpt, .pt; wrapped in "state_dict"; pruned or
    full with EMA weights, the LDM schedule buffers and position ids; SD 1.x CLIP names without
    "text_model.") converts to modules with the weights diffusers reads from the same files (the
    folder's, test above), and the family, channels and prediction type of the model."""
    from sdrt.export.checkpoint import CheckpointSource

    folder = models.source(kind)
    refs = {k: v.state_dict() for k, v in _folder_modules(folder).items()}
    want_pred = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    inpaint = FAMILIES[kind][1].endswith("InpaintPipeline")
    for name, sd, dtype, suffix, wrap in _variants(kind, original_state_dict(folder, FAMILIES[kind][0])):
        path = save(sd, tmp_path / f"{kind}-{Path(name).stem}{suffix}", dtype, wrap)
        logs = []
        # SD 2.x 512 vs 768: the random test weights cannot tell, so the option says (tested below).
        given = want_pred if kind == "ckpt-sd2" else None
        src = CheckpointSource(path, given, log=logs.append)
        det = src.detected
        assert (det.family, det.in_channels, det.prediction_type) == \
               ("sd2" if FAMILIES[kind][0] else "sd1", 9 if inpaint else 4, want_pred), name
        assert src.index["_class_name"] == FAMILIES[kind][1]
        for component, ref in refs.items():
            _assert_same_weights(src.load(component).state_dict(), ref, (name, component))
        assert ("EMA" in logs[0]) == ("ema" in name), logs


def _tokens(tokenizer_dir: Path, prompts) -> np.ndarray:
    from sdrt.runtime.text import ClipTokenizer

    return ClipTokenizer.from_folder(tokenizer_dir).encode_padded(prompts)


def _check_file_export(models, out: Path, path: Path, kind: str, pred: str, graphs=GRAPHS) -> None:
    """`out`, exported from the file `path` of the test model `kind`, has the graphs of sdrt's export
    of the diffusers folder (<= 1e-6 on the same inputs), the family, channels and prediction type
    of the model, the family's tokenizer (transformers' on the folder's tokenizer config: SD 2.x
    pads with "!", id 0, as diffusers' SD 2 tokenizer config says) and the file's name and A1111
    short hash."""
    folder, ref = models.source(kind), models.exported(kind)
    diffs = _max_output_diff(ref, out, graphs)
    print(f"\n{path.name} ({kind}): max output difference {diffs}")
    assert max(diffs.values()) <= 1e-6
    a, b = read_model_folder(out, verify="full"), read_model_folder(ref)
    assert (a.family, a.unet_in_channels, a.latent_channels, a.vae_scale_factor, a.prediction_type) == \
           (b.family, b.unet_in_channels, b.latent_channels, b.vae_scale_factor, pred)
    prompts = ["a cat", "an oil painting of a lighthouse at dusk, (detailed:1.2)", ""]
    want_ids = np.array(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")(
        prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    assert np.array_equal(_tokens(out / "tokenizer", prompts), want_ids)
    assert want_ids[0, -1] == (0 if FAMILIES[kind][0] else 49407)
    source = a.manifest["source_file"]
    assert source["name"] == path.name and source["sha256"] == _sha(path) and source["short_hash"] == _sha(path)[:10]
    assert a.short_hash == _sha(path)[:10] and a.model_name == path.stem


CASES = [  # (kind, storage dtype, suffix, wrapped, --prediction-type, expected, with EMA and training buffers)
    ("ckpt-sd1-inpaint", torch.bfloat16, ".ckpt", True, None, "epsilon", True),
    ("ckpt-sd2", torch.float16, ".safetensors", False, "v_prediction", "v_prediction", False),
    ("ckpt-sd2-inpaint", torch.bfloat16, ".safetensors", False, None, "epsilon", False),
]  # SD 1.x: test_civitai_file_with_vae_export_and_img2img_infotext


@pytest.mark.parametrize("kind,dtype,suffix,wrap,given,pred,full", CASES,
                         ids=[f"{c[0]}-{str(c[1]).split('.')[-1]}{c[2]}" for c in CASES])
def test_file_export_equals_folder_export(models, tmp_path, offline, kind, dtype, suffix, wrap, given, pred, full):
    """sdrt export FILE gives what sdrt export gives for the diffusers folder that diffusers reads
    from the same file (see _check_file_export); a file with EMA weights says which it used."""
    sd = original_state_dict(models.source(kind), open_clip=FAMILIES[kind][0])
    path = save({**sd, **training_extras(sd)} if full else sd, tmp_path / f"model{suffix}", dtype, wrap)
    logs = []
    out = export_model(path, tmp_path / "from-file", prediction_type=given, log=logs.append, check=False)
    _check_file_export(models, out, path, kind, pred)
    assert any("SD " in m and path.name in m for m in logs)
    assert any("EMA" in m for m in logs) == full
    if pred == "v_prediction":
        assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 96


def test_sd2_prediction_type_is_decided_as_a1111_does(models, tmp_path, offline):
    """SD 2.x (4 channels) without --prediction-type: v_prediction when the UNet's output at t=999
    on a constant 0.5 input (context 0.5) minus that input has a mean below -1 (A1111's test),
    computed here with diffusers' UNet; the file's v_pred marker also says v; the option wins."""
    from diffusers import UNet2DConditionModel

    folder = models.source("ckpt-sd2")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    with torch.no_grad():
        x = torch.full((1, 4, 8, 8), 0.5)
        base = float((unet(x, torch.tensor([999]), torch.full((1, 2, 64), 0.5)).sample - x).mean())
    sd = original_state_dict(folder, open_clip=True)
    for shift, want in ((-1.5 - base, "v_prediction"), (-0.5 - base, "epsilon")):
        sd2 = dict(sd)
        # conv_out's bias adds to every output value: it moves the mean by exactly `shift`.
        sd2["model.diffusion_model.out.2.bias"] = sd["model.diffusion_model.out.2.bias"] + shift
        from safetensors.torch import save_file

        path = tmp_path / f"{want}.safetensors"
        save_file(sd2, str(path))
        from sdrt.export.checkpoint import CheckpointSource

        src = CheckpointSource(path, log=_quiet)
        assert src.scheduler_config["prediction_type"] == want
        assert src.detected.how == "A1111's test of the UNet's output"
        assert src.unet_config["sample_size"] == (96 if want == "v_prediction" else 64)
        assert CheckpointSource(path, "epsilon", log=_quiet).scheduler_config["prediction_type"] == "epsilon"
    marked = dict(sd, v_pred=torch.tensor([]))
    save_file(marked, str(tmp_path / "marked.safetensors"))
    src = CheckpointSource(tmp_path / "marked.safetensors", log=_quiet)
    assert src.scheduler_config["prediction_type"] == "v_prediction" and "v_pred" in src.detected.how


def _bad_files(root: Path, folder: Path) -> list[tuple[str, Path, str]]:
    """(file name, path, what the one-line error must say) for files sdrt must refuse, generated:
    truncations at every kind of place, corrupt headers, and the other models' files, each with
    the tensor names that identify it (after A1111's sd_models_config and ComfyUI's
    model_detection)."""
    import struct

    from safetensors.torch import save_file

    root.mkdir(parents=True)
    sd = original_state_dict(folder, open_clip=False)
    good = write_checkpoint(folder, root / "good.safetensors", open_clip=False)
    data = good.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    cases = []

    def add(name, content, expect):
        p = root / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif name.endswith(".safetensors"):
            save_file({k: v.clone().contiguous() for k, v in content.items()}, str(p))
        else:
            torch.save(content, str(p))
        cases.append((name, p, expect))

    for cut in (0, 1, 7, 8, 9, 100, 8 + n - 1, 8 + n, 8 + n + 1, len(data) // 3, len(data) // 2, len(data) - 1):
        add(f"cut-{cut}.safetensors", data[:cut], "truncated" if cut >= 8 + n else "not a safetensors file")
    add("header-not-json.safetensors", data[:8] + b"x" + data[9:], "not JSON")
    bad_offsets = data[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1)
    add("header-offsets.safetensors", data[:8] + bad_offsets + data[8 + n:], "inconsistently")
    add("text.safetensors", b"this is not a model\n" * 50, "not a safetensors file")
    add("image.png.safetensors", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a safetensors file")
    add("notes.txt", b"hello", "unrecognised file type")
    add("model.onnx", b"\x08\x07", "unrecognised file type")
    pickled = root / "full.ckpt"
    torch.save(sd, pickled)
    blob = pickled.read_bytes()
    for cut in (0, 10, 100, 5000, len(blob) // 2, len(blob) - 1):
        add(f"cut-{cut}.ckpt", blob[:cut], "cannot be read")
    add("garbage.ckpt", b"\x80\x04garbage that is no pickle", "cannot be read")
    add("list.pt", [1, 2, 3], "not a state dict")
    add("no-tensors.ckpt", {"state_dict": {"epoch": 3}}, "holds no tensors")
    z = torch.zeros(4, 4)
    for name, keys in {
        "kohya": ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_te_text_model_x.alpha"],
        "peft": ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.x.lora_B.weight"],
        "diffusers-old": ["unet.down_blocks.0.attentions.0.processor.to_q_lora.down.weight".replace("_lora.", ".lora.")],
        "loha": ["lora_unet_down_blocks_0_proj_in.hada_w1_a", "lora_unet_down_blocks_0_proj_in.hada_w1_b"],
        "lokr": ["lora_unet_down_blocks_0_proj_in.lokr_w1", "lora_unet_down_blocks_0_proj_in.lokr_w2"],
    }.items():
        add(f"{name}-lora.safetensors", {k: z for k in keys}, "is a LoRA")
    add("embedding.safetensors", {"emb_params": z}, "textual-inversion embedding")
    add("sdxl-embedding.safetensors", {"clip_l": z, "clip_g": z}, "textual-inversion embedding")
    add("embedding.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": z}, "name": "x", "step": 5},
        "textual-inversion embedding")
    vae = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    add("vae.safetensors", {k[len("first_stage_model."):]: v for k, v in vae.items()}, "is a VAE")
    add("vae-prefixed.safetensors", vae, "is a VAE")
    add("vae.pt", {k[len("first_stage_model."):]: v for k, v in vae.items()}, "is a VAE")
    add("unet-only.safetensors", {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, "UNet without")
    add("no-vae.safetensors", {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, "without a VAE")
    add("diffusers-unet.safetensors", {"down_blocks.0.resnets.0.conv1.weight": z, "conv_in.weight": z},
        "diffusers' layout")
    add("controlnet.safetensors", {"control_model.input_blocks.0.0.weight": z, "control_model.input_hint_block.0.weight": z},
        "ControlNet")
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    for name, extra, expect in (
        ("sdxl-unet-sd1-text", {"model.diffusion_model.label_emb.0.0.weight": z}, "SDXL UNet without SDXL's text encoders"),
        ("sdxl-unet-partial-text", {"conditioner.embedders.1.model.ln_final.weight": z,
                                    "model.diffusion_model.label_emb.0.0.weight": z}, "SDXL UNet without SDXL's text encoders"),
        ("sd3", {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": z}, "Stable Diffusion 3"),
        ("sd3-a1111-key", {"model.diffusion_model.x_embedder.proj.weight": z}, "Stable Diffusion 3"),
        ("unclip", {"embedder.model.ln_final.weight": z, "model.diffusion_model.label_emb.0.0.weight": z}, "unCLIP"),
        ("depth", {"depth_model.model.pretrained.act_postprocess3.0.project.0.bias": z}, "depth"),
        ("altdiffusion", {"cond_stage_model.roberta.embeddings.word_embeddings.weight": z}, "AltDiffusion"),
        ("instruct-pix2pix", {unet_in: torch.zeros(sd[unet_in].shape[0], 8, 3, 3)}, "InstructPix2Pix"),
        ("7-channel", {unet_in: torch.zeros(sd[unet_in].shape[0], 7, 3, 3)}, "7 input channels"),
    ):
        add(f"{name}.safetensors", {**sd, **extra}, expect)
    add("flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": z, "img_in.weight": z}, "Flux")
    add("flux-prefixed.safetensors", {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": z}, "Flux")
    add("random.safetensors", {"weight": torch.zeros(3, 3)}, "not a Stable Diffusion checkpoint")
    return cases


def vae_to_original_plain(folder: Path) -> dict:
    """A VAE file as A1111 ships them (encoder.* / decoder.*, no first_stage_model. prefix)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    sd = vae_to_original(vae.state_dict(), len(vae.config.block_out_channels))
    return {k[len("first_stage_model."):]: v.contiguous() for k, v in sd.items()}


def test_bad_files_are_refused_in_one_line(models, tmp_path, offline):
    """Truncated, empty, corrupt, non-checkpoint, LoRA, embedding, VAE-only, UNet-only, ControlNet,
    SDXL, SD3, Flux and other models' files: one line naming the file and what was recognised or
    what is accepted, and no output folder."""
    from typer.testing import CliRunner

    from sdrt.cli.app import app

    cases = _bad_files(tmp_path / "bad", models.source("ckpt-sd1"))
    assert len(cases) >= 50
    for name, path, expect in cases:
        out = tmp_path / "out" / name
        with pytest.raises(ExportError) as e:
            export_model(path, out, log=_quiet)
        msg = str(e.value)
        print(f"{name}: {msg}")
        assert "\n" not in msg and path.name in msg and expect in msg, (name, msg)
        assert not out.exists()
        assert not out.parent.exists() or not list(out.parent.glob(f".{name}*"))
        r = CliRunner().invoke(app, ["export", str(path), str(out)], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert r.exit_code == 1 and r.output.strip() == f"sdrt: error: {msg}", (name, r.output)
        assert not out.exists()
    with pytest.raises(ExportError, match=r"model\.safetensors does not exist"):
        export_model(tmp_path / "model.safetensors", tmp_path / "out" / "missing", log=_quiet)


class _SideEffect:
    """Unpickling this object writes a file (what a malicious checkpoint could do)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_pickle_with_code_is_refused_without_running_it(models, tmp_path, offline):
    """A .ckpt whose pickle would run code when unpickled is refused through PyTorch's weights-only
    loader: the code never runs, the error says why, no output folder is left."""
    target = tmp_path / "side-effect.txt"
    sd = original_state_dict(models.source("ckpt-sd1"), open_clip=False)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "callback": _SideEffect(str(target))}, path)
    # The payload is real: a full unpickler would run it.
    pickle.loads(pickle.dumps(_SideEffect(str(tmp_path / "control.txt"))))
    assert (tmp_path / "control.txt").read_text() == "pwned"
    with pytest.raises(ExportError) as e:
        export_model(path, tmp_path / "out", log=_quiet)
    msg = str(e.value)
    assert "evil.ckpt" in msg and "weights-only" in msg and ".safetensors" in msg and "\n" not in msg
    assert not target.exists()
    assert not (tmp_path / "out").exists()


def test_civitai_file_with_vae_export_and_img2img_infotext(models, tmp_path, offline):
    """The user story, and the SD 1.x family: a Civitai-style SD 1.x .safetensors (pruned, fp16) and
    an A1111-style VAE file, two commands offline (export with --vae, img2img). The text encoder and
    UNet graphs are those of the folder's export (see _check_file_export), the VAE graphs compute
    the replacement VAE (PyTorch reference), and the image's infotext carries A1111's Model hash,
    Model, VAE hash and VAE, in A1111's order."""
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from sdrt.cli.app import app
    from sdrt.export.testmodels import build
    from sdrt.runtime.infotext import parse_infotext, read_infotext

    ckpt = write_checkpoint(models.source("ckpt-sd1"), tmp_path / "myModel_v10.safetensors", open_clip=False,
                            dtype=torch.float16)
    other = build(tmp_path / "other", "ckpt-sd1", seed=5)  # a VAE with other weights, same architecture
    vae_file = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(vae_to_original_plain(other), str(vae_file))
    out = tmp_path / "model"
    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    r = CliRunner().invoke(app, ["export", str(ckpt), str(out), "--vae", str(vae_file)], env=env)
    assert r.exit_code == 0, r.output
    assert "peak memory" in r.output and "SD 1.x" in r.output
    _check_file_export(models, out, ckpt, "ckpt-sd1", "epsilon", graphs=("text_encoder", "unet"))
    info = read_model_folder(out, verify="full")
    assert info.vae == {"name": vae_file.name, "sha256": _sha(vae_file), "short_hash": _sha(vae_file)[:10]}

    vae = AutoencoderKL.from_pretrained(other, subfolder="vae").eval()
    g = torch.Generator().manual_seed(0)
    lat, x = torch.randn(1, 4, 6, 5, generator=g), torch.rand(1, 3, 48, 40, generator=g) * 2 - 1
    with torch.no_grad():
        want_dec = vae.decode(lat).sample.numpy()
        want_enc = vae.quant_conv(vae.encoder(x)).numpy()
    for graph, feed, want in (("vae_decoder", lat, want_dec), ("vae_encoder", x, want_enc)):
        sess = ort.InferenceSession(str(out / graph / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: feed.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-4, graph

    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    r = CliRunner().invoke(app, ["img2img", str(img), "-p", "a cat", "-m", str(out), "-o", str(tmp_path / "res.png"),
                                 "--steps", "3", "--seed", "1", "--provider", "cpu"], env=env)
    assert r.exit_code == 0, r.output
    text = read_infotext(tmp_path / "res.png")
    _, _, params = parse_infotext(text)
    assert params["Model hash"] == _sha(ckpt)[:10] and params["Model"] == "myModel_v10"
    assert params["VAE"] == vae_file.name and params["VAE hash"] == _sha(vae_file)[:10]
    assert (f"Model hash: {_sha(ckpt)[:10]}, Model: myModel_v10, VAE hash: {_sha(vae_file)[:10]}, "
            f"VAE: {vae_file.name}") in text
    r = CliRunner().invoke(app, ["info", str(out)], env=env)
    assert r.exit_code == 0 and f"myModel_v10 (Model hash {_sha(ckpt)[:10]})" in r.output, r.output
    assert f"{vae_file.name} (VAE hash {_sha(vae_file)[:10]})" in r.output

    # A diffusers VAE folder gives the same VAE, and is recorded by its weights file's hash.
    from sdrt.export.checkpoint import VaeFile

    folder_vae, file_vae = VaeFile(other / "vae"), VaeFile(vae_file)
    _assert_same_weights(folder_vae.load().state_dict(), file_vae.load().state_dict(), "vae folder")
    assert folder_vae.name == "vae" and folder_vae.sha256 == _sha(other / "vae" / "diffusion_pytorch_model.safetensors")


def test_bad_vae_is_refused_before_export(models, tmp_path, offline):
    """--vae with a checkpoint, a LoRA, a non-VAE file, a truncated file, a missing file or a
    folder that holds no AutoencoderKL: one line naming it, and no output folder."""
    from safetensors.torch import save_file

    ckpt = write_checkpoint(models.source("ckpt-sd1"), tmp_path / "model.safetensors", open_clip=False)
    vae = vae_to_original_plain(models.source("ckpt-sd1"))
    save_file(vae, str(tmp_path / "vae.safetensors"))
    data = (tmp_path / "vae.safetensors").read_bytes()
    cases = {"model.safetensors": "full checkpoint", "missing.safetensors": "does not exist",
             "lora.safetensors": "not a VAE file", "half-vae.safetensors": "not a VAE file",
             "unet-folder": "not an AutoencoderKL", "empty-folder": "without config.json"}
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(tmp_path / "lora.safetensors"))
    save_file({k: v for k, v in vae.items() if k.startswith("decoder.")}, str(tmp_path / "half-vae.safetensors"))
    shutil.copytree(models.source("ckpt-sd1") / "unet", tmp_path / "unet-folder")
    (tmp_path / "empty-folder").mkdir()
    for cut in (7, 100, len(data) // 3, len(data) - 1):
        (tmp_path / f"vae-cut-{cut}.safetensors").write_bytes(data[:cut])
        cases[f"vae-cut-{cut}.safetensors"] = "not a safetensors file" if cut < 100 else "truncated"
    for name, expect in cases.items():
        with pytest.raises(ExportError) as e:
            export_model(ckpt, tmp_path / "out", vae=tmp_path / name, log=_quiet)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and expect in msg, (name, msg)
        assert not (tmp_path / "out").exists()
