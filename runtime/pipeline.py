"""img2img, inpainting and txt2img on a model folder: the denoising loop around the ONNX graphs.

    from sdrt.runtime import load
    pipe = load("models/shapes", provider="cpu")
    r = pipe.img2img("in.png", "a red circle on a white background", strength=0.7, seed=1)
    r.images[0].save("out.png")

No torch: the graphs run in ONNX Runtime, the sampler arithmetic in NumPy (sdrt.schedulers).
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdrt import schedulers
from sdrt.schedulers import options as option_domains

from . import lora, prepare, prompts, sdxl
from .embeddings import default_dir as embeddings_default_dir
from .embeddings import short_hash as embeddings_short_hash
from .errors import InputError
from .modelfolder import CLIP_SKIP_OUTPUT, FP32_VAE_DECODER, ModelFolderError, ModelInfo, read_model_folder
from .sessions import Graph, check_threads, resolve_provider

OUTPUTS = ("pil", "np", "latent")
MAX_SEED = 2**32 - 1
# Prompt weights ((text:w), and 1.1 per bracket level) beyond this are refused: the emphasis
# multiplies the text encoding by them, and far beyond a few units the UNet's input overflows.
MAX_PROMPT_WEIGHT = 100.0
# Initial noise passed in explicitly: finite and at most this far from 0 (it is standard normal).
MAX_NOISE = 1e4
# Input shapes (batch, height, width) of the UNet that may hold a captured CUDA graph at once.
DEFAULT_CUDA_GRAPHS = 4
# Sets of merged LoRA weights kept per graph, the one in use among them (2: it and the previous
# one, so switching back does not merge again; each kept set costs the bytes of the weights it
# changes). Pipeline.lora_cache may change it (1: only the set in use).
LORA_CACHE = 2


@dataclass
class Result:
    """What a generation returns: images plus everything needed to reproduce them."""

    images: list  # PIL images (output="pil"), else empty
    seeds: list[int]
    parameters: dict[str, Any]
    infotexts: list[str]
    arrays: np.ndarray | None = None  # output="np": (B,H,W,3) float32 in [0,1]; "latent": (B,C,h,w)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def infotext(self) -> str:
        """A1111's "parameters" text of the first image."""
        return self.infotexts[0] if self.infotexts else ""


class _EmbeddingCache:
    """LRU cache of text embeddings: a prompt is encoded once, whatever the number of calls."""

    def __init__(self, size: int = 32):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, compute):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value


