"""Interrupted and failed writes: SIGTERM and Ctrl-C while a PNG is being written, SIGKILL, a full
disk. The command says which images were written, exits 143 / 130 / 1, and leaves no temporary
file, no partial PNG under a final name and no empty folder; the next run into a folder removes
the temporary files a killed run left there, and nothing else."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdrt.cli.app import app
from sdrt.runtime.infotext import STALE_TEMP_SECONDS, remove_stale_temp_files

# Runs the CLI with os.fsync held at its N-th call (SDRT_TEST_HOLD_AT) until a line arrives on
# stdin: the moment a PNG's temporary file is written but not yet renamed into place. Ctrl-C acts as
# in a terminal even when the tests themselves run in the background (`cmd &` starts with SIGINT
# ignored, and children inherit that).
HOLD = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
real_fsync = os.fsync
calls = [0]
def fsync(fd):
    calls[0] += 1
    if calls[0] == int(os.environ["SDRT_TEST_HOLD_AT"]):
        print("HELD", flush=True)
        sys.stdin.readline()
    real_fsync(fd)
os.fsync = fsync
from sdrt.cli.app import app
app(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def sd1(models) -> Path:
    return models.exported("tiny-sd1")


def _image(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _held_run(args, hold_at: int):
    env = {**os.environ, "SDRT_TEST_HOLD_AT": str(hold_at)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("HELD"):
            return proc, lines
    proc.wait()
    raise AssertionError(f"the run ended before writing: {proc.stderr.read()}")


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.exists() else []


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_the_first_write_leaves_nothing(sd1, tmp_path, sig, code, word):
    a = _image(tmp_path / "a.png")
    out = tmp_path / "deep" / "out"
    proc, _ = _held_run(["img2img", a, "-p", "x", "-m", sd1, "--steps", 2, "--seed", 3, "--provider", "cpu", "-o", out], 1)
    assert len(_temp_files(out)) == 1  # the PNG is in its temporary file, not yet under its name
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err == f"sdrt: error: {word}; no image was written\n"
    assert not (tmp_path / "deep").exists()  # the folders this run created are gone again


def test_sigterm_in_a_batch_says_which_images_were_written(sd1, tmp_path):
    a = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    # fsync calls: image 1's file, the folder, image 2's file <- held there
    proc, lines = _held_run(["img2img", a, "-p", "x", "-m", sd1, "--steps", 2, "--seed", 3, "-b", 3, "--provider", "cpu",
                             "-o", out], 3)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert err == f"sdrt: error: terminated (SIGTERM); 1 of 3 images were written ({out / 'a-3.png'}); the others were not\n"
    assert "".join(lines[:-1]) + stdout == f"{out / 'a-3.png'}\n"
    assert sorted(p.name for p in out.iterdir()) == ["a-3.png"]
    with Image.open(out / "a-3.png") as im:
        im.load()  # whole


def test_sigkill_leftovers_are_removed_by_the_next_run(sd1, tmp_path):
    a = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".keep.png.tmp").write_text("not a name sdrt writes")
    proc, _ = _held_run(["img2img", a, "-p", "x", "-m", sd1, "--steps", 2, "--seed", 3, "--provider", "cpu", "-o", out], 1)
    proc.kill()
    proc.wait()
    left = _temp_files(out)
    assert len(left) == 2 and left[1] == ".keep.png.tmp" and left[0].startswith(f".a-3.png.{proc.pid}-"), left
    assert not (out / "a-3.png").exists()
    r = CliRunner().invoke(app, ["img2img", str(a), "-p", "x", "-m", str(sd1), "--steps", "2", "--seed", "4",
                                 "--provider", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".keep.png.tmp", "a-4.png", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_stale_temp_files_are_only_ours(tmp_path):
    """remove_stale_temp_files: save_png's names whose writer is gone, or older than a write takes."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live_pid = os.getppid()
    names = {
        f".a.png.{dead_pid}-0123456789ab.tmp": True,  # its process has ended
        f".a.png.{live_pid}-0123456789ab.tmp": False,  # another process is writing it
        ".b.png.0123456789ab.tmp": False,  # an earlier version's name, recent
        ".c.png.tmp": False, "d.png.0123456789ab.tmp": False, ".e.jpg.0123456789ab.tmp": False,
        f".f.png.{dead_pid}-0123456789.tmp": False, "g.png": False,
    }
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / f".dir.png.{dead_pid}-0123456789ab.tmp").mkdir()
    old = tmp_path / ".old.png.0123456789ab.tmp"
    old.write_text("x")
    t = time.time() - STALE_TEMP_SECONDS - 5
    os.utime(old, (t, t))
    removed = {p.name for p in remove_stale_temp_files(tmp_path)}
    assert removed == {n for n, gone in names.items() if gone} | {old.name}
    assert {p.name for p in tmp_path.iterdir()} == ({n for n, gone in names.items() if not gone}
                                                   | {f".dir.png.{dead_pid}-0123456789ab.tmp"})


def test_a_full_disk_names_the_file_and_what_was_written(sd1, tmp_path, monkeypatch):
    """The 2nd of 4 images meets a full disk: exit 1, the file and the cause named, the written one
    listed and kept, no temporary file."""
    a = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    real = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            fp.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    r = CliRunner().invoke(app, ["img2img", str(a), "-p", "x", "-m", str(sd1), "--steps", "2", "--seed", "3", "-b", "4",
                                 "--provider", "cpu", "-o", str(out)])
    assert r.exit_code == 1
    assert r.stderr == (f"sdrt: error: cannot write {out / 'a-4.png'}: No space left on device; 1 of 4 images were "
                        f"written ({out / 'a-3.png'}); the others were not\n")
    assert sorted(p.name for p in out.iterdir()) == ["a-3.png"]


def test_a_failure_before_the_first_image_removes_the_folder_it_created(sd1, tmp_path, monkeypatch):
    from sdrt.runtime import pipeline

    a = _image(tmp_path / "a.png")

    def broken(self, *args, **kwargs):
        raise RuntimeError("the unet graph failed on inputs [...]: simulated")

    monkeypatch.setattr(pipeline.Pipeline, "decode_latents", broken)
    r = CliRunner().invoke(app, ["img2img", str(a), "-p", "x", "-m", str(sd1), "--steps", "2", "--provider", "cpu",
                                 "-o", str(tmp_path / "new" / "folder")])
    assert r.exit_code == 1 and r.stderr.endswith("simulated; no image was written\n"), r.stderr
    assert not (tmp_path / "new").exists()
