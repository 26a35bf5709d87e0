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
import socket
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

FAMILIES = {  # kind -> (OpenCLIP text encoder, diffusers pipeline class)
    "ckpt-sd1": (False, "StableDiffusionPipeline"),
    "ckpt-sd1-inpaint": (False, "StableDiffusionInpaintPipeline"),
    "ckpt-sd2": (True, "StableDiffusionPipeline"),
    "ckpt-sd2-v": (True, "StableDiffusionPipeline"),
    "ckpt-sd2-inpaint": (True, "StableDiffusionInpaintPipeline"),
}
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


@pytest.fixture()
def offline(monkeypatch):
    """No network in this process: hub libraries told to stay offline, and every socket connection
    refused (a test that reaches for the network fails)."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts[:3]}"


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


STORAGE = [  # (floating-point dtype, suffix, wrapped in "state_dict"); the test models are exact in all three dtypes
    (torch.float32, ".safetensors", False),
    (torch.float16, ".safetensors", False),
    (torch.bfloat16, ".ckpt", True),
]


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
    """The test's original-layout files, in fp32, fp16 and bf16 storage (.safetensors and a
    "state_dict"-wrapped .ckpt), are what diffusers' single-file loader (local configs, offline)
    reads back into the folder's weights: the files are real SD checkpoints, not sdrt's own idea
    of one."""
    folder = models.source(kind)
    refs = _folder_modules(folder)
    for dtype, suffix, wrap in STORAGE:
        path = write_checkpoint(folder, tmp_path / f"{kind}{suffix}", open_clip=FAMILIES[kind][0], dtype=dtype,
                                wrap=wrap)
        pipe = _diffusers_pipeline(path, folder, kind)
        for name, ref in refs.items():
            got = {k: v.float() for k, v in getattr(pipe, name).state_dict().items()}
            _assert_same_weights(got, ref.state_dict(), (name, str(dtype), suffix))


def _variants(folder: Path, open_clip: bool) -> list[tuple[str, dict, torch.dtype, str, bool]]:
    """(name, state dict, storage dtype, suffix, wrapped) of the file layouts met in the wild."""
    sd = original_state_dict(folder, open_clip)
    full = {**sd, **training_extras(sd)}
    out = [(f"{str(d).split('.')[-1]}{s}{'-wrapped' if w else ''}", sd, d, s, w) for d, s, w in STORAGE]
    out += [("full-with-ema-fp32.ckpt", full, torch.float32, ".ckpt", True),
            ("full-with-ema-fp16.safetensors", full, torch.float16, ".safetensors", False),
            ("bf16.pt", sd, torch.bfloat16, ".pt", False)]
    if not open_clip:
        out.append(("old-clip-names-with-ema-fp16.safetensors", without_text_model_prefix(full), torch.float16, ".safetensors",
                    False))
    return out


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
    for name, sd, dtype, suffix, wrap in _variants(folder, FAMILIES[kind][0]):
        path = save(sd, tmp_path / f"{kind}-{name}{suffix}", dtype, wrap)
        logs = []
        # SD 2.x 512 vs 768: the random test weights cannot tell, so the option says (tested below).
        given = want_pred if kind in ("ckpt-sd2", "ckpt-sd2-v") else None
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


CASES = [  # (kind, storage dtype, suffix, wrapped, prediction type given, with EMA and training buffers)
    ("ckpt-sd1", torch.float16, ".safetensors", False, None, True),
    ("ckpt-sd1-inpaint", torch.bfloat16, ".ckpt", True, None, False),
    ("ckpt-sd2", torch.float32, ".safetensors", False, "epsilon", False),
    ("ckpt-sd2-v", torch.float16, ".safetensors", False, "v_prediction", False),
    ("ckpt-sd2-inpaint", torch.bfloat16, ".safetensors", False, None, False),
]


@pytest.mark.parametrize("kind,dtype,suffix,wrap,pred,full", CASES,
                         ids=[f"{c[0]}-{str(c[1]).split('.')[-1]}{c[2]}" for c in CASES])
def test_file_export_equals_folder_export(models, tmp_path, offline, kind, dtype, suffix, wrap, pred, full):
    """sdrt export FILE gives the graphs sdrt export gives for the diffusers folder that diffusers
    reads from the same file (<= 1e-6 on the same inputs), the family, channels and prediction type
    of the model, the family's tokenizer (SD 2.x pads with "!", id 0, as diffusers' SD 2 tokenizer
    config says), and records the file and its A1111 short hash."""
    folder = models.source(kind)
    sd = original_state_dict(folder, open_clip=FAMILIES[kind][0])
    path = save({**sd, **training_extras(sd)} if full else sd, tmp_path / f"model{suffix}", dtype, wrap)
    logs = []
    out = export_model(path, tmp_path / "from-file", prediction_type=pred, log=logs.append)
    # ckpt-sd2-v holds the weights of ckpt-sd2 (only the schedule differs): one reference serves both.
    ref_kind = "ckpt-sd2" if kind == "ckpt-sd2-v" else kind
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert _sha(folder / part) == _sha(models.source(ref_kind) / part)
    ref = models.exported(ref_kind)
    diffs = _max_output_diff(ref, out)
    print(f"\n{kind} {dtype} {suffix}: max output difference {diffs}")
    assert max(diffs.values()) <= 1e-6
    a, b = read_model_folder(out, verify="full"), read_model_folder(ref)
    want_pred = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    assert (a.family, a.unet_in_channels, a.latent_channels, a.vae_scale_factor) == \
           (b.family, b.unet_in_channels, b.latent_channels, b.vae_scale_factor)
    assert a.prediction_type == want_pred
    prompts = ["a cat", "an oil painting of a lighthouse at dusk, (detailed:1.2)", ""]
    want_ids = np.array(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")(
        prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    assert np.array_equal(_tokens(out / "tokenizer", prompts), want_ids)
    assert want_ids[0, -1] == (0 if FAMILIES[kind][0] else 49407)
    source = a.manifest["source_file"]
    assert source["name"] == path.name and source["sha256"] == _sha(path) and source["short_hash"] == _sha(path)[:10]
    assert a.short_hash == _sha(path)[:10] and a.model_name == "model"
    assert any("SD " in m and path.name in m for m in logs)
    assert any("EMA" in m for m in logs) == full


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


def _bad_files(root: Path, folder: Path, vae_folder: Path) -> list[tuple[str, Path, str]]:
    """(description, path, what the one-line error must say) for files sdrt must refuse."""
    from safetensors.torch import save_file

    sd = original_state_dict(folder, open_clip=False)
    good = write_checkpoint(folder, root / "good.safetensors", open_clip=False)
    data = good.read_bytes()
    cases = []

    def add(name, content, expect):
        p = root / name
        if isinstance(content, dict):
            save_file(content, str(p))
        elif isinstance(content, bytes):
            p.write_bytes(content)
        cases.append((name, p, expect))

    add("truncated.safetensors", data[: len(data) // 2], "truncated")
    add("header-only.safetensors", data[:100], "not a safetensors file")
    add("empty.safetensors", b"", "not a safetensors file")
    add("text.safetensors", b"this is not a model\n" * 50, "not a safetensors file")
    add("image.png.safetensors", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a safetensors file")
    add("notes.txt", b"hello", "unrecognised file type")
    add("lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
                             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, "is a LoRA")
    add("vae.safetensors", vae_to_original_plain(vae_folder), "is a VAE")
    add("unet-only.safetensors", {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, "UNet without")
    add("sdxl.safetensors", {**sd, "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
                             "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}, "SDXL")
    add("sd3.safetensors", {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4, 4)},
        "Stable Diffusion 3")
    add("flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, "Flux")
    add("random.safetensors", {"weight": torch.zeros(3, 3)}, "not a Stable Diffusion checkpoint")
    add("truncated.ckpt", None, "cannot be read")
    torch.save(sd, root / "full.ckpt")
    (root / "truncated.ckpt").write_bytes((root / "full.ckpt").read_bytes()[:5000])
    add("garbage.ckpt", b"\x80\x04garbage that is no pickle", "cannot be read")
    add("list.pt", None, "not a state dict")
    torch.save([1, 2, 3], root / "list.pt")
    return cases


def vae_to_original_plain(folder: Path) -> dict:
    """A VAE file as A1111 ships them (encoder.* / decoder.*, no first_stage_model. prefix)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    sd = vae_to_original(vae.state_dict(), len(vae.config.block_out_channels))
    return {k[len("first_stage_model."):]: v.contiguous() for k, v in sd.items()}


