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
import socket
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ckpt_layout import original_state_dict, vae_to_original, write_checkpoint
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


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_written_files_load_in_diffusers(models, tmp_path, offline, kind):
    """The test's original-layout files are what diffusers' single-file loader reads back into the
    same weights (so the files are real SD checkpoints, not sdrt's own idea of one)."""
    folder = models.source(kind)
    path = write_checkpoint(folder, tmp_path / f"{kind}.safetensors", open_clip=FAMILIES[kind][0])
    pipe = _diffusers_pipeline(path, folder, kind)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    refs = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")}
    for name, ref in refs.items():
        got, want = getattr(pipe, name).state_dict(), ref.state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


CASES = [  # (kind, storage dtype, suffix, prediction type given, ckpt wrapped in "state_dict")
    ("ckpt-sd1", torch.float32, ".safetensors", None, False),
    ("ckpt-sd1", torch.float16, ".safetensors", None, False),
    ("ckpt-sd1", torch.float32, ".ckpt", None, True),
    ("ckpt-sd1-inpaint", torch.float32, ".safetensors", None, False),
    ("ckpt-sd2", torch.bfloat16, ".safetensors", "epsilon", False),
    ("ckpt-sd2-v", torch.float32, ".safetensors", "v_prediction", False),
    ("ckpt-sd2-inpaint", torch.float16, ".ckpt", None, False),
]


@pytest.mark.parametrize("kind,dtype,suffix,pred,wrap", CASES,
                         ids=[f"{c[0]}-{str(c[1]).split('.')[-1]}{c[2]}" for c in CASES])
def test_file_export_equals_folder_export(models, tmp_path, offline, kind, dtype, suffix, pred, wrap):
    """sdrt export FILE gives the graphs sdrt export gives for the pipeline diffusers loads from
    the same file (<= 1e-6 on the same inputs), with the family, channels and prediction type of
    the model, and records the file and its A1111 short hash."""
    folder = models.source(kind)
    path = write_checkpoint(folder, tmp_path / f"model{suffix}", open_clip=FAMILIES[kind][0], dtype=dtype, wrap=wrap)
    logs = []
    out = export_model(path, tmp_path / "from-file", prediction_type=pred, log=logs.append)
    if dtype == torch.float32:
        ref = models.exported(kind)  # diffusers reads this file back to the folder's weights (test above)
    else:
        pipe = _diffusers_pipeline(path, folder, kind)
        pipe.save_pretrained(tmp_path / "diffusers-read")
        ref = export_model(tmp_path / "diffusers-read", tmp_path / "from-diffusers", log=_quiet)
    diffs = _max_output_diff(ref, out)
    print(f"\n{kind} {dtype} {suffix}: max output difference {diffs}")
    assert max(diffs.values()) <= 1e-6
    a, b = read_model_folder(out, verify="full"), read_model_folder(ref)
    assert (a.family, a.prediction_type, a.unet_in_channels, a.latent_channels, a.vae_scale_factor) == \
           (b.family, b.prediction_type, b.unet_in_channels, b.latent_channels, b.vae_scale_factor)
    source = a.manifest["source_file"]
    assert source["name"] == path.name and source["sha256"] == _sha(path) and source["short_hash"] == _sha(path)[:10]
    assert a.short_hash == _sha(path)[:10] and a.model_name == "model"
    assert any("SD " in m and path.name in m for m in logs)


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


def test_ema_weights_are_ignored_as_a1111_does(models, tmp_path, offline):
    """A file with EMA weights beside the UNet's (model_ema.*, LitEma's flattened names) exports the
    model.diffusion_model weights, as A1111 (whose configs have use_ema: false) and diffusers'
    default do, and says so."""
    folder = models.source("ckpt-sd1")
    sd = original_state_dict(folder, open_clip=False)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): torch.randn(v.shape) for k, v in sd.items()
           if k.startswith("model.diffusion_model.")}
    ema.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
    path = tmp_path / "with-ema.safetensors"
    from safetensors.torch import save_file

    save_file({**sd, **ema}, str(path))
    logs = []
    out = export_model(path, tmp_path / "o", log=logs.append, check=False)
    assert max(_max_output_diff(models.exported("ckpt-sd1"), out, ("unet",)).values()) <= 1e-6
    assert any("EMA" in m for m in logs)


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

    # A diffusers VAE folder works too, and is recorded by its weights file's hash.
    out2 = export_model(ckpt, tmp_path / "model2", vae=other / "vae", log=_quiet, check=False)
    v = read_model_folder(out2).vae
    assert v["name"] == "vae" and v["sha256"] == _sha(other / "vae" / "diffusion_pytorch_model.safetensors")
    assert max(_max_output_diff(out, out2, ("vae_encoder", "vae_decoder")).values()) <= 1e-6
    with pytest.raises(ExportError, match="not a VAE file"):
        export_model(ckpt, tmp_path / "model3", vae=ckpt, log=_quiet)
    assert not (tmp_path / "model3").exists()
