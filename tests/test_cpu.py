"""sdrt.runtime.cpu: the CPU features that decide whether ONNX Runtime's int8 products are exact.

References: the /proc/cpuinfo lines below are trimmed from real machines (flag names as Linux
writes them); which CPUs saturate comes from ONNX Runtime's documentation of its U8S8 kernels
("x64 SSE4.1/AVX2/AVX512 (with no VNNI) has overflow problem with quantized matrix multiplication
with U8S8", session option session.x64quantprecision); this machine's own features are checked
against NumPy's independent CPU detection."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from sdrt.runtime.cpu import CpuFeatures, cpu_features, int8_status, int8_weight_max, parse_cpuinfo

EPYC_7763 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7763 64-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves vaes vpclmulqdq rdpid fsrm
bugs		: sysret_ss_attrs spectre_v1 spectre_v2
"""
SKYLAKE_SP = """model name	: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
ICE_LAKE = """model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512vbmi avx512_vbmi2 gfni vaes avx512_vnni avx512_bitalg avx512_vpopcntdq
"""
ALDER_LAKE = """model name	: 12th Gen Intel(R) Core(TM) i7-12700
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni gfni vaes vpclmulqdq avx_vnni movdiri
"""
SAPPHIRE_RAPIDS = """model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse sse2 fma avx f16c avx2 avx512f avx512bw avx512vl avx512_vnni avx_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""
GRAVITON_3 = """processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer	: 0x41
"""
CORTEX_A72 = """processor	: 0
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
"""


@pytest.mark.parametrize("text,machine,shown,saturates", [
    (EPYC_7763, "x86_64", "x86_64: AVX2", True),
    (SKYLAKE_SP, "x86_64", "x86_64: AVX2, AVX-512", True),
    (ICE_LAKE, "x86_64", "x86_64: AVX2, AVX-512, AVX512-VNNI", False),
    (ALDER_LAKE, "x86_64", "x86_64: AVX2, AVX-VNNI", False),
    (SAPPHIRE_RAPIDS, "x86_64", "x86_64: AVX2, AVX-512, AVX512-VNNI, AVX-VNNI, AMX-INT8, AVX512-BF16, AMX-BF16", False),
    (GRAVITON_3, "aarch64", "arm64: dotprod, i8mm", False),
    (CORTEX_A72, "aarch64", "arm64: none of dotprod, i8mm", False),
])
def test_cpuinfo_features_and_int16_saturation(text, machine, shown, saturates):
    cpu = parse_cpuinfo(text, machine)
    assert cpu.describe() == shown
    assert cpu.int8_products_saturate() is saturates


def test_how_int8_folders_run():
    """Weights within +-64 run at full speed on any CPU, even one whose features are unknown;
    full-range weights only where products accumulate in 32 bits, and the answer says what to do
    elsewhere."""
    epyc, ice, arm = (parse_cpuinfo(t, m) for t, m in ((EPYC_7763, "x86_64"), (ICE_LAKE, "x86_64"), (GRAVITON_3, "aarch64")))
    unknown = CpuFeatures("x86_64", frozenset(), "unknown")
    for cpu in (epyc, ice, arm, unknown):
        full_speed, why = int8_status(64, cpu)
        assert full_speed is True and why.startswith("exact on every CPU")
    full_speed, why = int8_status(127, epyc)
    assert full_speed is False and "no VNNI" in why and "may saturate" in why and "sdrt export" in why
    assert int8_status(127, ice)[0] is True and int8_status(127, arm)[0] is True
    assert int8_status(127, unknown)[0] is None
    # 65 is the first magnitude whose pair can leave int16: 2 * 255 * 65 = 33150 > 32767.
    assert int8_status(65, epyc)[0] is False


def test_cpu_sessions_ask_for_exact_int8_products_where_needed(monkeypatch):
    """sdrt's CPU sessions set ONNX Runtime's option that swaps the uint8 x int8 kernels for exact
    uint8 x uint8 ones where weights beyond +-64 would saturate them: on x86-64 without VNNI, and
    where the CPU's features are unknown; not with VNNI (the option would slow full-range weights
    down there too) nor on ARM64."""
    from sdrt.runtime import cpu
    from sdrt.runtime.sessions import session_options

    def option_with(text, machine, source="/proc/cpuinfo"):
        features = parse_cpuinfo(text, machine) if source != "unknown" else CpuFeatures(machine, frozenset(), "unknown")
        monkeypatch.setattr(cpu, "cpu_features", lambda: features)
        return session_options("cpu").get_session_config_entry("session.x64quantprecision")

    assert option_with(EPYC_7763, "x86_64") == "1"
    assert option_with(SKYLAKE_SP, "x86_64") == "1"
    assert option_with("", "x86_64", source="unknown") == "1"
    with pytest.raises(RuntimeError):  # not set: ONNX Runtime raises on a missing entry
        option_with(ICE_LAKE, "x86_64")
    with pytest.raises(RuntimeError):
        option_with(GRAVITON_3, "aarch64")


def test_weight_range_of_a_folder():
    fp32 = {"precision": {"unet": "fp32", "text_encoder": "fp32"}}
    old = {"precision": {"unet": "int8", "text_encoder": "fp32"}}  # written before the range was recorded
    assert int8_weight_max(fp32) is None and int8_weight_max(None) is None
    assert int8_weight_max(old) == 127
    assert int8_weight_max({**old, "int8_weight_max": 64}) == 64


def test_this_machine_agrees_with_numpy():
    """/proc/cpuinfo (or the fallback) says what NumPy's own runtime detection says."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as table
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__ as table
    cpu = cpu_features()
    assert cpu.known
    if cpu.arch == "x86_64":
        assert ("avx2" in cpu.flags) == table["AVX2"]
        assert ("avx512f" in cpu.flags) == table["AVX512F"]
        assert ("avx512_vnni" in cpu.flags) == table["AVX512VNNI"]
    elif cpu.arch == "arm64":
        assert ("asimddp" in cpu.flags) == table["ASIMDDP"]
    assert cpu.arch in ("x86_64", "arm64", platform.machine().lower())


def test_cpu_module_imports_no_torch():
    code = ("import sys, sdrt.runtime.cpu; sdrt.runtime.cpu.cpu_features(); "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)
