"""Loading model folders: sdrt exports and folders written by `optimum-cli export onnx`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.modelfolder import ModelFolderError, read_model_folder
from sdrt.runtime.sessions import Graph

ROOT = Path(__file__).resolve().parents[1]


def optimum_cli() -> str:
    """optimum-cli from its own environment (scripts/test creates .venv-optimum)."""
    cli = os.environ.get("SDRT_OPTIMUM_CLI") or str(ROOT / ".venv-optimum" / "bin" / "optimum-cli")
    if not Path(cli).exists():
        pytest.fail(
            f"optimum-cli not found at {cli}: run ./scripts/test (it creates .venv-optimum) or set SDRT_OPTIMUM_CLI"
        )
    return cli


@pytest.fixture(scope="session")
def optimum_folder(models, tmp_path_factory) -> Path:
    """tiny-sd1 exported by optimum-onnx (its own exporter, its own graph layout)."""
    src = models.source("tiny-sd1")
    out = models.root / "optimum" / "tiny-sd1"
    if not (out / "model_index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        r = subprocess.run(
            [optimum_cli(), "export", "onnx", "-m", str(src), "--task", "text-to-image", str(out)],
            capture_output=True,
            text=True,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_optimum_folder_loads(optimum_folder, models):
    assert not (optimum_folder / "sdrt.json").exists()
    info = read_model_folder(optimum_folder)
    ours = read_model_folder(models.exported("tiny-sd1"))
    for field in ("family", "prediction_type", "unet_in_channels", "latent_channels", "vae_scale_factor", "sample_size", "text_hidden_size"):
        assert getattr(info, field) == getattr(ours, field), field
    assert info.vae_scaling_factor == pytest.approx(ours.vae_scaling_factor)
    assert info.manifest is None and info.target == "unknown"
    # Every graph loads and runs through sdrt's session layer, with its own input types
    # (optimum's text encoder takes int64 ids, sdrt's int32).
    ids = np.array([[49406, 320, 1449, 49407] + [49407] * 73])
    a = Graph("text_encoder", info.graph_files["text_encoder"], "cpu").run({"input_ids": ids})[0]
    b = Graph("text_encoder", ours.graph_files["text_encoder"], "cpu").run({"input_ids": ids})[0]
    np.testing.assert_allclose(a, b, atol=1e-4)
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    a = Graph("vae_decoder", info.graph_files["vae_decoder"], "cpu").run({"latent_sample": lat})[0]
    b = Graph("vae_decoder", ours.graph_files["vae_decoder"], "cpu").run({"latent_sample": lat})[0]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        read_model_folder(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFolderError, match="not a folder"):
        read_model_folder(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="not a model folder"):
        read_model_folder(tmp_path / "empty")


def test_damaged_manifest(models, copy_folder):
    folder = copy_folder(models.exported("tiny-sd1"))
    (folder / "sdrt.json").write_text("{ not json")
    with pytest.raises(ModelFolderError, match="sdrt.json is not valid JSON"):
        read_model_folder(folder)
    (folder / "sdrt.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ModelFolderError, match="format version 99"):
        read_model_folder(folder)
    (folder / "sdrt.json").write_text(json.dumps({"format_version": 1, "family": "sd1"}))
    with pytest.raises(ModelFolderError, match="incomplete or malformed"):
        read_model_folder(folder)


def test_missing_graph_in_foreign_folder(optimum_folder, tmp_path):
    folder = tmp_path / "opt"
    shutil.copytree(optimum_folder, folder)
    shutil.rmtree(folder / "vae_encoder")
    with pytest.raises(ModelFolderError, match="vae_encoder/model.onnx"):
        read_model_folder(folder)


def test_base_install_has_no_torch(tmp_path):
    """`pip install .` (base dependencies only) into a fresh venv: sdrt.runtime imports without torch."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    code = (
        "import sys, sdrt.runtime, sdrt.schedulers, sdrt.cli; "
        "from sdrt.runtime import load; "
        "assert 'torch' not in sys.modules; "
        "import importlib.util as u; assert u.find_spec('torch') is None, 'torch was installed'; print('ok')"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    r = subprocess.run([str(venv / "bin" / "sdrt"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "img2img" in r.stdout and "export" in r.stdout, r.stdout + r.stderr

    # The installed default model passes the loader's full hash check.
    code = ("from sdrt.models import default_model_path; from sdrt.runtime.modelfolder import read_model_folder; "
            "print(read_model_folder(default_model_path(), verify='full').name)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    # The README's first command, as written (after its install part), writes the image.
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert "pip install ." in first and "sdrt img2img" in first
    run = first[first.index("sdrt img2img"):]
    out = re.search(r"-o (\S+)", run).group(1)
    shutil.copytree(ROOT / "models" / "examples", tmp_path / "models" / "examples")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", run], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    from sdrt.runtime.infotext import read_infotext

    with Image.open(tmp_path / out) as im:
        assert im.size == Image.open(ROOT / "models" / "examples" / "sketch.png").size
    strength = re.search(r"--strength (\S+)", run).group(1)
    assert re.search(rf"Denoising strength: {re.escape(strength)}(,|$)", read_infotext(tmp_path / out), re.M)


# --------------------------------------------------------------------------- verification


def _flip_keeping_size_and_mtime(p: Path) -> None:
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = p.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_changed_content_is_found_whatever_size_and_mtime_say(models, copy_folder, tmp_path):
    """A bit flipped in the UNet with its size and mtime restored: read_model_folder, `sdrt info` and
    img2img all refuse the folder, naming the file (the check records the ctime, which changes on
    any write and cannot be set back)."""
    from typer.testing import CliRunner

    from sdrt.cli.app import app

    folder = copy_folder(models.exported("tiny-sd1"))
    first = read_model_folder(folder)
    assert sorted(first.verification.hashed) == sorted(first.manifest["files"])  # new to this machine: all hashed
    again = read_model_folder(folder)
    assert again.verification.hashed == []  # unchanged since: none hashed
    _flip_keeping_size_and_mtime(folder / "unet" / "model.onnx")
    with pytest.raises(ModelFolderError, match=r"unet/model\.onnx does not match its sha256"):
        read_model_folder(folder)
    r = CliRunner().invoke(app, ["info", str(folder)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "unet/model.onnx does not match its sha256" in r.stderr
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(img)
    r = CliRunner().invoke(app, ["img2img", str(img), "-p", "x", "-m", str(folder), "--provider", "cpu", "-o",
                                 str(tmp_path / "out")])
    assert r.exit_code == 1 and "unet/model.onnx does not match its sha256" in r.stderr, r.stderr
    assert "no image was written" in r.stderr and not (tmp_path / "out").exists()


def test_load_hashes_in_the_background_and_runs_nothing_before_it_passes(models, copy_folder, monkeypatch):
    """load() returns while the files are hashed; the first graph run waits for the result, and a
    damaged file stops it before any graph runs."""
    import threading

    from sdrt.runtime import load, modelfolder
    from sdrt.runtime import sessions

    folder = copy_folder(models.exported("tiny-sd1"))
    _flip_keeping_size_and_mtime(folder / "vae_decoder" / "model.onnx")
    release = threading.Event()
    real = modelfolder.sha256_file

    def slow_hash(p, *a, **kw):
        release.wait()
        return real(p, *a, **kw)

    monkeypatch.setattr(modelfolder, "sha256_file", slow_hash)
    pipe = load(folder, provider="cpu")  # returns although no file is hashed yet
    assert not pipe.info.verification.done
    pipe.load_graphs()  # the sessions are created meanwhile
    ran = []
    monkeypatch.setattr(sessions, "_typed", lambda v, t: ran.append(1) or v)  # every plain run passes here
    result = {}

    def generate():
        try:
            pipe.txt2img("x", width=32, height=32, steps=1)
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=generate)
    t.start()
    t.join(0.5)
    assert t.is_alive() and ran == []  # waiting for the check, nothing ran
    release.set()
    t.join()
    assert isinstance(result.get("error"), ModelFolderError) and "vae_decoder/model.onnx" in str(result["error"])
    assert ran == []


def test_manifest_values_the_runtime_computes_with_are_checked(models, copy_folder):
    """A manifest that lies about what the graphs are is refused at load with the key, the value and
    what is accepted; a consistent one loads."""
    folder = copy_folder(models.exported("tiny-sd1"))
    m = json.loads((folder / "sdrt.json").read_text())
    for key, value, pattern in (
        ("vae_scaling_factor", float("nan"), r"vae_scaling_factor is nan; accepted: a finite number"),
        ("vae_scaling_factor", 0, r"vae_scaling_factor is 0"),
        ("vae_scale_factor", 0, r"vae_scale_factor is 0; accepted: a whole number from 1 to 64"),
        ("latent_channels", 8, r"unet_in_channels is 4; accepted: 8 .* or 17"),
        ("files", [], r'"files" must map each file'),
        ("files", {"unet/model.onnx": "abc"}, r"entry of unet/model\.onnx must be"),
    ):
        (folder / "sdrt.json").write_text(json.dumps({**m, key: value}))
        with pytest.raises(ModelFolderError, match=pattern):
            read_model_folder(folder)
    (folder / "sdrt.json").write_text(json.dumps(m))
    assert read_model_folder(folder).latent_channels == 4
