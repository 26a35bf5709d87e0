"""SDXL single-file checkpoints: `sdrt export FILE OUT` for SDXL base, inpainting and refiner files.

Reference: diffusers' own single-file loader (`from_single_file`, pointed at the local folder,
offline) and diffusers' SDXL modules and pipelines. The files are written from tiny random-weight
SDXL folders in SDXL's conventions (export/testmodels.py, kinds ckpt-sdxl*) with the key mapping of
tests/ckpt_layout.py; diffusers must read them back to the folder's exact weights, sdrt's export of
the file must compute what diffusers' modules compute, and img2img on it must give diffusers'
single-file pipeline's image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_layout import save, sdxl_original_state_dict, training_extras
from test_checkpoint import vae_to_original_plain
from test_pipeline_parity import _compare, _diffusers_noise, _scheduler_modules, _step_noise_source
from test_sdxl import NEGATIVE, PROMPT, XL_MODULES, _noise, _xl_image, graph_differences

from sdrt.export import ExportError, export_model

# kind -> (diffusers pipeline class, how its file is stored)
KINDS = {
    "ckpt-sdxl": ("StableDiffusionXLPipeline", "fp16.safetensors"),  # as most SDXL fine-tunes ship
    "ckpt-sdxl-inpaint": ("StableDiffusionXLInpaintPipeline", "bf16.ckpt"),  # a training checkpoint, with EMA
    "ckpt-sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", "fp32.safetensors"),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def xlfile(models, tmp_path_factory):
    """kind -> the single file written from the kind's diffusers folder (once per module)."""
    root = tmp_path_factory.mktemp("sdxl-files")
    files = {}

    def get(kind: str) -> Path:
        if kind not in files:
            sd = sdxl_original_state_dict(models.source(kind))
            dtype, suffix = KINDS[kind][1].split(".")
            if suffix == "ckpt":
                sd.update(training_extras(sd))
            files[kind] = save(sd, root / f"{kind}-{dtype}.{suffix}", DTYPES[dtype], wrap=suffix == "ckpt")
        return files[kind]

    return get


@pytest.fixture(scope="module")
def xlexport(models, xlfile, tmp_path_factory):
    """kind -> sdrt's fp32 cpu export of the kind's single file (once per module); the base model's
    with its own VAE passed again as an A1111-style VAE file (`--vae`), which states no scale: the
    export must give it SDXL's."""
    root = tmp_path_factory.mktemp("sdxl-file-exports")
    done = {}

    def get(kind: str) -> Path:
        if kind not in done:
            vae = None
            if kind == "ckpt-sdxl":
                vae = save(vae_to_original_plain(models.source(kind)), root / "sdxl_vae.safetensors")
            done[kind] = export_model(xlfile(kind), root / kind, vae=vae, check=False, log=_quiet)
        return done[kind]

    return get


