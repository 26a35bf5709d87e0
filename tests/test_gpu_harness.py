"""The GPU benchmark's harness, rehearsed on the CPU (`benchmarks/gpu.py --provider cpu --tiny`),
so it cannot rot between the rare sessions on a GPU machine; and the packaging choice that gives
a GPU install exactly one ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_rehearsal_on_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--provider", "cpu", "--tiny", "--repeats", "1",
           "--work", str(tmp_path / "work"), "--out", str(out), "--budget", "1500"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "s] device: CPU" in p.stdout  # progress lines carry the elapsed time
    (results,) = out.glob("gpu-*.json")
    res = json.loads(results.read_text())
    got = {(r["system"], r["workload"]): r for r in res["records"]}
    systems = ("sdrt+cudagraphs", "sdrt+iobinding", "sdrt", "diffusers")
    workloads = ("txt2img-b1", "img2img-b1", "img2img-b4", "inpaint-b1", "inpaint-b4")
    for s in systems:
        for w in workloads:
            r = got[(s, w)]
            assert "error" not in r, r
            assert r["seconds"] > 0 and r["it_per_s"] > 0 and r["cold_start_seconds"] > 0
            assert abs(sum(r["stages"].values()) - r["seconds"]) < 0.05 * r["seconds"] + 0.01
            steps = {"txt2img": 4, "img2img": 3, "inpaint": 3}[w.split("-")[0]]  # strength 0.75 of 4 steps
            assert r["unet_calls"] == steps, (s, w, r["unet_calls"])
            if w != "txt2img-b1":
                assert r["stages"]["vae_encode"] > 0
    notes = "\n".join(res["notes"])
    for s in ("diffusers+compile", "diffusers+compile-max-autotune"):
        assert f"{s}: skipped (needs CUDA)" in notes
    # The same initial noise gives the same image in every sdrt mode, and diffusers' image up to
    # rounding: the harness compares like with like.
    pe = res["pixel_error"]
    assert pe["sdrt+iobinding vs sdrt"]["max"] == 0 and pe["sdrt+cudagraphs vs sdrt"]["max"] == 0
    assert pe["sdrt vs diffusers"]["max"] <= 2
    section = (out / "gpu-section.md").read_text()
    assert section.startswith("<!-- gpu-benchmark:start -->") and "| sdrt+cudagraphs | **" in section


def test_gpu_benchmark_sdxl_rehearsal_on_cpu(tmp_path):
    """The SDXL workloads (1024x1024, 30 steps, batch 1 on a GPU) run end to end on the tiny SDXL
    model: sdrt and diffusers' SDXL pipelines, same noise, their own section of the docs."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--model", "sdxl", "--provider", "cpu", "--tiny",
           "--repeats", "1", "--systems", "sdrt+cudagraphs,diffusers", "--work", str(tmp_path / "work"), "--out", str(out),
           "--budget", "1500"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (results,) = out.glob("gpu-sdxl-*.json")
    res = json.loads(results.read_text())
    got = {(r["system"], r["workload"]): r for r in res["records"]}
    for s in ("sdrt+cudagraphs", "diffusers"):
        for w in ("xl-txt2img-b1", "xl-img2img-b1", "xl-inpaint-b1"):
            r = got[(s, w)]
            assert "error" not in r, r
            assert r["unet_calls"] == (4 if w == "xl-txt2img-b1" else 3), (s, w, r["unet_calls"])
            assert r["stages"]["text_encoder"] > 0 and abs(sum(r["stages"].values()) - r["seconds"]) < 0.05 * r["seconds"] + 0.01
    assert res["pixel_error"]["sdrt+cudagraphs vs diffusers"]["max"] <= 2
    section = (out / "gpu-section-sdxl.md").read_text()
    assert section.startswith("<!-- gpu-benchmark-sdxl:start -->") and "SDXL 1.0 architecture" in section
    assert "xl-" not in section and "txt2img 32x32, 4 steps, batch 1" in section


@pytest.mark.parametrize("choice, want, not_want", [("", "onnxruntime>=", "onnxruntime-gpu"),
                                                   ("cpu", "onnxruntime>=", "onnxruntime-gpu"),
                                                   ("gpu", "onnxruntime-gpu>=", "onnxruntime>=")])
def test_one_onnxruntime_per_install(tmp_path, monkeypatch, choice, want, not_want):
    """`pip install .` depends on onnxruntime; SDRT_ONNXRUNTIME=gpu on onnxruntime-gpu instead,
    never both (they write the same package and the last one installed wins)."""
    import setuptools.build_meta as backend

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SDRT_ONNXRUNTIME", choice)
    dist_info = backend.prepare_metadata_for_build_wheel(str(tmp_path))
    requires = [ln.split(":", 1)[1].strip() for ln in (tmp_path / dist_info / "METADATA").read_text().splitlines()
                if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert any(r.startswith(want) for r in requires), requires
    assert not any(r.startswith(not_want) for r in requires), requires


def test_unknown_onnxruntime_choice_is_refused(tmp_path):
    p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={"SDRT_ONNXRUNTIME": "rocm", "PATH": "/usr/bin:/bin"})
    assert p.returncode != 0 and "SDRT_ONNXRUNTIME='rocm' is not known; accepted: cpu, gpu" in p.stderr
