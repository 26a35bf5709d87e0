"""Build hook for sdrt's one choice that pyproject.toml cannot express: which ONNX Runtime build.

    pip install .                           # onnxruntime: the CPU build
    SDRT_ONNXRUNTIME=gpu pip install .      # onnxruntime-gpu: the CUDA build, instead of the CPU one

onnxruntime and onnxruntime-gpu install the same `onnxruntime` package: with both installed, the
one installed last wins and removing either breaks the other. So sdrt depends on exactly one.
"""

import os

from setuptools import setup

ONNXRUNTIME = {"cpu": "onnxruntime>=1.18", "gpu": "onnxruntime-gpu>=1.18"}
choice = os.environ.get("SDRT_ONNXRUNTIME", "cpu").strip().lower() or "cpu"
if choice not in ONNXRUNTIME:
    raise SystemExit(f"SDRT_ONNXRUNTIME={choice!r} is not known; accepted: {', '.join(ONNXRUNTIME)}")

setup(install_requires=[ONNXRUNTIME[choice], "numpy>=1.24", "pillow>=10.0", "typer>=0.12", "tokenizers>=0.15"])