def _single_file_pipeline(kind: str, path: Path, folder: Path):
    import diffusers

    cls = getattr(diffusers, KINDS[kind][0])
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", list(KINDS))
def test_diffusers_reads_the_written_file_back(models, xlfile, kind, offline):
    """The test files are what diffusers understands as SDXL single files: its loader reads each
    back to the folder's exact weights (every tensor of the UNet, VAE and text encoders)."""
    import diffusers

    folder = models.source(kind)
    theirs = _single_file_pipeline(kind, xlfile(kind), folder)
    ref = getattr(diffusers, KINDS[kind][0]).from_pretrained(folder, torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(theirs, name, None), getattr(ref, name, None)
        assert (a is None) == (b is None) == (name == "text_encoder" and kind == "ckpt-sdxl-refiner"), name
        if a is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_configs_read_from_the_tensors_are_the_folders(models, xlfile, kind, offline):
    """Every size sdrt reads from an SDXL file (levels, transformer blocks per level, heads, widths,
    the added embedding's time-id width, text layers and projections) is the folder's; the
    pipeline kind, tokenizers' padding and schedule are SDXL's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from sdrt.export.checkpoint import checkpoint_source

    folder = models.source(kind)
    src = checkpoint_source(xlfile(kind), log=_quiet)
    want = UNet2DConditionModel.load_config(folder, subfolder="unet")

    def norm(v, n):
        return list(v) if isinstance(v, (list, tuple)) else [v] * n

    levels = len(want["block_out_channels"])
    for k in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "use_linear_projection"):
        assert src.unet_config[k] == want[k], k
    for k in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
              "transformer_layers_per_block"):
        assert norm(src.unet_config[k], levels) == norm(want[k], levels), k
    vae = AutoencoderKL.load_config(folder, subfolder="vae")
    for k in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor", "force_upcast"):
        assert src.vae_config[k] == vae[k], k
    index = json.loads((folder / "model_index.json").read_text())
    for k in ("_class_name", "force_zeros_for_empty_prompt", "requires_aesthetics_score", "text_encoder", "tokenizer"):
        assert src.index.get(k) == index.get(k), k
    assert src.COMPONENTS == tuple(n for n in ("text_encoder", "text_encoder_2") if index[n][0]) + ("unet", "vae")
    for name in [n for n in src.COMPONENTS if n.startswith("text_encoder")]:
        cfg = CLIPTextConfig.from_pretrained(folder, subfolder=name)
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim",
                  "hidden_act", "eos_token_id", "max_position_embeddings", "vocab_size"):
            assert src._text[name][k] == getattr(cfg, k), (name, k)
        tok = CLIPTokenizer.from_pretrained(folder, subfolder=name.replace("text_encoder", "tokenizer"))
        assert src.tokenizers[name].pad_token == tok.pad_token, name
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for k in ("_class_name", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing",
              "steps_offset"):
        assert src.scheduler_config[k] == scheduler[k], k


@pytest.mark.parametrize("kind", ["ckpt-sdxl", "ckpt-sdxl-refiner"])
def test_file_export_computes_what_diffusers_computes(models, xlfile, xlexport, kind, offline):
    """The graphs exported from the file compute what diffusers' modules of the folder compute
    (every hidden state and pooled output of each text encoder, the UNet with its time ids, the
    VAE), and the folder records the file and its A1111 hash."""
    import diffusers

    out = xlexport(kind)
    ref = getattr(diffusers, KINDS[kind][0]).from_pretrained(models.source(kind), torch_dtype=torch.float32)
    diffs = graph_differences(out, ref)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-4, (worst, diffs[worst])
    manifest = json.loads((out / "sdrt.json").read_text())
    digest = hashlib.sha256(xlfile(kind).read_bytes()).hexdigest()
    assert manifest["family"] == "sdxl" and manifest["source_file"]["sha256"] == digest
    assert manifest["source_file"]["short_hash"] == digest[:10]
    assert manifest["sdxl"]["time_ids"] == (5 if kind == "ckpt-sdxl-refiner" else 6)
    assert manifest["sdxl"]["requires_aesthetics_score"] == (kind == "ckpt-sdxl-refiner")


def test_file_img2img_matches_diffusers_single_file_pipeline(models, xlfile, xlexport, offline):
    """The user's two commands: export the SDXL file, run img2img; the image is the one diffusers'
    SDXL img2img pipeline makes from the same file (same noise), and its infotext names the file
    with A1111's Model hash and the VAE file with its hash; the VAE file got SDXL's scale."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from sdrt.runtime import load

    path = xlfile("ckpt-sdxl")
    theirs_pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(path), config=str(models.source("ckpt-sdxl")), local_files_only=True, torch_dtype=torch.float32)
    theirs_pipe.set_progress_bar_config(disable=True)
    sampler, strength, seed = "EulerDiscreteScheduler", 0.6, 4321
    noise = _noise(11)
    res = load(xlexport("ckpt-sdxl"), provider="cpu").img2img(
        _xl_image(2), PROMPT, NEGATIVE, strength=strength, steps=8, guidance=6.0, sampler=sampler, seed=seed,
        noise=noise, sample_posterior=False)
    modules = [XL_MODULES["StableDiffusionXLImg2ImgPipeline"]] + _scheduler_modules(sampler)
    with _diffusers_noise(modules, noise, _step_noise_source(seed)):
        theirs = theirs_pipe(prompt=PROMPT, image=_xl_image(2), negative_prompt=NEGATIVE, strength=strength,
                             num_inference_steps=8, guidance_scale=6.0).images[0]
    assert _compare("SDXL single file img2img", res.images[0], theirs) <= 2
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    vae = xlexport("ckpt-sdxl").parent / "sdxl_vae.safetensors"
    vae_short = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {short}, Model: {path.stem}, VAE hash: {vae_short}, VAE: {vae.name}" in res.infotexts[0]
    assert json.loads((xlexport("ckpt-sdxl") / "sdrt.json").read_text())["vae_scaling_factor"] == 0.13025


