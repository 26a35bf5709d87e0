"""Train sdrt's embedded default model, `shapes`, from scratch on a procedural dataset.

    nice -n 19 python scripts/train_shapes.py --work WORK --out CKPT
    sdrt export CKPT models/shapes

A small latent diffusion model of the Stable Diffusion 1.x family, on 64x64 images of simple
shapes in named colours (scripts/shapes_data.py):

1. vae      AutoencoderKL, 64x64x3 <-> 16x16x4 latents, L1 + MSE reconstruction with a small KL term.
2. latents  A fixed dataset is drawn and encoded once with the frozen VAE (posterior mean and
            log-variance); the scaling factor that gives the latents unit standard deviation is
            measured and written into the VAE config.
3. unet     UNet2DConditionModel + CLIPTextModel trained jointly, epsilon prediction, DDPM loss on
            SD's scaled_linear beta schedule (1000 steps) with min-SNR-5 weighting, 10% empty
            captions for classifier-free guidance, 10% of colour and shape words replaced by wrong
            ones (see corrupt_caption); an EMA of the weights is what gets saved.
4. save     A diffusers StableDiffusionPipeline folder (PNDM scheduler config as in SD 1.5, the real
            CLIP tokenizer from models/clip-tokenizer, no safety checker).

Deterministic: every batch is drawn from a generator seeded by (seed, stage, step), so a run
resumed from a checkpoint (--resume, the default when checkpoints exist in --work) continues
exactly as an uninterrupted one would. Checkpoints are written every --ckpt-every steps and when
a stage ends. Threads are set to --threads (2 by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdrt.export.testmodels import SD15_SCHEDULER  # noqa: E402
from shapes_data import BACKGROUNDS, SHAPE_COLOURS, SHAPES, SIZE, make_dataset, sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIP_TOKENIZER_DIR = ROOT / "models" / "clip-tokenizer"

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=[32, 64, 64],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    latent_channels=4,
    layers_per_block=1,
    # Few groups: with one channel per group (32 groups of 32 channels) GroupNorm would erase the
    # colour of every flat region, and these images are mostly flat regions.
    norm_num_groups=8,
    sample_size=SIZE,
)
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=49408,  # the real CLIP vocabulary, so the real tokenizer works
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    hidden_act="quick_gelu",
)
UNET_CONFIG = dict(
    sample_size=SIZE // 4,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
# Stable Diffusion 1.5's noise schedule and scheduler config: sdrt's samplers use it unchanged.
SCHEDULER_CONFIG = {**SD15_SCHEDULER, "prediction_type": "epsilon"}
STAGE_SEEDS = {"vae": 1, "latents": 2, "unet": 3}


def rng_for(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGE_SEEDS[stage], step])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(CLIP_TOKENIZER_DIR / "vocab.json"),
        str(CLIP_TOKENIZER_DIR / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def grid(images: list[np.ndarray], cols: int, path: Path, scale: int = 2) -> None:
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    g = Image.new("RGB", (cols * SIZE, rows * SIZE), (255, 255, 255))
    for i, im in enumerate(images):
        g.paste(Image.fromarray(im), ((i % cols) * SIZE, (i // cols) * SIZE))
    g.resize((g.width * scale, g.height * scale), Image.NEAREST).save(path)


def decode_uint8(x: torch.Tensor) -> list[np.ndarray]:
    return list(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


# ---- stage 1: VAE -------------------------------------------------------------------------------


def train_vae(a, work: Path, log) -> None:
    from diffusers import AutoencoderKL

    done = work / "vae"
    if (done / "config.json").is_file():
        log("vae: done already")
        return
    torch.manual_seed(a.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        # Start with a narrow posterior (std ~0.05) rather than std 1: the decoder then sees
        # informative latents from the first step, which speeds up training several times.
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"] :].fill_(a.vae_init_logvar)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
    ckpt = work / "vae-ckpt.pt"
    step = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"vae: resumed at step {step}")
    vae.train()
    t_start = time.time()
    bar = tqdm(total=a.vae_steps, initial=step, desc="vae", dynamic_ncols=True)
    stats = []
    while step < a.vae_steps:
        rng = rng_for(a.seed, "vae", step)
        x = to_tensor(np.stack([sample(rng)[0] for _ in range(a.vae_batch)]))
        torch.manual_seed(a.seed * 1_000_003 + step)  # the posterior sample
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.vae_steps, a.vae_lr, 100)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        l1 = (y - x).abs().mean()
        mse = (y - x).pow(2).mean()
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = l1 + mse + a.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        stats.append((l1.item(), mse.item(), kl.item()))
        bar.update(1)
        bar.set_postfix(l1=f"{np.mean([s[0] for s in stats[-50:]]):.4f}", kl=f"{np.mean([s[2] for s in stats[-50:]]):.3f}")
        if step % a.ckpt_every == 0 or step == a.vae_steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    bar.close()
    l1, mse, kl = np.mean(stats[-100:], axis=0) if stats else (float("nan"),) * 3
    vae.eval()
    # Held-out reconstructions, for the record.
    with torch.no_grad():
        imgs, _ = make_dataset(256, a.seed + 12345)
        x = to_tensor(imgs)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        err = ((y.clamp(-1, 1) - x).abs().mean() * 127.5).item()
        grid([im for pair in zip(imgs[:16], decode_uint8(y[:16])) for im in pair], 8, work / "vae-recon.png")
    vae.save_pretrained(done)
    info = {"steps": a.vae_steps, "final_l1": float(l1), "final_mse": float(mse), "final_kl": float(kl), "heldout_mean_abs_err_0_255": err, "seconds_this_run": round(time.time() - t_start)}
    (work / "vae-stats.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"vae: {info}")


# ---- stage 2: latents ----------------------------------------------------------------------------


def encode_latents(a, work: Path, log) -> None:
    from diffusers import AutoencoderKL

    out = work / "latents.npz"
    if out.is_file():
        log("latents: done already")
        return
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    imgs, captions = make_dataset(a.n_images, a.seed * 1000 + STAGE_SEEDS["latents"])
    means, logvars = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(imgs), 256), desc="latents", dynamic_ncols=True):
            p = vae.encode(to_tensor(imgs[i : i + 256])).latent_dist
            means.append(p.mean.numpy())
            logvars.append(p.logvar.numpy())
    mean, logvar = np.concatenate(means), np.concatenate(logvars)
    # Unit variance of the sampled latents: var(mean) + E[posterior var].
    std = float(np.sqrt(mean.var() + np.exp(logvar).mean()))
    scaling = 1.0 / std
    tok = tokenizer()
    uniq = sorted(set(captions) | {""})
    ids_of = dict(zip(uniq, tok(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids.astype(np.int32)))
    ids = np.stack([ids_of[c] for c in captions])
    np.savez(
        out.with_suffix(".tmp.npz"), mean=mean.astype(np.float16), logvar=logvar.astype(np.float16), ids=ids, empty=ids_of[""], scaling=scaling
    )
    os.replace(out.with_suffix(".tmp.npz"), out)
    (work / "captions.txt").write_text("\n".join(captions) + "\n")
    log(f"latents: {len(imgs)} images, latent mean {mean.mean():.3f}, std {std:.3f} -> scaling factor {scaling:.5f}; {len(uniq) - 1} distinct captions")


# ---- stage 3: UNet + text encoder ----------------------------------------------------------------


def corrupt_caption(caption: str, rng: np.random.Generator, p: float) -> str:
    """Replace each colour and shape word by another with probability p (articles follow).

    With always-exact captions the model learns to trust the text over the image at every noise
    level, and classifier-free guidance then repaints a blue circle red even at img2img strength
    0.2. A few wrong words teach it that a clear image outweighs the text, while at high noise
    the text still decides."""
    words = caption.split()
    on = words.index("on")
    for i, w in enumerate(words):
        if rng.random() >= p:
            continue
        if w in SHAPES:
            choices = [s for s in SHAPES if s != w]
        elif i > on and w in BACKGROUNDS:
            choices = [c for c in BACKGROUNDS if c != w]
        elif w in SHAPE_COLOURS:
            choices = [c for c in SHAPE_COLOURS if c != w]
        else:
            continue
        words[i] = choices[rng.integers(len(choices))]
        if w not in SHAPES:
            words[i - 1] = "an" if words[i][0] in "aeiou" else "a"
    return " ".join(words)


def build_unet_text():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return UNet2DConditionModel(**UNET_CONFIG), CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def train_unet(a, work: Path, log) -> None:
    from diffusers import DDPMScheduler

    if (work / "unet-final.pt").is_file():
        log("unet: done already")
        return
    data = np.load(work / "latents.npz")
    mean, logvar, empty = data["mean"], data["logvar"], data["empty"]
    captions = (work / "captions.txt").read_text().splitlines()
    tok_fn, tok_cache = tokenizer(), {}

    def token_ids(caption: str) -> np.ndarray:
        if caption not in tok_cache:
            tok_cache[caption] = np.asarray(tok_fn(caption, padding="max_length", max_length=77, truncation=True).input_ids, np.int64)
        return tok_cache[caption]

    scaling = float(data["scaling"])
    n = len(mean)
    torch.manual_seed(a.seed)
    unet, text = build_unet_text()
    ema = [p.detach().clone() for p in list(unet.parameters()) + list(text.parameters())]
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=a.unet_lr, weight_decay=0.01)
    ckpt = work / "unet-ckpt.pt"
    step = 0
    losses: list[float] = []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        for e, s in zip(ema, state["ema"]):
            e.copy_(s)
        step, losses = state["step"], state["losses"]
        log(f"unet: resumed at step {step}")
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod.float()
    unet.train()
    text.train()
    t_start = time.time()
    bar = tqdm(total=a.unet_steps, initial=step, desc="unet", dynamic_ncols=True)
    while step < a.unet_steps:
        rng = rng_for(a.seed, "unet", step)
        idx = rng.integers(0, n, a.unet_batch)
        eps_z = rng.standard_normal((a.unet_batch, *mean.shape[1:]), dtype=np.float32)
        z = (mean[idx].astype(np.float32) + np.exp(0.5 * logvar[idx].astype(np.float32)) * eps_z) * scaling
        noise = torch.from_numpy(rng.standard_normal(z.shape, dtype=np.float32))
        t = torch.from_numpy(rng.integers(0, 1000, a.unet_batch))
        tok = np.stack([token_ids(corrupt_caption(captions[i], rng, a.caption_noise)) for i in idx])
        tok[rng.random(a.unet_batch) < a.uncond_prob] = empty
        z = torch.from_numpy(z)
        ab = acp[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * z + (1 - ab).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.unet_steps, a.unet_lr, 200)
        cond = text(torch.from_numpy(tok).long())[0]
        pred = unet(noisy, t, cond).sample
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        # Min-SNR-5 weighting (Hang et al. 2023): the easy low-noise steps do not dominate.
        snr = ab.view(-1) / (1 - ab.view(-1))
        loss = (mse * snr.clamp(max=a.snr_gamma) / snr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(mse.mean().item())
        bar.update(1)
        bar.set_postfix(mse=f"{np.mean(losses[-100:]):.4f}")
        if step % a.ckpt_every == 0 or step == a.unet_steps:
            save_atomic(
                {"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step, "losses": losses},
                ckpt,
            )
    bar.close()
    # The EMA weights are the model.
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    save_atomic({"unet": unet.state_dict(), "text": text.state_dict(), "scaling": scaling}, work / "unet-final.pt")
    info = {"steps": a.unet_steps, "final_mse_last_200_steps": float(np.mean(losses[-200:])), "final_mse_last_1000_steps": float(np.mean(losses[-1000:])), "seconds_this_run": round(time.time() - t_start)}
    (work / "unet-stats.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"unet: {info}")


# ---- stage 4: diffusers folder -------------------------------------------------------------------


def save_pipeline(a, work: Path, out: Path, log) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline

    state = torch.load(work / "unet-final.pt", weights_only=False)
    unet, text = build_unet_text()
    unet.load_state_dict(state["unet"])
    text.load_state_dict(state["text"])
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.register_to_config(scaling_factor=float(state["scaling"]))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer(),
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy2(CLIP_TOKENIZER_DIR / f, tmp / "tokenizer" / f)
    stats = {k: json.loads((work / f"{k}-stats.json").read_text()) for k in ("vae", "unet")}
    (tmp / "shapes-training.json").write_text(json.dumps({"seed": a.seed, "args": vars(a), **stats}, indent=2, default=str) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"saved {out}")
    # A few samples with diffusers' own pipeline, for a look.
    prompts = ["a red circle on a white background", "a blue square on a white background", "a green triangle on a black background",
               "a yellow star on a blue background", "a purple circle and an orange square on a white background", "a black triangle on a gray background",
               "an orange circle on a white background", "a white star on a red background"]
    imgs = pipe(prompts, height=SIZE, width=SIZE, num_inference_steps=25, guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    grid([(im * 255).round().astype(np.uint8) for im in imgs], 8, work / "samples.png", scale=3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/work/shapes-work"), help="checkpoints and intermediate data")
    p.add_argument("--out", type=Path, default=Path("/work/shapes-ckpt"), help="the diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default="vae,latents,unet,save")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--vae-steps", type=int, default=900)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the KL term (per latent element)")
    p.add_argument("--vae-init-logvar", type=float, default=-6.0)
    p.add_argument("--n-images", type=int, default=40000, help="images in the diffusion training set")
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR loss weighting")
    p.add_argument("--caption-noise", type=float, default=0.1, help="probability that a colour or shape word is replaced")
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in --work and start over")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    if a.fresh:
        shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True, exist_ok=True)
    logf = open(a.work / "train.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        tqdm.write(line)
        logf.write(line + "\n")
        logf.flush()

    t0 = time.time()
    log(f"train_shapes {' '.join(sys.argv[1:])}")
    stages = a.stages.split(",")
    for stage in stages:
        ts = time.time()
        {"vae": train_vae, "latents": encode_latents, "unet": train_unet}.get(stage, lambda *x: None)(a, a.work, log)
        if stage == "save":
            save_pipeline(a, a.work, a.out, log)
        log(f"{stage}: {time.time() - ts:.0f}s")
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
