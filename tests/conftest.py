"""Shared pytest fixtures for sdrt.

`models` builds the offline test models (tiny SD pipelines with random weights, as diffusers
folders) and exports them with sdrt, once per test session. Set SDRT_TEST_CACHE to a folder to
keep them between runs: entries are keyed by a hash of the export code, so a change to the
exporter rebuilds them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _code_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "export").glob("*.py")) + [ROOT / "runtime" / "modelfolder.py"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


class ModelStore:
    """Builds test model folders on demand and remembers them for the session."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()

    def source(self, kind: str = "tiny-sd1") -> Path:
        """A diffusers folder of `kind` (see sdrt.export.testmodels.KINDS)."""
        from sdrt.export.testmodels import build

        out = self.root / "src" / kind
        with self._lock:
            if not (out / "model_index.json").is_file():
                shutil.rmtree(out, ignore_errors=True)
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                build(tmp, kind)
                os.replace(tmp, out)
        return out

    def exported(self, kind: str = "tiny-sd1", target: str = "cpu", precision: str = "fp32") -> Path:
        """An sdrt model folder exported from `kind`."""
        from sdrt.export import export_model

        src = self.source(kind)
        out = self.root / "onnx" / f"{kind}-{target}-{precision}"
        with self._lock:
            if not (out / "sdrt.json").is_file():
                shutil.rmtree(out, ignore_errors=True)
                export_model(src, out, target=target, precision=precision, log=lambda m: None)
        return out


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> ModelStore:
    cache = os.environ.get("SDRT_TEST_CACHE")
    root = Path(cache) / _code_hash() if cache else tmp_path_factory.mktemp("models")
    root.mkdir(parents=True, exist_ok=True)
    return ModelStore(root)


@pytest.fixture()
def copy_folder(tmp_path):
    """Copy a model folder to a private place a test may damage."""

    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Keep sdrt's verification cache out of the user's home during tests."""
    old = os.environ.get("SDRT_CACHE_DIR")
    os.environ["SDRT_CACHE_DIR"] = str(tmp_path_factory.mktemp("sdrt-cache"))
    yield
    if old is None:
        os.environ.pop("SDRT_CACHE_DIR", None)
    else:
        os.environ["SDRT_CACHE_DIR"] = old


@pytest.fixture()
def offline(monkeypatch):
    """No network in this process: hub libraries told to stay offline, and every socket connection
    refused (a test that reaches for the network fails)."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts[:3]}"
