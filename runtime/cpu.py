"""What this CPU offers ONNX Runtime's int8 kernels, and how an int8 model folder runs on it.

ONNX Runtime multiplies uint8 activations by int8 weights. On x86-64 CPUs with VNNI (AVX512-VNNI
or AVX-VNNI) or AMX, and on ARM64, the products accumulate in 32 bits. On other x86-64 CPUs (AVX2,
and AVX-512 without VNNI) its kernels use vpmaddubsw, which adds two neighbouring products
a1*w1 + a2*w2 into a signed 16-bit value and saturates it there: with a up to 255 that is exact
only when two weights of one sign add up to at most 32767 / 255 in magnitude, which every pair
does when |w| <= 64 (255 * 2 * 64 = 32640). sdrt's int8 export writes weights in [-64, 64] and
records the largest in sdrt.json ("int8_weight_max"); folders from before that have full-range
weights (127). On a CPU whose kernels would saturate on them, sdrt's sessions have ONNX Runtime
convert such weights to uint8 (session.x64quantprecision) and run its exact uint8 x uint8
kernels, which are slower; other runtimes given the same graph may saturate. (ONNX Runtime would
apply that option on any x86-64 CPU with AVX2, VNNI included, so sdrt sets it only where needed.)

Flags come from /proc/cpuinfo on Linux and from NumPy's own CPU detection elsewhere. No torch.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# The largest |w| for which no pair of uint8 x int8 products can leave int16: 2 * 255 * w <= 32767.
EXACT_WEIGHT_MAX = 32767 // (2 * 255)  # 64
# The weight range of sdrt int8 folders written before sdrt.json recorded it.
LEGACY_INT8_WEIGHT_MAX = 127

# Flags that matter here, as /proc/cpuinfo names them (x86 "flags", ARM "Features"), and how sdrt shows them.
SHOWN = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "amx_int8": "AMX-INT8",
    "avx512_bf16": "AVX512-BF16",  # bf16 arithmetic (what other runtimes, e.g. OpenVINO, compute in by default here)
    "amx_bf16": "AMX-BF16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
}
# NumPy's names for the same features (numpy's runtime dispatch table), for platforms without /proc/cpuinfo.
_NUMPY_NAMES = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni", "ASIMDDP": "asimddp"}


@dataclass(frozen=True)
class CpuFeatures:
    arch: str  # "x86_64", "arm64", or what platform.machine() says
    flags: frozenset[str]  # the SHOWN flags this CPU has
    source: str  # where they were read: "/proc/cpuinfo", "numpy", or "unknown"

    @property
    def known(self) -> bool:
        return self.source != "unknown"

    def describe(self) -> str:
        shown = [SHOWN[f] for f in SHOWN if f in self.flags]
        if not self.known:
            return f"{self.arch} (instruction sets unknown)"
        return f"{self.arch}: " + (", ".join(shown) if shown else "none of " + ", ".join(_relevant(self.arch)))

    def int8_products_saturate(self) -> bool | None:
        """Whether ONNX Runtime's uint8 x int8 products go through saturating 16-bit pair sums here
        (x86-64 without VNNI or AMX); None when it cannot be told."""
        if self.arch == "arm64":
            return False
        if self.arch != "x86_64" or not self.known:
            return None
        return not self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _relevant(arch: str) -> list[str]:
    keys = ("asimddp", "i8mm") if arch == "arm64" else ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return [SHOWN[k] for k in keys]


def _arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8", "armv8l"):
        return "arm64"
    return m or "unknown"


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """The features /proc/cpuinfo's text lists (its first "flags" or "Features" line)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            break
    return CpuFeatures(_arch(machine), frozenset(flags & SHOWN.keys()), "/proc/cpuinfo")


def _from_numpy(machine: str) -> CpuFeatures | None:
    try:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as table
        except ImportError:  # NumPy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as table
    except ImportError:
        return None
    flags = {ours for theirs, ours in _NUMPY_NAMES.items() if table.get(theirs)}
    return CpuFeatures(_arch(machine), frozenset(flags), "numpy")


def cpu_features() -> CpuFeatures:
    """This machine's CPU features (see SHOWN), read once per process."""
    return _read_features()


@functools.lru_cache(maxsize=1)
def _read_features() -> CpuFeatures:
    machine = platform.machine()
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"), machine)
    except OSError:
        pass
    return _from_numpy(machine) or CpuFeatures(_arch(machine), frozenset(), "unknown")


def int8_weight_max(manifest: dict | None) -> int | None:
    """The largest int8 weight of an sdrt int8 folder's UNet: recorded in its manifest, or 127 for
    folders written before it was; None for folders without int8 graphs."""
    if not manifest or "int8" not in manifest.get("precision", {}).values():
        return None
    return int(manifest.get("int8_weight_max", LEGACY_INT8_WEIGHT_MAX))


def int8_status(weight_max: int, cpu: CpuFeatures) -> tuple[bool | None, str]:
    """How sdrt runs int8 graphs with weights in [-weight_max, weight_max] on `cpu`: always exactly;
    at full speed (True), through ONNX Runtime's slower uint8 x uint8 kernels because the uint8 x
    int8 ones would saturate (False), or unknown when the CPU's features cannot be read (None);
    and a sentence saying so."""
    if weight_max <= EXACT_WEIGHT_MAX:
        return True, (f"exact on every CPU (int8 weights within +-{weight_max}: no pair of uint8 x int8 products "
                      "can leave 16 bits)")
    advice = ("export it again (`sdrt export SRC OUT --precision int8`, from the diffusers or fp32 cpu folder: "
              "weights within +-64, exact at full speed on every CPU)")
    saturates = cpu.int8_products_saturate()
    if saturates is False:
        reason = "ARM64 accumulates int8 products in 32 bits" if cpu.arch == "arm64" else "VNNI/AMX accumulate in 32 bits"
        return True, (f"exact ({reason}); on x86-64 CPUs without VNNI its int8 weights within +-{weight_max} run "
                      f"slower, as uint8 x uint8, to keep from saturating: {advice}")
    if saturates is None:
        return None, (f"exact; this CPU's features could not be read: on x86-64 CPUs without VNNI its int8 weights "
                      f"within +-{weight_max} run slower, as uint8 x uint8, to keep from saturating: {advice}")
    return False, (f"exact but slower: this CPU has no VNNI, its uint8 x int8 kernels may saturate on int8 weights "
                   f"within +-{weight_max}, so ONNX Runtime runs them as uint8 x uint8 (other runtimes may give wrong "
                   f"values); {advice}")