def _bad_sdxl_files(root: Path, sd: dict) -> list[tuple[str, Path, str]]:
    """(name, file, what the message must say): SDXL files that are incomplete or inconsistent."""
    unet, te1, te2 = "model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."
    label = unet + "label_emb.0.0.weight"
    w = sd[label]
    cases = {
        "no-vae": ({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, "without a VAE"),
        "unet-only": ({k: v for k, v in sd.items() if k.startswith(unet)}, "without a VAE"),
        "no-text-encoders": ({k: v for k, v in sd.items() if not k.startswith("conditioner.")}, "without SDXL's text encoders"),
        "clip-l-only": ({k: v for k, v in sd.items() if not k.startswith(te2)}, "without SDXL's text encoders"),
        "openclip-only-at-base-place": ({k: v for k, v in sd.items() if not k.startswith(te1)}, "without SDXL's text encoders"),
        "added-embedding-too-narrow": ({**sd, label: w[:, :90]}, "added embedding takes 90 numbers"),
        "added-embedding-odd-width": ({**sd, label: torch.cat([w, w[:, :5]], 1)}, "added embedding takes 149 numbers"),
        "7-channel": ({**sd, unet + "input_blocks.0.0.weight": torch.zeros(64, 7, 3, 3)}, "7 input channels"),
        "instruct-pix2pix": ({**sd, unet + "input_blocks.0.0.weight": torch.zeros(64, 8, 3, 3)}, "InstructPix2Pix"),
        "lacks-projection": ({k: v for k, v in sd.items() if not k.endswith("text_projection")}, "lacks its projection"),
        "lacks-attention": ({k: v for k, v in sd.items() if ".attn2.to_k." not in k or "middle_block" not in k},
                            "lacks"),
        "lacks-clip-layer": ({k: v for k, v in sd.items() if ".layers.1.mlp." not in k}, "lacks"),
        "misshapen-unet-layer": ({**sd, unet + "middle_block.1.proj_in.weight": torch.zeros(128, 127)}, "expects (128, 128)"),
        "misshapen-openclip-qkv": ({**sd, te2 + "model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 128)},
                                   "expects (128, 128)"),
        "transposed-projection": ({**sd, te2 + "model.text_projection": torch.zeros(96, 128)},
                                  "added embedding takes 144 numbers, which is not the pooled text (128)"),
    }
    out = []
    for name, (tensors, expect) in cases.items():
        out.append((name, save(tensors, root / f"{name}.safetensors"), expect))
    full = save(sd, root / "full.safetensors")
    blob = full.read_bytes()
    for cut in (len(blob) // 3, len(blob) - 7):
        p = root / f"cut-{cut}.safetensors"
        p.write_bytes(blob[:cut])
        out.append((p.stem, p, "truncated"))
    return out


def test_bad_sdxl_files_are_refused_in_one_line(models, tmp_path, offline):
    """Incomplete or inconsistent SDXL files: one line naming the file and what is wrong, exit 1
    from the CLI, no output folder."""
    from typer.testing import CliRunner

    from sdrt.cli.app import app

    cases = _bad_sdxl_files(tmp_path / "bad", sdxl_original_state_dict(models.source("ckpt-sdxl")))
    for name, path, expect in cases:
        out = tmp_path / "out" / name
        with pytest.raises(ExportError) as e:
            export_model(path, out, log=_quiet)
        msg = str(e.value)
        assert "\n" not in msg and path.name in msg and expect in msg, (name, msg)
        assert not out.exists() and not (out.parent.exists() and list(out.parent.glob(f".{name}*")))
        r = CliRunner().invoke(app, ["export", str(path), str(out)], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert r.exit_code == 1 and r.output.strip() == f"sdrt: error: {msg}", (name, r.output)


@pytest.mark.parametrize("markers,prediction,zero_snr", [
    ({}, "epsilon", False), ({"v_pred": torch.tensor([])}, "v_prediction", False),
    ({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, "v_prediction", True),
])
def test_v_prediction_markers(models, tmp_path, markers, prediction, zero_snr):
    """SDXL v-prediction fine-tunes mark their files with "v_pred" (and "ztsnr" for a zero-terminal-SNR
    schedule), as ComfyUI reads them; without a marker an SDXL file is epsilon."""
    from sdrt.export.checkpoint import checkpoint_source

    path = save({**sdxl_original_state_dict(models.source("ckpt-sdxl")), **markers}, tmp_path / "m.safetensors")
    cfg = checkpoint_source(path, log=_quiet).scheduler_config
    assert cfg["prediction_type"] == prediction and cfg.get("rescale_betas_zero_snr", False) == zero_snr
