"""Write an SD 1.5-sized single-file checkpoint (random weights, built offline) for export benchmarks.

    python benchmarks/checkpoint_file.py WORK [--dtype fp16|fp32]

Builds the `sd15` test model as a diffusers folder in WORK/sd15 (if absent) and writes it in the
original (CompVis / A1111) layout as WORK/sd15-<dtype>.safetensors, as Civitai files are shipped.
Then, e.g.:

    /usr/bin/time -v sdrt export WORK/sd15-fp16.safetensors WORK/out-file
    /usr/bin/time -v sdrt export WORK/sd15 WORK/out-folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ckpt_layout import write_checkpoint  # noqa: E402
from sdrt.export.testmodels import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    a = ap.parse_args()
    folder = a.work / "sd15"
    if not (folder / "model_index.json").is_file():
        build(folder, "sd15")
    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    print(write_checkpoint(folder, a.work / f"sd15-{a.dtype}.safetensors", open_clip=False, dtype=dtype))


if __name__ == "__main__":
    main()