def _check_number(name: str, value, lo=None, hi=None, integer=False):
    ok_type = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    finite = not isinstance(value, (float, np.floating)) or np.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not finite:
        kind = "an integer" if integer else "a finite number"
        raise InputError(f"{name} must be {kind}, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise InputError(f"{name} must be {rng}, got {value}")
    return value


def _seeds(seed, n: int) -> list[int]:
    if seed is None or seed == -1:
        seed = random.randrange(MAX_SEED)
    _check_number("seed", seed, 0, MAX_SEED, integer=True)
    return [int(seed + i) & MAX_SEED for i in range(n)]


class BatchNoise:
    """Per-image NumPy generators (seed + i): every random draw of image i comes from its own
    stream, so an image depends only on its seed, not on the batch it was made in."""

    def __init__(self, seeds: list[int]):
        self.rngs = [np.random.default_rng(s) for s in seeds]

    def randn(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        return np.stack([r.standard_normal(shape, dtype=np.float32) for r in self.rngs]).astype(dtype, copy=False)



class Pipeline:
    """A loaded model folder. Thread-safe: several threads may call it at once."""

    def __init__(self, info: ModelInfo, provider: str = "auto", threads: int | None = None, *,
                 io_binding: bool | None = None, cuda_graphs: int | None = None,
                 provider_options: dict[str, Any] | None = None, lora_dir: str | Path | None = None,
                 embeddings_dir: str | Path | None = None):
        self.info = info
        threads = check_threads(threads)
        self.provider = resolve_provider(provider, info)
        self.io_binding = self.provider == "cuda" if io_binding is None else bool(io_binding)
        if cuda_graphs is None:
            cuda_graphs = DEFAULT_CUDA_GRAPHS if self.io_binding and self.provider == "cuda" else 0
        _check_number("cuda_graphs", cuda_graphs, 0, 64, integer=True)
        if cuda_graphs and not self.io_binding:
            raise InputError("cuda_graphs needs io_binding (CUDA graphs replay on fixed device buffers)")
        self.cuda_graphs = cuda_graphs if self.provider == "cuda" else 0
        self.graphs = {
            name: Graph(name, path, self.provider, threads, io_binding=self.io_binding,
                        cuda_graphs=cuda_graphs if name == "unet" else 0, provider_options=provider_options,
                        gate=info.wait_verified, on_load=self._check_graph)
            for name, path in info.graph_files.items()
        }
        from .text import ClipTokenizer

        # One tokenizer per text encoder (SDXL: tokenizer/ and tokenizer_2/; a refiner: tokenizer_2/ alone).
        try:
            self.tokenizers = {name: ClipTokenizer.from_folder(info.path / name) for name in info.tokenizers}
        except ModelFolderError:
            info.wait_verified()  # a damaged file is the cause to report, when it is one
            raise
        self.tokenizer = self.tokenizers[info.tokenizers[0]]
        self._embeddings = _EmbeddingCache()
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else lora.default_dir(info.path)
        self._lora_lock = threading.RLock()
        self._lora_used = False
        self.embeddings_dir = (Path(embeddings_dir).expanduser() if embeddings_dir is not None
                               else embeddings_default_dir(info.path))
        self._emb_set = None
        self._emb_table = None
        self._lora_files: OrderedDict = OrderedDict()  # (path, size, mtime) -> (graph -> module -> Layer, hash)
        self._lora_merged: OrderedDict = OrderedDict()  # (graph, key) -> merged initializers
        self.lora_cache = LORA_CACHE
        self.fp32_decodes = 0  # images decoded again by the fp32 VAE decoder (fp16 overflow)

    def __repr__(self) -> str:
        i = self.info
        return (f"Pipeline({str(i.path)!r}, family={i.family}, unet_in_channels={i.unet_in_channels}, "
                f"provider={self.provider}, io_binding={self.io_binding}, cuda_graphs={self.cuda_graphs})")

    def _check_graph(self, graph: Graph, session) -> None:
        """A new session's declared inputs and outputs against the folder's description: a manifest
        that says 4 latent channels for graphs that take 8 is refused here, in one line, not by a
        shape error from ONNX Runtime or NumPy in the middle of a run."""
        i = self.info
        expect = {
            "unet": {"sample": (1, i.unet_in_channels), "encoder_hidden_states": (2, i.text_hidden_size),
                     "out_sample": (1, i.latent_channels)},
            "vae_encoder": {"sample": (1, 3), "latent_parameters": (1, 2 * i.latent_channels)},
            "vae_decoder": {"latent_sample": (1, i.latent_channels), "sample": (1, 3)},
            FP32_VAE_DECODER: {"latent_sample": (1, i.latent_channels), "sample": (1, 3)},
            # SDXL's encoders each give a part of text_hidden_size (the UNet's check covers the sum).
            **({} if i.is_sdxl else {"text_encoder": {"last_hidden_state": (2, i.text_hidden_size)}}),
        }.get(graph.name, {})
        declared = {a.name: a.shape for a in list(session.get_inputs()) + list(session.get_outputs())}
        for name, (axis, want) in expect.items():
            shape = declared.get(name)
            if shape is None:
                if name in ("latent_parameters", "out_sample", "last_hidden_state"):
                    continue  # another exporter's output name: checked by the shapes it returns
                raise ModelFolderError(f"the {graph.name} graph {graph.path} has no input {name!r} "
                                       f"(it has {', '.join(declared)}); this is not a Stable Diffusion {graph.name}")
            got = shape[axis] if len(shape) > axis else None
            if isinstance(got, int) and got != want:
                raise ModelFolderError(
                    f"the {graph.name} graph {graph.path} has {got} in dimension {axis} of {name!r}, but the folder's "
                    f"description says {want} (unet_in_channels {i.unet_in_channels}, latent_channels "
                    f"{i.latent_channels}, text_hidden_size {i.text_hidden_size}): the manifest or config does not "
                    "describe these graphs; export the model again"
                )

    def load_graphs(self, names=None) -> "Pipeline":
        """Create the sessions of `names` (default: every graph but the fp32 VAE decoder fallback)
        now (they are created on first use otherwise).

        Order: ONNX Runtime reads a graph whose weights are inside its .onnx file whole, a transient
        copy of its size, so those load first, largest first, while little else is resident; graphs
        with external weight files (the UNet of an SD-sized model) load last."""
        if names is None:
            names = (*self.info.text_encoders, "vae_encoder", "unet", "vae_decoder")
        graphs = [self.graphs[n] for n in names if n in self.graphs]
        for g in sorted(graphs, key=lambda g: -g.path.stat().st_size):
            g.load()
        return self

    # ----------------------------------------------------------------------------------- text
    def _check_clip_skip(self, clip_skip: int, family: str | None = None) -> None:
        """clip_skip against the text encoder graph's outputs (loads the session, runs nothing)."""
        if clip_skip == 1:
            return
        if self.info.is_sdxl:
            if sdxl.layers(family, clip_skip)[0] != sdxl.PENULTIMATE:
                for e in self._xl_encoders():
                    e.layer(clip_skip + 1)
            return
        g = self.graphs["text_encoder"].load()
        shape = next((o.shape for o in g.session.get_outputs() if o.name == CLIP_SKIP_OUTPUT), None)
        if shape is None:
            raise InputError(
                f"clip_skip={clip_skip} needs the {CLIP_SKIP_OUTPUT} output of the text encoder, which this model folder "
                "lacks (exported by another tool); export the model with `sdrt export` or use clip_skip=1"
            )
        if len(shape) > 1 and isinstance(shape[1], int) and clip_skip > shape[1]:
            raise InputError(f"clip_skip must be from 1 to {shape[1]} for this model, got {clip_skip}")

    def _text_encoder(self, ids: np.ndarray, clip_skip: int) -> np.ndarray:
        g = self.graphs["text_encoder"]
        if clip_skip == 1:
            return g.run({"input_ids": ids}, ["last_hidden_state"])[0].astype(np.float32, copy=False)
        self._check_clip_skip(clip_skip)
        layers = g.run({"input_ids": ids}, [CLIP_SKIP_OUTPUT])[0]
        if clip_skip > layers.shape[1]:
            raise InputError(f"clip_skip must be from 1 to {layers.shape[1]} for this model, got {clip_skip}")
        return layers[:, clip_skip - 1].astype(np.float32, copy=False)

    def _xl_encoders(self) -> list:
        """The SDXL text encoders as sdxl.conditioning reads them (sessions loaded, nothing run)."""
        out = []
        for name, tok in zip(self.info.text_encoders, self.info.tokenizers):
            g = self.graphs[name].load()
            states = [o for o in g.output_names if o.startswith("hidden_states.")]
            if not states:
                raise InputError(f"the {name} graph of {self.info.path} has no hidden_states.* outputs (SDXL conditions on "
                                 "the penultimate layer); export the model with `sdrt export` or optimum's SDXL export")
            pooled = "text_embeds" if name == "text_encoder_2" else None

            def run(ids, names, g=g):
                return g.run({"input_ids": ids}, names)

            out.append(sdxl.Encoder(self.tokenizers[tok], run, len(states), pooled))
        return out

    def xl_conditioning(self, prompt: str, negative_prompt: str = "", clip_skip: int = 1, *, family: str | None = "a1111",
                        height: int = 1024, width: int = 1024, mode: str = "img2img", steps: int = 1, **options):
        """An SDXL model's UNet inputs for a prompt: call index -> (key, cond, uncond), each a dict
        of encoder_hidden_states, text_embeds and time_ids (sdxl.conditioning). `options`: SDXL's
        micro-conditioning (original_size, crops_coords_top_left, target_size, the negative ones,
        aesthetic scores); `family` the sampler family whose rules apply."""
        if not self.info.is_sdxl:
            raise InputError(f"{self.info.path} is a {self.info.family} model; SDXL conditioning needs an SDXL model")
        xl_opts = sdxl.take_options(dict(options), True)
        ids = sdxl.time_ids(self.info.xl, xl_opts, height, width, family=family, mode=mode)
        cond_schedule = prompts.prompt_schedule(prompts.composable_prompt(prompt), steps)
        uncond_schedule = prompts.prompt_schedule(negative_prompt, steps)
        return sdxl.conditioning(self._xl_encoders(), self.info.xl, cond_schedule, uncond_schedule, negative_prompt,
                                 family=family, clip_skip=clip_skip, ids=ids)

    def encode_prompt(self, prompt: str, negative_prompt: str = "", clip_skip: int = 1, emphasis: bool = True):
        """(cond, uncond) embeddings (1, 77*k, D), cached per (prompt, negative, clip_skip)."""
        from .text import encode_prompts

        key = (prompt, negative_prompt, clip_skip, emphasis, self.graphs["text_encoder"].initializers_key)
        return self._embeddings.get(
            key,
            lambda: tuple(
                x[:1]
                for x in encode_prompts(
                    [prompt], [negative_prompt], self.tokenizer, self._text_encoder, clip_skip=clip_skip, emphasis=emphasis,
                    embeddings=self._embedding_matcher(),
                )
            ),
        )

    # ----------------------------------------------------------------------------------- LoRA
    def _resolve_loras(self, uses: list) -> list:
        """[(use, path, graph -> module -> Layer, short hash)] for the LoRAs of a request: every file found,
        read and checked against this model before anything runs."""
        if not uses:
            return []
        if self.info.is_sdxl:
            raise InputError(f"LoRAs are applied to SD 1.x and 2.x models; {self.info.path} is an SDXL model, whose "
                             f"LoRAs sdrt does not apply yet (remove {', '.join(f'<lora:{u.name}:...>' for u in uses)})")
        precision = self.info.precision
        if any(precision.get(g) not in ("fp32", "fp16") for g in lora.GRAPHS):
            got = ", ".join(f"{g} {precision.get(g)}" for g in lora.GRAPHS)
            raise InputError(f"LoRAs are applied to fp32 and fp16 graphs; {self.info.path} has {got} graphs (int8 layers "
                             "are not re-quantized): use an fp32 or fp16 export of this model")
        maps = {g: lora.read_map(self.info.graph_files[g]) for g in lora.GRAPHS}
        if any(m is None for m in maps.values()):
            raise InputError(f"{self.info.path} has no LoRA map ({lora.MAP_FILE}): it was exported before sdrt applied "
                             "LoRAs, or by another tool; export it again with `sdrt export` to use LoRAs")
        out = []
        for use in uses:
            path = lora.find(use.name, self.lora_dir)
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._lora_files:
                layers = lora.parse_layers(use.name, lora.read_safetensors(path), maps)
                self._lora_files[key] = (layers, lora.short_hash(path))
                while len(self._lora_files) > 8:
                    self._lora_files.popitem(last=False)
            layers, short = self._lora_files[key]
            out.append((use, path, layers, short))
        return out

    def _apply_loras(self, resolved: list) -> None:
        """Give the text encoder and UNet sessions the weights of `resolved` (none: the model's own),
        and the text encoder the token-embedding table extended by the folder's embeddings."""
        self._lora_used = self._lora_used or bool(resolved)
        emb = self.embedding_set()
        for graph in lora.GRAPHS:
            field_ = "te" if graph == "text_encoder" else "unet"
            parts = [(str(path), getattr(use, field_)) for use, path, layers, _ in resolved
                     if graph in layers and getattr(use, field_) != 0]
            key = tuple(sorted(parts)) or None
            g = self.graphs[graph]
            table = graph == "text_encoder" and emb.embeddings
            full_key = (key, emb.key) if table else key
            if full_key == g.initializers_key:
                continue
            cache_key = (graph, key)
            arrays = self._lora_merged.get(cache_key)
            if arrays is None and key is not None:
                g.set_initializers(None, {})  # the old merged weights go before the new ones are made
                updates = [(layers[graph], getattr(use, field_)) for use, path, layers, _ in resolved if graph in layers]
                arrays = lora.merge(g.path, lora.read_map(g.path), updates)
                self._lora_merged[cache_key] = arrays
            if key is not None:
                self._lora_merged.move_to_end(cache_key)
            # Sets kept: lora_cache in all, the one in use among them.
            mine = [k for k in self._lora_merged if k[0] == graph]
            for k in mine[:max(0, len(mine) - max(0, self.lora_cache - (key is None)))]:
                del self._lora_merged[k]
            arrays = dict(arrays or {})
            if table:
                arrays.update(self._token_table(emb))
            g.set_initializers(full_key, arrays)

    # ----------------------------------------------------------------------------- embeddings
    def embedding_set(self):
        """The textual-inversion embeddings of the embeddings folder (read again when a file changes)."""
        from . import embeddings

        with self._lora_lock:
            self._emb_set = embeddings.scan(self.embeddings_dir, self.info.text_hidden_size, self.tokenizer.vocab_size,
                                            self._emb_set)
            return self._emb_set

    def _embedding_matcher(self):
        emb = self.embedding_set()
        if not emb.embeddings and not emb.skipped:
            return None
        return emb.lookup(self.tokenizer), emb.replacement

    def _token_table(self, emb) -> dict[str, np.ndarray]:
        """{initializer: the token-embedding table with the embeddings' vectors appended}."""
        if self._emb_table is not None and self._emb_table[0] == emb.key:
            return self._emb_table[1]
        from .onnxinit import initializers

        path = self.graphs["text_encoder"].path
        want = (self.tokenizer.vocab_size, self.info.text_hidden_size)
        found = [t for t in initializers(path).values() if t.dims == want and t.dtype in (1, 10)]
        if len(found) != 1:
            raise InputError(f"the text encoder graph {path} has no single token-embedding table of shape {list(want)} "
                             "to extend, so textual-inversion embeddings cannot be used with it")
        base = found[0].read()
        table = np.concatenate([base, emb.rows().astype(base.dtype)])
        self._emb_table = (emb.key, {found[0].name: table})
        return self._emb_table[1]

    # ------------------------------------------------------------------------------------ VAE
    def encode_images(self, pixels: np.ndarray, noise: BatchNoise | None, sample_posterior: bool = True) -> np.ndarray:
        """(B,3,H,W) in [-1,1] -> scaled latents; posterior sampled with each image's generator."""
        params = self.graphs["vae_encoder"].run({"sample": pixels})[0].astype(np.float32, copy=False)
        f, lc = self.info.vae_scale_factor, self.info.latent_channels
        want = (pixels.shape[0], 2 * lc, pixels.shape[2] // f, pixels.shape[3] // f)
        if params.shape != want:
            raise ModelFolderError(
                f"the VAE encoder of {self.info.path} returned {params.shape} for images of {pixels.shape}; the folder "
                f"says {lc} latent channels and a scale factor of {f}, which give {want}: the manifest or config does "
                "not describe these graphs; export the model again")
        c = params.shape[1] // 2
        mean, logvar = params[:, :c], np.clip(params[:, c:], -30.0, 20.0)
        if sample_posterior:
            if noise is None:
                raise ValueError("sampling the posterior needs a noise source")
            eps = noise.randn(mean.shape[1:])
            latents = mean + np.exp(0.5 * logvar) * eps
        else:
            latents = mean
        return (latents * self.info.vae_scaling_factor).astype(np.float32, copy=False)

    def decode_latents(self, latents: np.ndarray, fallbacks: list[int] | None = None) -> np.ndarray:
        """Scaled latents (B,C,h,w) -> images (B,3,H,W) in [-1,1] (float32).

        An image whose decoding overflows (NaN/Inf, which fp16 VAE decoders do on some latents) is
        decoded again with the folder's fp32 decoder when it has one (its index is appended to
        `fallbacks`), and is an error otherwise: never a black or noisy image in silence."""
        z = (latents / self.info.vae_scaling_factor).astype(np.float32, copy=False)
        if not np.isfinite(z).all():
            bad = ", ".join(str(i) for i in np.flatnonzero(~np.isfinite(z.reshape(z.shape[0], -1)).all(axis=1)))
            if self.info.precision.get("unet") == "fp16":
                raise RuntimeError(f"the denoising loop produced NaN/Inf latents for image {bad}; the fp16 UNet "
                                   "overflowed: export the model with --fp32-ops MultiHeadAttention (or use an fp32 model)")
            raise RuntimeError(f"the denoising loop produced NaN/Inf latents for image {bad}: check the sampler "
                               "options, the noise and the prompt weights")
        out = []
        f = self.info.vae_scale_factor
        want = (1, 3, z.shape[2] * f, z.shape[3] * f)
        for i in range(z.shape[0]):
            x = self.graphs["vae_decoder"].run({"latent_sample": z[i : i + 1]}, ["sample"])[0]
            if x.shape != want:
                raise ModelFolderError(
                    f"the VAE decoder of {self.info.path} returned {x.shape} for latents of {z[i : i + 1].shape}; the "
                    f"folder says a scale factor of {f}, which gives {want}: the manifest or config does not describe "
                    "these graphs; export the model again")
            if not np.isfinite(x).all():
                fallback = self.graphs.get(FP32_VAE_DECODER)
                if fallback is None:
                    raise RuntimeError(
                        f"the VAE decoder of {self.info.path} produced NaN/Inf for image {i} (fp16 overflow); export "
                        "the model with --fp32-vae-decoder to decode such images in fp32"
                    )
                x = fallback.run({"latent_sample": z[i : i + 1]}, ["sample"])[0]
                self.fp32_decodes += 1
                if fallbacks is not None:
                    fallbacks.append(i)
            out.append(x)
        return np.concatenate(out).astype(np.float32, copy=False)

    # ------------------------------------------------------------------------------------ UNet
    def _unet(self, x_in: np.ndarray, t: float, text: dict[str, np.ndarray]) -> np.ndarray:
        """One UNet call; `text`: its text-side inputs (encoder_hidden_states, and SDXL's
        text_embeds and time_ids), the same arrays at every step of a prompt."""
        g = self.graphs["unet"]
        g.load()
        rank = g.input_ranks.get("timestep", 0)
        ts = np.array(t, dtype=np.float64) if rank == 0 else np.full((x_in.shape[0],) if rank == 1 else (1,), t)
        # With IO binding the text-side inputs cross to the device once per prompt, not per call.
        return g.run({"sample": x_in, "timestep": ts, **text}, ["out_sample"], keep=tuple(text))[0]

    def _check_unet_output(self, out: np.ndarray, b: int) -> None:
        """NaN/Inf in the UNet's output, per image (rows i and b+i of a CFG batch are image i)."""
        if np.isfinite(out).all():
            return
        rows = ~np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)
        bad = sorted({i % b for i in np.flatnonzero(rows)})
        images = ", ".join(str(i) for i in bad)
        if self.info.precision.get("unet") == "fp16":
            raise RuntimeError(
                f"the fp16 UNet overflowed (NaN/Inf) for image {images} of the batch; export the model with "
                "--fp32-ops MultiHeadAttention (or use an fp32 model)"
            )
        raise RuntimeError(f"the UNet produced NaN/Inf for image {images} of the batch: check the prompt weights, "
                           "the noise and the sampler options")

    def make_denoiser(self, plan, cond, uncond, guidance: float, conditioning: np.ndarray | None = None):
        """denoise(x, sigma) -> x0 estimate, with CFG as one UNet call on a 2B batch.

        `cond` and `uncond`: the text embeddings (1, L, D), or dicts of the UNet's text-side inputs
        (SDXL: encoder_hidden_states, text_embeds, time_ids). `cond` may instead be a function of
        the model call's index (0 first) returning (key, cond, uncond), for conditioning that
        changes between calls (prompt editing); `uncond` is then unused."""
        prediction_type = self.info.prediction_type
        cfg = guidance > 1.0
        emb_cache: dict = {}
        per_call = cond if callable(cond) else (lambda i: (None, cond, uncond))
        calls = itertools.count()

        def embeddings(b: int) -> dict[str, np.ndarray]:
            key, c_, u_ = per_call(next(calls))
            if (b, key) not in emb_cache:
                c_, u_ = _text_inputs(c_), _text_inputs(u_) if cfg else None
                emb_cache[b, key] = {
                    k: np.concatenate([np.repeat(u_[k], b, axis=0), np.repeat(v, b, axis=0)]) if cfg else np.repeat(v, b, axis=0)
                    for k, v in c_.items()
                }
            return emb_cache[b, key]

        buf: dict[str, np.ndarray] = {}

        def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
            b = x.shape[0]
            n = 2 * b if cfg else b
            c_in = 1.0 / np.sqrt(sigma * sigma + 1.0)
            extra = conditioning.shape[1] if conditioning is not None else 0
            shape = (n, x.shape[1] + extra, x.shape[2], x.shape[3])
            inp = buf.get("in")
            if inp is None or inp.shape != shape:
                inp = buf["in"] = np.empty(shape, np.float32)
                if conditioning is not None:
                    cond_rep = np.concatenate([conditioning] * (n // conditioning.shape[0]))
                    inp[:, x.shape[1] :] = cond_rep
            np.multiply(x, c_in, out=inp[:b, : x.shape[1]])
            if cfg:
                inp[b:, : x.shape[1]] = inp[:b, : x.shape[1]]
            out = self._unet(inp, plan.timestep(sigma), embeddings(b)).astype(np.float32, copy=False)
            self._check_unet_output(out, b)
            if cfg:
                u, c = out[:b], out[b:]
                model_out = u + guidance * (c - u)
            else:
                model_out = out
            return schedulers.denoised_from_output(model_out, x, sigma, prediction_type)

        return denoise

    # -------------------------------------------------------------------------------- public
    def img2img(
        self,
        image,
        prompt: str,
        negative_prompt: str = "",
        strength: float = 0.75,
        steps: int = 20,
        guidance: float = 7.5,
        sampler: str = "Euler a",
        schedule: str | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        width: int | None = None,
        height: int | None = None,
        resize_mode: str = "just_resize",
        clip_skip: int = 1,
        noise: np.ndarray | None = None,
        sample_posterior: bool = True,
        output: str = "pil",
        progress: Callable[[int, int], None] | None = None,
        dry_run: bool = False,
        loras: dict[str, Any] | None = None,
        **sampler_options,
    ) -> Result:
        """Transform `image` towards `prompt`. strength 0 returns the VAE round trip of the input,
        1 ignores it (almost: A1111-named samplers keep a trace of it, as A1111 does).

        dry_run=True (here, in inpaint and in txt2img) checks the whole request and returns the
        Result it would make (seeds, parameters, infotexts; no images) without running a model."""
        job = prepare.img2img_job(self.info, image, width=width, height=height, resize_mode=resize_mode,
                                  batch_size=batch_size, family=_family(sampler), admit=self._admit(guidance, encodes=True))
        return self._generate(
            job,
            mode="img2img",
            prompt=prompt,
            negative_prompt=negative_prompt,
            strength=strength,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            schedule=schedule,
            seed=seed,
            clip_skip=clip_skip,
            noise=noise,
            sample_posterior=sample_posterior,
            output=output,
            progress=progress,
            dry_run=dry_run,
            loras=loras,
            sampler_options=sampler_options,
        )

    def inpaint(
        self,
        image,
        mask,
        prompt: str,
        negative_prompt: str = "",
        strength: float = 0.75,
        steps: int = 20,
        guidance: float = 7.5,
        sampler: str = "Euler a",
        schedule: str | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        width: int | None = None,
        height: int | None = None,
        resize_mode: str = "just_resize",
        clip_skip: int = 1,
        noise: np.ndarray | None = None,
        sample_posterior: bool = True,
        output: str = "pil",
        mask_blur: int | None = None,
        mask_blur_x: int | None = None,
        mask_blur_y: int | None = None,
        invert_mask: bool = False,
        mask_round: bool = True,
        fill: str = "original",
        only_masked: bool = False,
        padding: int = 32,
        overlay: bool = True,
        progress: Callable[[int, int], None] | None = None,
        dry_run: bool = False,
        loras: dict[str, Any] | None = None,
        **sampler_options,
    ) -> Result:
        """Repaint the white part of `mask` in `image` (A1111's inpainting options).

        mask_blur: A1111's Gaussian mask blur for A1111 and ComfyUI names (default 4, A1111's);
        diffusers' mask_processor.blur (Pillow's GaussianBlur, one radius) for diffusers names
        (default 0: diffusers blurs only when asked)."""
        if mask_blur is None:
            mask_blur = 0 if _family(sampler) == "diffusers" else 4
        job = prepare.inpaint_job(
            self.info,
            image,
            mask,
            width=width,
            height=height,
            resize_mode=resize_mode,
            batch_size=batch_size,
            mask_blur_x=mask_blur if mask_blur_x is None else mask_blur_x,
            mask_blur_y=mask_blur if mask_blur_y is None else mask_blur_y,
            invert_mask=invert_mask,
            mask_round=mask_round,
            fill=fill,
            only_masked=only_masked,
            padding=padding,
            overlay=overlay,
            family=_family(sampler),
            admit=self._admit(guidance, encodes=True),
        )
        return self._generate(
            job,
            mode="inpaint",
            prompt=prompt,
            negative_prompt=negative_prompt,
            strength=strength,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            schedule=schedule,
            seed=seed,
            clip_skip=clip_skip,
            noise=noise,
            sample_posterior=sample_posterior,
            output=output,
            progress=progress,
            dry_run=dry_run,
            loras=loras,
            sampler_options=sampler_options,
        )

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float = 7.5,
        sampler: str = "Euler a",
        schedule: str | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        width: int | None = None,
        height: int | None = None,
        clip_skip: int = 1,
        noise: np.ndarray | None = None,
        output: str = "pil",
        progress: Callable[[int, int], None] | None = None,
        dry_run: bool = False,
        loras: dict[str, Any] | None = None,
        **sampler_options,
    ) -> Result:
        """Generate from `prompt` alone (the latents start as pure noise). width/height default to
        the model's default size: 1024 for SDXL models (from their config), 512 otherwise."""
        size = self.info.default_size
        job = prepare.txt2img_job(self.info, width=size if width is None else width,
                                  height=size if height is None else height, batch_size=batch_size,
                                  admit=self._admit(guidance, encodes=self.info.is_inpainting_model))
        return self._generate(
            job,
            mode="txt2img",
            prompt=prompt,
            negative_prompt=negative_prompt,
            strength=1.0,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            schedule=schedule,
            seed=seed,
            clip_skip=clip_skip,
            noise=noise,
            sample_posterior=True,
            output=output,
            progress=progress,
            dry_run=dry_run,
            loras=loras,
            sampler_options=sampler_options,
        )

    def _admit(self, guidance, encodes: bool):
        """The job functions' memory check for this pipeline: graphs already loaded count as resident."""
        cfg = not isinstance(guidance, (int, float, np.number)) or bool(guidance > 1.0)

        def admit(width, height, batch_size, input_pixels=0, encode_size=None):
            resident = sum(self.info.graph_bytes(n) for n, g in self.graphs.items() if g.loaded)
            prepare.check_memory(self.info, width, height, batch_size, cfg=cfg, provider=self.provider,
                                 input_pixels=input_pixels, encode_size=encode_size, resident=resident, encodes=encodes)

        return admit

    # ------------------------------------------------------------------------------- the loop
    def _generate(self, job, *, mode, prompt, negative_prompt, strength, steps, guidance, sampler, schedule, seed,
                  clip_skip, noise, sample_posterior, output, progress, sampler_options, dry_run=False,
                  loras=None) -> Result:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        text, uses = lora.parse_prompt(prompt)
        uses = uses + lora.uses_from_dict(loras)
        if loras:  # the infotext's prompt reproduces the call
            prompt = prompt + lora.as_tags(lora.uses_from_dict(loras))
        matcher = self._embedding_matcher()
        networks: dict[str, list] = {}
        if matcher is not None:  # which embeddings the prompts use (one that cannot be used stops the call here)
            from .text import prompt_chunks

            used: list[str] = []
            lookup, replacement = matcher
            for t in (text, negative_prompt if isinstance(negative_prompt, str) else ""):
                prompt_chunks(t, self.tokenizer, embeddings=(lookup, lambda n: used.append(n) or replacement(n)))
            if used and self.info.is_sdxl:
                raise InputError(f"textual-inversion embeddings are used with SD 1.x and 2.x models; {self.info.path} is "
                                 f"an SDXL model (the prompt names {', '.join(dict.fromkeys(used))})")
            emb = self.embedding_set()
            networks["embeddings"] = [[n, embeddings_short_hash(emb.embeddings[n].path)] for n in dict.fromkeys(used)]
        if not uses and not self._lora_used and matcher is None:
            return self._generate_with(job, mode=mode, prompt=prompt, text=text, negative_prompt=negative_prompt,
                                       strength=strength, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule,
                                       seed=seed, clip_skip=clip_skip, noise=noise, sample_posterior=sample_posterior,
                                       output=output, progress=progress, sampler_options=sampler_options, dry_run=dry_run)
        # One set of LoRA weights is loaded at a time: calls with LoRAs run one after another.
        with self._lora_lock:
            resolved = self._resolve_loras(uses)
            if not dry_run:
                self._apply_loras(resolved)
            return self._generate_with(job, mode=mode, prompt=prompt, text=text, negative_prompt=negative_prompt,
                                       strength=strength, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule,
                                       seed=seed, clip_skip=clip_skip, noise=noise, sample_posterior=sample_posterior,
                                       output=output, progress=progress, sampler_options=sampler_options, dry_run=dry_run,
                                       networks={**networks, "loras": [[u.name, u.te, u.unet, h] for u, _, _, h in resolved]})

    def _generate_with(self, job, *, mode, prompt, text, negative_prompt, strength, steps, guidance, sampler, schedule,
                       seed, clip_skip, noise, sample_posterior, output, progress, sampler_options, dry_run,
                       networks=None) -> Result:
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        # Everything that can be wrong with the request is checked before any model runs.
        _check_options_of_other_modes(mode, sampler_options)
        _check_prompt("prompt", prompt)
        _check_prompt("negative_prompt", negative_prompt)
        _check_number("strength", strength, 0.0, 1.0)
        _check_number("steps", steps, 1, 10000, integer=True)
        _check_number("guidance", guidance, 0.0, 100.0)
        _check_number("clip_skip", clip_skip, 1, 24, integer=True)
        if output not in OUTPUTS:
            raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        family = _family(sampler)
        self._check_clip_skip(clip_skip, family)
        xl_options = sdxl.take_options(sampler_options, self.info.is_sdxl)
        # A1111 clamps img2img strength to 0.999: at 1.0 its img2img path still starts from the image.
        plan_strength = min(strength, 0.999) if family == "a1111" and mode != "txt2img" else strength
        plan = _make_plan(sampler, steps, plan_strength, schedule, self.info.scheduler_config, sampler_options)
        cond_schedule = prompts.prompt_schedule(prompts.composable_prompt(text), plan.prompt_steps)
        uncond_schedule = prompts.prompt_schedule(negative_prompt, plan.prompt_steps)
        b = job.batch_size
        lat_shape = (self.info.latent_channels, job.height // self.info.vae_scale_factor, job.width // self.info.vae_scale_factor)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != (b, *lat_shape):
                raise InputError(f"noise must have shape {(b, *lat_shape)} for this request, got {noise.shape}")
            if not np.isfinite(noise).all() or np.abs(noise).max(initial=0.0) > MAX_NOISE:
                bad = "NaN or infinite values" if not np.isfinite(noise).all() else f"values up to {np.abs(noise).max():.3g}"
                raise InputError(f"noise has {bad}; it must be finite standard normal noise (|x| <= {MAX_NOISE:g})")
        seeds = _seeds(seed, b)
        if dry_run:  # the request is valid: report what it would make, run nothing
            params = self._parameters(mode, job, plan, prompt, negative_prompt, steps, guidance, clip_skip, strength, seeds, sampler,
                                      networks)
            params.update(xl_options)
            return Result([], seeds, params, self._infotexts(params, seeds))
        rand = BatchNoise(seeds)
        encodes = job.pixels is not None or self.info.is_inpainting_model
        self.load_graphs((*self.info.text_encoders, "unet", "vae_decoder") + (("vae_encoder",) if encodes else ()))

        self.info.wait_verified()  # the graphs loaded while the files were hashed: all must match

        t = time.perf_counter()
        if self.info.is_sdxl:
            ids = sdxl.time_ids(self.info.xl, xl_options, job.height, job.width, family=plan.family, mode=mode)
            cond, uncond = self._xl_per_call(cond_schedule, uncond_schedule, negative_prompt, plan.family, clip_skip, ids), None
        elif len(cond_schedule) == len(uncond_schedule) == 1:
            cond, uncond = self.encode_prompt(cond_schedule[0][1], uncond_schedule[0][1], clip_skip)
            _check_encoding(cond, uncond)
        else:  # prompt editing: the embeddings change between model calls
            cond, uncond = self._text_per_call(cond_schedule, uncond_schedule, clip_skip), None
        timings["text_encoder"] = time.perf_counter() - t

        # Start latents.
        t = time.perf_counter()
        init_latents = None
        if job.pixels is not None:
            init_latents = self.encode_images(job.pixels, rand if sample_posterior else None, sample_posterior)
            if init_latents.shape[0] != b:
                init_latents = np.repeat(init_latents, b // init_latents.shape[0], axis=0)
            if job.latent_size is not None:
                from .images import resize_latents

                init_latents = resize_latents(init_latents, *job.latent_size)
                lat_shape = init_latents.shape[1:]
        conditioning = None
        if self.info.is_inpainting_model:
            conditioning = self._inpaint_conditioning(job, rand, sample_posterior, b, lat_shape)
        timings["vae_encode"] = time.perf_counter() - t

        if noise is None:
            noise = rand.randn(lat_shape)
        if init_latents is not None and job.latent_fill is not None:
            init_latents = prepare.apply_latent_fill(init_latents, job.latent_fill, job.fill_keep, noise)
        if mode == "inpaint" and plan.family == "diffusers" and strength == 1.0:
            x = plan.start(None, noise)  # diffusers' inpainting starts from pure noise at full strength
        else:
            x = plan.start(init_latents, noise)

        # The loop.
        denoise = self.make_denoiser(plan, cond, uncond, guidance, conditioning)
        blend = prepare.latent_blender(job, plan, init_latents, noise) if job.latent_keep is not None else None
        denoise_fn = blend.wrap(denoise) if blend is not None else denoise
        n_calls = {"unet": 0}
        total = max(1, len(plan.sigmas) - 1)

        def counted(x_, s_):
            n_calls["unet"] += 1
            return denoise_fn(x_, s_)

        def callback(i, x_, sigma, sigma_next, denoised):
            if progress is not None:
                progress(i + 1, total)
            return blend.after_step(i, x_, sigma, sigma_next, denoised) if blend is not None else None

        t = time.perf_counter()
        if len(plan.sigmas) > 1:
            # Ancestral/SDE noise: each image from its own generator (one Brownian motion each).
            noise_sampler = schedulers.batch_noise_sampler(plan, rand.rngs, x)
            x = schedulers.sample(plan, counted, x, noise_sampler=noise_sampler, callback=callback,
                                  substep_callback=blend.after_substep if blend is not None else None,
                                  model_input=blend.model_input if blend is not None and blend.blends_input else None)
        timings["denoise"] = time.perf_counter() - t
        latents = plan.finish(x)
        if blend is not None:
            latents = blend.finish(latents)

        params = self._parameters(mode, job, plan, prompt, negative_prompt, steps, guidance, clip_skip, strength, seeds, sampler,
                                      networks)
        params.update(xl_options)
        if output == "latent":
            timings["total"] = time.perf_counter() - t_start
            return Result([], seeds, params, self._infotexts(params, seeds), arrays=latents, timings=timings)
        t = time.perf_counter()
        fallbacks: list[int] = []
        pixels = self.decode_latents(latents, fallbacks)
        timings["vae_decode"] = time.perf_counter() - t
        if fallbacks:
            params["vae_fp32_fallback"] = fallbacks  # images decoded again in fp32 (fp16 overflow)
        # diffusers rounds to 8 bits; A1111 and ComfyUI truncate (255 * clamp((x + 1) / 2)).astype(uint8)
        images = prepare.finish_images(job, pixels, rounding="round" if plan.family == "diffusers" else "floor")
        timings["total"] = time.perf_counter() - t_start
        timings["unet_calls"] = n_calls["unet"]
        if output == "np":
            arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
            return Result([], seeds, params, self._infotexts(params, seeds), arrays=arr, timings=timings)
        return Result(images, seeds, params, self._infotexts(params, seeds), timings=timings)


    def _text_per_call(self, cond_schedule, uncond_schedule, clip_skip):
        """call index -> (key, cond, uncond) for prompts with A1111's prompt editing: each text
        encoded once (a schedule's texts padded to its longest, as A1111 batches them), the
        entry chosen per model call as A1111's CFG denoiser does, cond and uncond of a call
        brought to one length as encode_prompt does (text.common_length)."""
        from .text import common_length, encode_schedules

        conds, unconds = encode_schedules(
            [[t for _, t in cond_schedule], [t for _, t in uncond_schedule]], self.tokenizer, self._text_encoder,
            clip_skip=clip_skip, embeddings=self._embedding_matcher())
        pairs: dict = {}

        def at(call: int):
            i = prompts.entry_at_call(cond_schedule, call)
            j = prompts.entry_at_call(uncond_schedule, call)
            if (i, j) not in pairs:
                pairs[i, j] = common_length(conds[i][None], unconds[j][None])
                _check_encoding(*pairs[i, j])
            return ((i, j), *pairs[i, j])

        return at

    def _xl_per_call(self, cond_schedule, uncond_schedule, negative_prompt, family, clip_skip, ids):
        """sdxl.conditioning for this request, cached like SD's embeddings (one encoding per prompt)."""
        key = ("sdxl", tuple(cond_schedule), tuple(uncond_schedule), negative_prompt, family, clip_skip,
               ids[0].tobytes(), ids[1].tobytes())
        return self._embeddings.get(key, lambda: sdxl.conditioning(
            self._xl_encoders(), self.info.xl, cond_schedule, uncond_schedule, negative_prompt, family=family,
            clip_skip=clip_skip, ids=ids))

    def _inpaint_conditioning(self, job, rand, sample_posterior, b, lat_shape) -> np.ndarray:
        """The 5 extra channels of a 9-channel inpainting UNet: mask ++ masked-image latents."""
        masked = job.masked_pixels if job.masked_pixels is not None else np.zeros((1, 3, job.height, job.width), np.float32)
        lat = self.encode_images(masked, rand if sample_posterior else None, sample_posterior)
        if lat.shape[0] != b:
            lat = np.repeat(lat, b // lat.shape[0], axis=0)
        mask = job.conditioning_mask if job.conditioning_mask is not None else np.ones((1, 1, *lat_shape[1:]), np.float32)
        mask = np.broadcast_to(mask, (b, 1, *lat.shape[2:]))
        return np.concatenate([mask, lat], axis=1).astype(np.float32)

    def _parameters(self, mode, job, plan, prompt, negative_prompt, steps, guidance, clip_skip, strength, seeds, sampler,
                    networks=None):
        p = {
            "mode": mode,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "sampler": plan.name,
            "schedule": plan.schedule_label,
            "sampler_family": plan.family,
            "guidance": guidance,
            "seed": seeds[0],
            "width": job.width,
            "height": job.height,
            "batch_size": job.batch_size,
            "clip_skip": clip_skip,
            "model": self.info.model_name,
            "model_hash": self.info.short_hash,
        }
        if self.info.vae:
            p["vae"], p["vae_hash"] = self.info.vae.get("name"), self.info.vae.get("short_hash")
        if mode != "txt2img":
            p["strength"] = strength
        # loras: [name, text encoder weight, UNet weight, short hash]; embeddings: [name, short hash]
        p.update({k: v for k, v in (networks or {}).items() if v})
        p.update(job.parameters)
        return p

    def _infotexts(self, params: dict, seeds: list[int]) -> list[str]:
        from .infotext import format_infotext, sdrt_version

        out = []
        for s in seeds:
            fields = {
                "Steps": params["steps"],
                "Sampler": params["sampler"],
                "Schedule type": params["schedule"],
                "CFG scale": params["guidance"],
                "Seed": s,
                "Size": f"{params['width']}x{params['height']}",
                "Model hash": params["model_hash"] or None,
                "Model": params["model"],
                "VAE hash": params.get("vae_hash"),
                "VAE": params.get("vae"),
                "Denoising strength": params.get("strength"),
                "Clip skip": params["clip_skip"] if params["clip_skip"] > 1 else None,
            }
            fields.update(params.get("infotext_extra", {}))
            # A1111's extra-network keys: the name as the prompt writes it (without ':' and ','), the file's short hash
            for key, items in (("Lora hashes", params.get("loras")), ("TI hashes", params.get("embeddings"))):
                if items:
                    named = dict((x[0].replace(":", "").replace(",", ""), x[-1]) for x in items)
                    fields[key] = ", ".join(f"{n}: {h}" for n, h in named.items())
            fields["Version"] = f"sdrt {sdrt_version()}"  # A1111 writes its own version here
            out.append(format_infotext(params["prompt"], params["negative_prompt"], {k: v for k, v in fields.items() if v is not None}))
        return out


def _check_encoding(cond: np.ndarray, uncond: np.ndarray) -> None:
    for what, e in (("prompt", cond), ("negative_prompt", uncond)):
        if not np.isfinite(e).all():
            raise InputError(f"{what}: its weights make the text encoding overflow (NaN/Inf); use weights from "
                             f"-{MAX_PROMPT_WEIGHT:g} to {MAX_PROMPT_WEIGHT:g} whose tokens do not cancel out")


def _check_prompt(name: str, text) -> None:
    """A prompt the tokenizer can read, with weights the text encoding survives."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} is not valid text: {text[e.start:e.end]!r} at position {e.start} is a lone surrogate "
                         "(from undecodable bytes); pass UTF-8 text") from None
    from .text import BREAK, parse_prompt_attention

    for piece, weight in parse_prompt_attention(text):
        if (piece, weight) == BREAK:
            continue
        if not (math.isfinite(weight) and abs(weight) <= MAX_PROMPT_WEIGHT):
            raise InputError(
                f"{name}: {piece.strip()[:40]!r} has weight {weight:.3g} (from (text:w) and one factor 1.1 per bracket "
                f"level); weights must be from -{MAX_PROMPT_WEIGHT:g} to {MAX_PROMPT_WEIGHT:g}")


_MODE_OPTIONS: dict[str, set[str]] = {}


def _check_options_of_other_modes(mode: str, options: dict) -> None:
    """A keyword of another mode (txt2img(strength=...)) is not a sampler option: say so."""
    if not options:
        return
    if not _MODE_OPTIONS:
        import inspect

        for m in ("img2img", "inpaint", "txt2img"):
            _MODE_OPTIONS[m] = {k for k, p in inspect.signature(getattr(Pipeline, m)).parameters.items()
                                if p.kind is not p.VAR_KEYWORD and k != "self"}
    for key in options:
        others = [m for m, keys in _MODE_OPTIONS.items() if key in keys and m != mode]
        if others and key not in _MODE_OPTIONS[mode]:
            raise InputError(f"{mode} has no option {key!r} (it is an option of {' and '.join(others)})")


_TRAINING_KEYS = ("num_train_timesteps", "trained_betas", "beta_start", "beta_end")


def _check_finite_options(sampler, options: dict, config: dict) -> None:
    for key, value in options.items():
        if key in option_domains.DOMAINS:
            continue  # make_plan checks these against their domains (s_tmax may be inf)
        many = isinstance(value, (list, tuple, np.ndarray))
        values = np.ravel(value).tolist() if isinstance(value, np.ndarray) else list(value) if many else [value]
        for v in values:
            if isinstance(v, (float, np.floating)) and not math.isfinite(v):
                got = f"{v!r} among its {len(values)} values" if many else repr(v)
                raise InputError(f"sampler {sampler!r}: option {key} must be finite, got {got}")
    try:  # options written into a diffusers class name: "DDIMScheduler(num_train_timesteps=0)"
        named = schedulers.names.resolve(sampler)[2]
    except Exception:  # an unknown or malformed name: make_plan says what is wrong with it
        named = {}
    from sdrt.schedulers.training import check_training_schedule

    merged = {**named, **options}
    problem = check_training_schedule({k: merged[k] for k in _TRAINING_KEYS if k in merged},
                                      merged.get("num_train_timesteps", (config or {}).get("num_train_timesteps")))
    if problem:
        raise InputError(f"sampler {sampler!r}: {problem}")
    for key, value in named.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"sampler {sampler!r}: option {key} must be finite, got {value!r}")


def _make_plan(sampler, steps, strength, schedule, config, options: dict):
    """schedulers.make_plan, with every failure as one InputError naming the sampler, and the
    plan checked: finite noise levels, timesteps and scales, a whole-number Brownian seed."""
    _check_finite_options(sampler, options, config)
    try:
        with np.errstate(all="ignore"):  # a non-finite result is caught below, with a clearer message
            plan = schedulers.make_plan(sampler, steps, strength, schedule, config=config, **options)
    except schedulers.UnknownSamplerError as e:
        raise InputError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise InputError(f"sampler {sampler!r}: {e}") from None
    except (ArithmeticError, IndexError, KeyError) as e:
        raise InputError(f"sampler {sampler!r}: its options give no usable noise schedule ({type(e).__name__}: {e}); "
                         "check the options and the model's scheduler config") from None
    sigmas = np.asarray(plan.sigmas, dtype=np.float64)
    try:
        with np.errstate(all="ignore"):
            checks = [float(plan.timestep(s)) for s in sigmas[:-1]]
            one = np.ones(1, np.float32)
            checks += [float(plan.start(None, one)[0]), float(plan.start(one, one)[0]), float(plan.finish(one)[0])]
    except (ArithmeticError, IndexError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"sampler {sampler!r}: its options give no usable noise schedule ({type(e).__name__}: {e})") from None
    if sigmas.ndim != 1 or sigmas.size == 0 or not np.isfinite(sigmas).all() or (sigmas < 0).any() \
            or not all(math.isfinite(c) for c in checks):
        raise InputError(f"sampler {sampler!r}: its options give noise levels or timesteps that are not finite "
                         f"non-negative numbers (sigmas {np.array2string(sigmas, precision=3, threshold=6)}); "
                         "check the options (sigma_min, sigma_max, betas, ...) and the model's scheduler config")
    for key, value in (plan.options or {}).items():
        if key in option_domains.DOMAINS:
            continue  # checked against its domain by make_plan
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and not np.isfinite(value):
            raise InputError(f"sampler {sampler!r}: option {key} must be finite, got {value!r}")
    seed = getattr(plan, "brownian_seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63):
        raise InputError(f"sampler {sampler!r}: noise_sampler_seed must be a whole number from 0 to 2**63 - 1, "
                         f"got {seed!r}")
    return plan


def _text_inputs(x) -> dict[str, np.ndarray]:
    """The UNet's text-side inputs: a dict as given (SDXL), or SD's embeddings array."""
    return x if isinstance(x, dict) else {"encoder_hidden_states": x}


def _family(sampler) -> str | None:
    try:
        return schedulers.family_of(sampler)
    except (schedulers.UnknownSamplerError, TypeError, ValueError):
        return None  # make_plan reports the unknown name with the list of valid ones


def load(path: str | Path | None = None, provider: str = "auto", *, verify: str = "auto", threads: int | None = None,
         io_binding: bool | None = None, cuda_graphs: int | None = None,
         provider_options: dict[str, Any] | None = None, lora_dir: str | Path | None = None,
         embeddings_dir: str | Path | None = None) -> Pipeline:
    """Load a model folder (sdrt export or optimum export). path=None loads the embedded default model.

    verify: "auto" hashes the files listed in sdrt.json that were not verified on this machine
    since they last changed (inode, size, mtime and ctime: any write is noticed), in a background
    thread while the sessions are created; no graph runs before it passed. "full" hashes every
    file, "size" compares sizes only, "none" skips the check. threads: ONNX Runtime's intra-op
    threads, 1 to the logical cores (default: one per physical core).
    io_binding: run the graphs on buffers that stay put between calls (on the device with CUDA);
    default: on for CUDA, off for the CPU. cuda_graphs: how many UNet input shapes (batch, size)
    may hold a captured CUDA graph (default 4 with CUDA and IO binding, 0 otherwise).
    provider_options: ONNX Runtime CUDA provider options over sdrt's (e.g.
    {"cudnn_conv_use_max_workspace": "0"}, which trades convolution speed for GPU memory).
    lora_dir: the folder of the LoRAs named in prompts (<lora:NAME:WEIGHT>) or in loras={...};
    default: SDRT_LORA_DIR, else `Lora` beside the model folder. embeddings_dir: the folder of the
    textual-inversion embeddings prompts name by file name (A1111's .safetensors embeddings);
    default: SDRT_EMBEDDINGS_DIR, else `embeddings` beside the model folder."""
    if path is None:
        from sdrt.models import default_model_path

        path = default_model_path()
    check_threads(threads)  # before anything is read
    # The files are hashed in the background while the sessions are created; every graph waits for
    # the result before its first run.
    return Pipeline(read_model_folder(path, verify=verify, wait=False), provider=provider, threads=threads,
                    io_binding=io_binding, cuda_graphs=cuda_graphs, provider_options=provider_options,
                    lora_dir=lora_dir, embeddings_dir=embeddings_dir)
