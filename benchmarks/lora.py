"""LoRA load and switch times and memory on a model folder (an SD 1.5-sized one to be meaningful).

    python benchmarks/lora.py MODEL_FOLDER [--rank 32] [--size 512]

Writes two random kohya LoRAs of the usual SD 1.5 kind (attention, feed-forward and projection
layers of the UNet, q/k/v/out/fc of the text encoder; rank 32, about 150 MB each in fp32) into a
temporary folder, then prints, beside the model's own load time:
- the sessions' load without a LoRA;
- applying LoRA A (read + merge + new text encoder and UNet sessions), B, none, and A again
  (A's merged weights cached);
- the process's resident memory after each step and its peak;
- one UNet call (batch 2, SIZE px) without and with a LoRA: with replaced convolution weights
  ONNX Runtime's NCHWc convolution transform is off (see runtime/sessions.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
          "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_lora(model: Path, path: Path, rank: int, seed: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    out = {}
    for graph, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        lmap = json.loads((model / graph / "lora_map.json").read_text())
        for name, e in lmap["modules"].items():
            if not name.endswith(LAYERS):
                continue
            shape = e["shape"]
            stem = prefix + name.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) * 0.01).astype(np.float32)
            out[f"{stem}.lora_up.weight"] = (rng.standard_normal((shape[0], rank) + ((1, 1) if len(shape) == 4 else ()))
                                             * 0.01).astype(np.float32)
            out[f"{stem}.alpha"] = np.array(rank / 2, np.float32)
    save_file(out, str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    from sdrt.runtime import load, lora

    folder = Path(tempfile.mkdtemp(prefix="sdrt-lora-bench-"))
    for name, seed in (("A", 1), ("B", 2)):
        write_lora(a.model, folder / f"{name}.safetensors", a.rank, seed)
    mb = sum(p.stat().st_size for p in folder.iterdir()) / 2 / 2**20
    print(f"model {a.model}; LoRAs rank {a.rank}, {mb:.0f} MB each; start rss {rss_gib():.2f} GiB")

    def step(what: str, fn) -> None:
        t = time.perf_counter()
        fn()
        print(f"{what:<42} {time.perf_counter() - t:7.2f} s   rss {rss_gib():5.2f} GiB   peak {peak_gib():5.2f} GiB")

    pipe = load(a.model, provider="cpu", lora_dir=folder)
    step("load text encoder + UNet, no LoRA", lambda: pipe.load_graphs(("text_encoder", "unet")))

    lat = a.size // 8
    x = np.random.default_rng(0).standard_normal((2, 4, lat, lat)).astype(np.float32)
    emb = np.random.default_rng(1).standard_normal((2, 77, pipe.info.text_hidden_size)).astype(np.float32)
    step(f"one UNet call {a.size}px batch 2, no LoRA", lambda: pipe._unet(x, 500.0, emb))
    step(f"one UNet call {a.size}px batch 2, no LoRA (again)", lambda: pipe._unet(x, 500.0, emb))

    def use(names: list[str]):
        def go():
            pipe._apply_loras(pipe._resolve_loras([lora.LoraUse(n, 1.0, 1.0) for n in names]))
            pipe.load_graphs(("text_encoder", "unet"))
        return go

    step("apply A (read, merge, new sessions)", use(["A"]))
    step(f"one UNet call {a.size}px batch 2, LoRA A", lambda: pipe._unet(x, 500.0, emb))
    step(f"one UNet call {a.size}px batch 2, LoRA A (again)", lambda: pipe._unet(x, 500.0, emb))
    step("switch A -> B", use(["B"]))
    step("switch B -> none", use([]))
    step("switch none -> A (merged weights cached)", use(["A"]))
    step("switch A -> A + B", use(["A", "B"]))


if __name__ == "__main__":
    main()
