"""How much memory an export needs, how much the machine has, and how much the export took.

The export holds at most one model's weights at a time: the PyTorch module while it is traced,
or one ONNX Runtime session of one graph during a check, or during int8 calibration the
folder's fp32 graphs (all of them, as the pipeline runs them). Fusions, fp16 conversion and
quantization keep the weights on disk. The estimate follows that, from the models' fp32 weight
bytes; tests/test_export_memory.py checks it against measured peaks.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

GIB = 2**30
# Python with PyTorch, diffusers, transformers and ONNX Runtime imported, their arenas, and the
# graph protos and example activations of the export; with ONNX Runtime alone (int8 from an fp32
# sdrt folder) about half.
BASE_BYTES = int(1.0 * GIB)
BASE_BYTES_NO_TORCH = int(0.5 * GIB)
# Peak above the base per byte of the largest model's fp32 weights (trace, check sessions):
# measured 1.0-1.3x on SD 1.5 and 1.5x on SDXL (docs/benchmarks.md, "Export").
PER_LARGEST = 1.6
# int8 calibration: per byte of all the fp32 graphs (all loaded at once), activations included.
PER_TOTAL_CALIBRATION = 1.25
# Refuse to start when the available memory is below this fraction of the estimate.
REFUSE_BELOW = 0.8


def estimate_peak_bytes(weights: dict[str, int], precision: str, with_torch: bool = True) -> int:
    """Peak resident memory an export of models with these fp32 weight bytes needs, with margin.

    with_torch: the export traces PyTorch modules (from a diffusers folder or a checkpoint);
    False for int8 from an fp32 sdrt folder, which runs ONNX Runtime alone."""
    base = BASE_BYTES if with_torch else BASE_BYTES_NO_TORCH
    need = base
    if with_torch:
        need += PER_LARGEST * max(weights.values(), default=0)
    if precision == "int8":
        need = max(need, base + PER_TOTAL_CALIBRATION * sum(weights.values()))
    return int(need)


def available_bytes() -> int | None:
    """Memory available to this process: MemAvailable, capped by a cgroup limit; None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            room = max(0, int(limit) - usage)
            avail = room if avail is None else min(avail, room)
        break
    return avail


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def onnx_folder_weight_bytes(folder: Path) -> dict[str, int]:
    """Bytes of each graph's files in a model folder (the weights, for an fp32 folder)."""
    out = {}
    for graph in sorted(p.parent for p in Path(folder).glob("*/model.onnx")):
        out[graph.name] = sum(p.stat().st_size for p in graph.iterdir() if p.name.startswith("model.onnx"))
    return out


def shortfall(weights: dict[str, int], precision: str, with_torch: bool = True) -> tuple[int, int | None, bool]:
    """(estimated need, available or None, whether the machine clearly lacks the memory)."""
    need = estimate_peak_bytes(weights, precision, with_torch)
    avail = available_bytes()
    return need, avail, avail is not None and avail < REFUSE_BELOW * need