def test_bad_files_are_refused_in_one_line(models, tmp_path, offline):
    """Truncated, empty, non-checkpoint, LoRA, VAE-only, UNet-only, SDXL, SD3 and Flux files: one
    line naming the file and what was recognised or what is accepted, and no output folder."""
    cases = _bad_files(tmp_path / "bad", models.source("ckpt-sd1"), models.source("tiny-sd1"))
    assert len(cases) >= 15
    for name, path, expect in cases:
        out = tmp_path / "out" / name
        with pytest.raises(ExportError) as e:
            export_model(path, out, log=_quiet)
        msg = str(e.value)
        print(f"{name}: {msg}")
        assert "\n" not in msg and path.name in msg and expect in msg, (name, msg)
        assert not out.exists()
        assert not out.parent.exists() or not list(out.parent.glob(f".{name}*"))
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


def test_vae_replacement_export_and_img2img_infotext(models, tmp_path, offline):
    """The user story: a Civitai-style SD 1.x .safetensors and an A1111-style VAE file, two commands
    offline (export with --vae, img2img). The VAE graphs compute the replacement VAE (PyTorch
    reference), and the image's infotext carries A1111's Model, Model hash, VAE and VAE hash."""
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
    assert "peak memory" in r.output
    info = read_model_folder(out, verify="full")
    assert info.vae == {"name": vae_file.name, "sha256": _sha(vae_file), "short_hash": _sha(vae_file)[:10]}

    vae = AutoencoderKL.from_pretrained(other, subfolder="vae").eval()
    lat = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vae.decode(lat).sample.numpy()
    got = ort.InferenceSession(str(out / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"latent_sample": lat.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4

    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    r = CliRunner().invoke(app, ["img2img", str(img), "-p", "a cat", "-m", str(out), "-o", str(tmp_path / "res.png"),
                                 "--steps", "3", "--seed", "1", "--provider", "cpu"], env=env)
    assert r.exit_code == 0, r.output
    _, _, params = parse_infotext(read_infotext(tmp_path / "res.png"))
    assert params["Model hash"] == _sha(ckpt)[:10] and params["Model"] == "myModel_v10"
    assert params["VAE"] == vae_file.name and params["VAE hash"] == _sha(vae_file)[:10]

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
