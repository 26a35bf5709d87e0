"""sdrt serve: AUTOMATIC1111's HTTP API, driven by webuiapi (the real A1111 client), checked
against sdrt's own Python API and CLI for the same parameters and seed; bad requests from a table;
production behaviour (auth, queue, micro-batching, interrupt, timeout, drain, metrics, SIGTERM);
Ray Serve replicas.

Servers run on 127.0.0.1 on the embedded default model (64x64). No timing is asserted here
(benchmarks/load.py measures); waits poll state with bounded loops."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
webuiapi = pytest.importorskip("webuiapi", reason="webuiapi (the A1111 client the tests drive) is not installed")
import requests  # noqa: E402  (webuiapi's own dependency)
from PIL import Image  # noqa: E402

from sdrt.runtime import load  # noqa: E402
from sdrt.serve import ServeConfig, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "models" / "examples"
PROMPT = "a red circle on a white background"
SDRT = [sys.executable, "-c", "from sdrt.cli import main; main()"]


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, tries: int = 600, log=None) -> None:
    for _ in range(tries):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:] if log else ''}")
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or (Ray's proxy) no replica yet
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready")


class Live:
    def __init__(self, url, state=None, proc=None, log=None):
        self.url, self.state, self.proc, self.log = url, state, proc, log

    def api(self, **kw):
        return webuiapi.WebUIApi(baseurl=f"{self.url}/sdapi/v1", **kw)


@contextlib.contextmanager
def in_thread(**settings):
    """The app under uvicorn in a thread of the test process (its state reachable by the test)."""
    import uvicorn

    settings.setdefault("max_queue", 16)
    app = create_app(ServeConfig(**settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        yield Live(url, app.state.sdrt)
    finally:
        server.should_exit = True
        t.join(timeout=60)


@contextlib.contextmanager
def subprocess_server(*args, env=None, tmp=None):
    import tempfile

    port = free_port()
    log = Path(tempfile.mkstemp(prefix="sdrt-serve-", suffix=".log")[1])
    with open(log, "wb") as err:
        proc = subprocess.Popen([*SDRT, "serve", "--port", str(port), *args], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log=log)
        yield Live(url, proc=proc, log=log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.unlink(missing_ok=True)


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s)))


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


class _Gate:
    def __init__(self, engine):
        self.engine = engine

    def set(self):
        self.engine.hold(False)


@contextlib.contextmanager
def paused(engine):
    """Hold the dispatcher, so the queue can be filled first; gate.set() lets it go."""
    engine.hold(True)
    try:
        yield _Gate(engine)
    finally:
        engine.hold(False)


def wait_for(cond, tries=2000, step=0.01):
    for _ in range(tries):
        if cond():
            return True
        time.sleep(step)
    return False


@pytest.fixture(scope="module")
def pipe():
    return load(provider="cpu")


@pytest.fixture(scope="module")
def server():
    """`sdrt serve` as users start it, on the embedded model."""
    with subprocess_server() as live:
        yield live


# ------------------------------------------------------------------- the real client: webuiapi
def test_webuiapi_txt2img_equals_python_api(server, pipe):
    api = server.api()
    r = api.txt2img(prompt=PROMPT, negative_prompt="blue", width=64, height=64, steps=12, cfg_scale=6.5, seed=11,
                    batch_size=2, n_iter=2, sampler_name="DPM++ 2M", scheduler="Karras")
    # A1111's seed rule: image i of the request has seed + i, across batch_size x n_iter.
    assert r.info["all_seeds"] == [11, 12, 13, 14]
    ref = pipe.txt2img(PROMPT, negative_prompt="blue", width=64, height=64, steps=12, guidance=6.5, seed=11,
                       batch_size=4, sampler="DPM++ 2M", schedule="Karras")
    assert len(r.images) == 4
    for got, want, text in zip(r.images, ref.images, ref.infotexts):
        assert same(got, want)
        assert got.info["parameters"] == text
    assert r.info["infotexts"] == ref.infotexts
    assert r.parameters["prompt"] == PROMPT and r.parameters["n_iter"] == 2


def test_webuiapi_img2img_equals_cli(server, tmp_path):
    api = server.api()
    src = Image.open(EXAMPLES / "blue-circle.png")
    r = api.img2img(images=[src], prompt=PROMPT, denoising_strength=0.6, width=64, height=64, steps=10, cfg_scale=7,
                    seed=3, sampler_name="Euler a")
    out = tmp_path / "cli.png"
    done = subprocess.run([*SDRT, "img2img", str(EXAMPLES / "blue-circle.png"), "-p", PROMPT, "--strength", "0.6",
                           "--steps", "10", "--cfg", "7", "--sampler", "Euler a", "--seed", "3", "-W", "64", "-H", "64",
                           "-o", str(out), "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cli = Image.open(out)
    assert same(r.image, cli)
    assert r.image.info["parameters"] == cli.info["parameters"]
    # png-info reads the parameters back (A1111's PNGInfoResponse).
    info = api.png_info(r.image).json
    assert info["info"] == cli.info["parameters"]
    p = info["parameters"]
    assert (p["Prompt"], p["Steps"], p["Sampler"], p["Seed"], p["Size-1"], p["Size-2"], p["Denoising strength"]) == \
        (PROMPT, "10", "Euler a", "3", "64", "64", "0.6")


def test_webuiapi_inpainting_equals_python_api(server, pipe):
    api = server.api()
    img, mask = Image.open(EXAMPLES / "two-shapes.png"), Image.open(EXAMPLES / "two-shapes-mask.png")
    r = api.img2img(images=[img], mask_image=mask, prompt="a green square", denoising_strength=0.9, width=64, height=64,
                    steps=10, seed=5, inpainting_fill=1, inpaint_full_res=False, mask_blur=2, sampler_name="Euler",
                    batch_size=2)
    ref = pipe.inpaint(img, mask, "a green square", strength=0.9, width=64, height=64, steps=10, guidance=7.0, seed=5,
                       fill="original", only_masked=False, mask_blur=2, sampler="Euler", batch_size=2)
    assert [same(a, b) for a, b in zip(r.images, ref.images)] == [True, True]
    # Only masked with padding, latent noise fill (A1111's inpaint_full_res, inpainting_fill=2).
    r2 = api.img2img(images=[img], mask_image=mask, prompt="a green square", width=64, height=64, steps=8, seed=9,
                     inpainting_fill=2, inpaint_full_res=True, inpaint_full_res_padding=8, inpainting_mask_invert=1)
    ref2 = pipe.inpaint(img, mask, "a green square", width=64, height=64, steps=8, guidance=7.0, seed=9,
                        fill="latent_noise", only_masked=True, padding=8, invert_mask=True, sampler="Euler a")
    assert same(r2.image, ref2.images[0])
    assert r2.image.info["parameters"] == ref2.infotext


def test_clip_skip_override_and_listings(server, pipe):
    api = server.api()
    r = api.txt2img(prompt=PROMPT, width=64, height=64, steps=6, seed=2, override_settings={"CLIP_stop_at_last_layers": 2})
    ref = pipe.txt2img(PROMPT, width=64, height=64, steps=6, guidance=7.0, seed=2, sampler="Euler a", clip_skip=2)
    assert same(r.image, ref.images[0]) and "Clip skip: 2" in r.info["infotexts"][0]
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in api.get_samplers())
    scheds = api.get_schedulers()
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in scheds}
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in scheds)
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["shapes"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert "/" not in models[0]["filename"]  # no server path leaks out
    assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert set(api.get_progress()) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}


def test_a1111_response_shape(server):
    body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 4, "seed": 7, "init_images": [b64(Image.open(EXAMPLES / "sketch.png"))]}
    r = requests.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200
    doc = r.json()
    assert set(doc) == {"images", "parameters", "info"}
    info = json.loads(doc["info"])
    # Processed.js() keys (A1111 modules/processing.py)
    assert {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed", "all_subseeds",
            "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size", "restore_faces",
            "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash", "seed_resize_from_w",
            "seed_resize_from_h", "denoising_strength", "extra_generation_params", "index_of_first_image", "infotexts",
            "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning", "version"} <= set(info)
    assert info["seed"] == 7 and info["sd_model_name"] == "shapes" and info["denoising_strength"] == 0.75
    # parameters echoes the request with A1111's defaults; init images are left out unless asked for.
    assert doc["parameters"]["init_images"] is None and doc["parameters"]["steps"] == 4
    assert doc["parameters"]["cfg_scale"] == 7.0 and doc["parameters"]["sampler_index"] == "Euler"
    # send_images=false: no images, the rest as usual.
    r2 = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "width": 64, "height": 64, "steps": 2,
                                                               "send_images": False}, timeout=120)
    assert r2.status_code == 200 and r2.json()["images"] == [] and json.loads(r2.json()["info"])["infotexts"]
    assert requests.get(f"{server.url}/docs", timeout=30).status_code == 200
    paths = requests.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/healthz", "/readyz", "/metrics"} <= set(paths)


# ------------------------------------------------------------------------- bad requests table
def _bomb_png(w=100_000, h=100_000) -> bytes:
    """A real 1x1 PNG whose header claims w x h pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 8] = w.to_bytes(4, "big")
    data[ihdr + 8 : ihdr + 12] = h.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = crc.to_bytes(4, "big")
    return bytes(data)


_IMG = None


def _img():
    global _IMG
    if _IMG is None:
        _IMG = b64(Image.open(EXAMPLES / "two-shapes.png"))
    return _IMG


def _i2i(**kw):
    return {"prompt": "x", "width": 64, "height": 64, "steps": 2, "init_images": [_img()], **kw}


# (name, method, path, json body or raw bytes, status, error kind, text the detail must name)
BAD = [
    ("malformed JSON", "POST", "/sdapi/v1/txt2img", b'{"prompt": ', 422, "ValidationError", "malformed JSON"),
    ("JSON not an object", "POST", "/sdapi/v1/txt2img", b"[1, 2]", 422, "ValidationError", "request body"),
    ("not JSON", "POST", "/sdapi/v1/txt2img", b"hello", 422, "ValidationError", "malformed JSON"),
    ("unknown field", "POST", "/sdapi/v1/img2img", _i2i.__name__, 422, "ValidationError", "denoising_strenght"),
    ("wrong type steps", "POST", "/sdapi/v1/txt2img", {"steps": "many"}, 422, "ValidationError", "steps"),
    ("wrong type prompt", "POST", "/sdapi/v1/txt2img", {"prompt": 5}, 422, "ValidationError", "prompt"),
    ("wrong type init_images", "POST", "/sdapi/v1/img2img", {"init_images": "abc"}, 422, "ValidationError", "init_images"),
    ("negative steps", "POST", "/sdapi/v1/txt2img", {"steps": -1}, 422, "ValidationError", "steps"),
    ("too many steps", "POST", "/sdapi/v1/txt2img", {"steps": 100000}, 422, "ValidationError", "steps"),
    ("huge dimensions", "POST", "/sdapi/v1/txt2img", {"width": 100000, "height": 100000}, 422, "ValidationError", "width"),
    ("batch too large", "POST", "/sdapi/v1/txt2img", {"batch_size": 1000}, 422, "ValidationError", "batch_size"),
    ("n_iter zero", "POST", "/sdapi/v1/txt2img", {"n_iter": 0}, 422, "ValidationError", "n_iter"),
    ("seed out of range", "POST", "/sdapi/v1/txt2img", {"seed": 2**40}, 422, "ValidationError", "seed"),
    ("cfg out of range", "POST", "/sdapi/v1/txt2img", {"cfg_scale": -1}, 422, "ValidationError", "cfg_scale"),
    ("unknown sampler", "POST", "/sdapi/v1/txt2img", {"sampler_name": "Euler z", "width": 64, "height": 64}, 422, "ValidationError", "sampler_name"),
    ("unknown scheduler", "POST", "/sdapi/v1/txt2img", {"scheduler": "wobbly", "width": 64, "height": 64}, 422, "ValidationError", "scheduler"),
    ("10 MB prompt", "POST", "/sdapi/v1/txt2img", {"prompt": "a" * (10 * 2**20)}, 422, "ValidationError", "prompt"),
    ("body over the limit", "POST", "/sdapi/v1/txt2img", b'{"prompt": "' + b"a" * (40 * 2**20) + b'"}', 413, "PayloadTooLarge", "bytes"),
    ("hires fix", "POST", "/sdapi/v1/txt2img", {"enable_hr": True}, 422, "ValidationError", "enable_hr"),
    ("face restoration", "POST", "/sdapi/v1/txt2img", {"restore_faces": True}, 422, "ValidationError", "restore_faces"),
    ("scripts", "POST", "/sdapi/v1/txt2img", {"alwayson_scripts": {"ControlNet": {"args": []}}}, 422, "ValidationError", "alwayson_scripts"),
    ("save_images", "POST", "/sdapi/v1/txt2img", {"save_images": True}, 422, "ValidationError", "save_images"),
    ("unknown override", "POST", "/sdapi/v1/txt2img", {"override_settings": {"sd_hypernetwork": "x"}}, 422, "ValidationError", "override_settings"),
    ("model path", "POST", "/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 404, "ModelNotFound", "sd_model_checkpoint"),
    ("no init_images", "POST", "/sdapi/v1/img2img", {"prompt": "x"}, 422, "ValidationError", "init_images"),
    ("bad base64", "POST", "/sdapi/v1/img2img", "bad_base64", 422, "ValidationError", "init_images[0]"),
    ("not an image", "POST", "/sdapi/v1/img2img", "not_image", 422, "ValidationError", "init_images[0]"),
    ("decompression bomb", "POST", "/sdapi/v1/img2img", "bomb", 413, "PayloadTooLarge", "init_images[0]"),
    ("image over the pixel limit", "POST", "/sdapi/v1/img2img", "big", 413, "PayloadTooLarge", "8000x8000"),
    ("mismatched mask", "POST", "/sdapi/v1/img2img", "bad_mask", 422, "ValidationError", "mask"),
    ("strength out of range", "POST", "/sdapi/v1/img2img", "bad_strength", 422, "ValidationError", "denoising_strength"),
    ("resize_mode unknown", "POST", "/sdapi/v1/img2img", "bad_resize", 422, "ValidationError", "resize_mode"),
    ("fill unknown", "POST", "/sdapi/v1/img2img", "bad_fill", 422, "ValidationError", "inpainting_fill"),
    ("png-info bad base64", "POST", "/sdapi/v1/png-info", {"image": "%%%"}, 422, "ValidationError", "image"),
    ("options unknown key", "POST", "/sdapi/v1/options", {"show_progressbar": True}, 422, "ValidationError", "show_progressbar"),
    ("options unknown model", "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc"}, 404, "ModelNotFound", "sd_model_checkpoint"),
    ("wrong method", "GET", "/sdapi/v1/txt2img", None, 405, "MethodNotAllowed", ""),
    ("unknown endpoint", "GET", "/sdapi/v1/nothing", None, 404, "NotFound", "/sdapi/v1/nothing"),
]


def _body(spec):
    mask = b64(Image.open(EXAMPLES / "two-shapes-mask.png"))
    special = {
        "_i2i": lambda: _i2i(denoising_strenght=0.5),
        "bad_base64": lambda: _i2i(init_images=["!!!not base64!!!"]),
        "not_image": lambda: _i2i(init_images=[base64.b64encode(b"hello world, not an image").decode()]),
        "bomb": lambda: _i2i(init_images=[base64.b64encode(_bomb_png()).decode()]),
        "big": lambda: _i2i(init_images=[base64.b64encode(_bomb_png(8000, 8000)).decode()]),
        "bad_mask": lambda: _i2i(mask=b64(Image.new("L", (64, 16), 255))),
        "bad_strength": lambda: _i2i(denoising_strength=2),
        "bad_resize": lambda: _i2i(resize_mode=7),
        "bad_fill": lambda: _i2i(mask=mask, inpainting_fill=9),
    }
    return special[spec]() if isinstance(spec, str) else spec


def _send(url, method, path, spec, auth=None):
    body = _body(spec)
    if isinstance(body, bytes):
        return requests.request(method, url + path, data=body, headers={"Content-Type": "application/json"}, timeout=120, auth=auth)
    return requests.request(method, url + path, json=body, timeout=120, auth=auth)


def _check_error(r, status, kind, names):
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    assert "\n" not in r.text.strip() and "Traceback" not in r.text and 'File "' not in r.text
    doc = r.json()
    assert doc["error"] == kind
    assert names in doc["detail"], doc["detail"]
    assert len(doc["detail"]) < 2000


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.parametrize("row", BAD, ids=[r[0] for r in BAD])
def test_bad_request(server, row):
    name, method, path, spec, status, kind, names = row
    _check_error(_send(server.url, method, path, spec), status, kind, names)
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_bad_requests_leave_memory_at_baseline(server):
    """The whole table, over and over: the server keeps serving, its memory does not grow."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's resident memory")

    def one_pass():
        for _, method, path, spec, status, _, _ in BAD:
            assert _send(server.url, method, path, spec).status_code == status

    one_pass()
    base = _rss_kib(server.proc.pid)
    for _ in range(4):
        one_pass()
    grown = _rss_kib(server.proc.pid) - base
    assert grown < 48 * 1024, f"RSS grew by {grown / 1024:.1f} MiB over 4 passes of the bad-request table"
    ok = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "width": 64, "height": 64, "steps": 2}, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


# --------------------------------------------------------------------------- production paths
def test_auth():
    with in_thread(api_auth="alice:secret,bob:pa:ss") as live:
        url = live.url + "/sdapi/v1/sd-models"
        for auth in (None, ("alice", "wrong"), ("carol", "secret"), ("alice", "pa:ss")):
            r = requests.get(url, auth=auth, timeout=30)
            _check_error(r, 401, "Unauthorized", "username or password")
            assert r.headers["WWW-Authenticate"] == "Basic"
        r = requests.get(url, headers={"Authorization": "Basic %%%"}, timeout=30)
        assert r.status_code == 401
        assert requests.get(url, auth=("alice", "secret"), timeout=30).status_code == 200
        assert requests.get(url, auth=("bob", "pa:ss"), timeout=30).status_code == 200
        assert requests.get(live.url + "/metrics", timeout=30).status_code == 401
        # probes stay open for the orchestrator
        assert requests.get(live.url + "/healthz", timeout=30).status_code == 200
        assert requests.get(live.url + "/readyz", timeout=30).status_code == 200
        api = live.api(username="bob", password="pa:ss")
        assert api.txt2img(prompt=PROMPT, width=64, height=64, steps=2, seed=1).image.size == (64, 64)


def test_micro_batching_gives_each_request_its_own_result(pipe):
    prompts = [PROMPT, "a blue square on a black background", "a yellow star", "a green triangle on a gray background"]
    with in_thread(max_batch_images=8, batch_wait_ms=50) as live:
        eng = live.state.engine
        with paused(eng) as gate, concurrent.futures.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(live.api().txt2img, prompt=p, width=64, height=64, steps=8, seed=100 + i, cfg_scale=7)
                    for i, p in enumerate(prompts)]
            assert wait_for(lambda: len(eng.pending) == 4)
            gate.set()
            results = [f.result() for f in futs]
        # The four ran as one group: every UNet call had 4 requests x (cond + uncond) rows.
        assert eng.unet_batches[8] == 8 and set(eng.unet_batches) == {8}
        for i, (p, r) in enumerate(zip(prompts, results)):
            ref = pipe.txt2img(p, width=64, height=64, steps=8, seed=100 + i, guidance=7.0, sampler="Euler a")
            assert same(r.image, ref.images[0]), p
        # img2img requests with different images and strength-compatible keys batch too.
        eng.unet_batches.clear()
        srcs = [Image.open(EXAMPLES / n) for n in ("blue-circle.png", "sketch.png")]
        with paused(eng) as gate, concurrent.futures.ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(live.api().img2img, images=[s], prompt=PROMPT, width=64, height=64, steps=10, seed=7,
                              denoising_strength=0.5, sampler_name="DPM++ 2M") for s in srcs]
            assert wait_for(lambda: len(eng.pending) == 2)
            gate.set()
            results = [f.result() for f in futs]
        assert set(eng.unet_batches) == {4}
        for s, r in zip(srcs, results):
            ref = pipe.img2img(s, PROMPT, width=64, height=64, steps=10, seed=7, strength=0.5, guidance=7.0, sampler="DPM++ 2M")
            assert same(r.image, ref.images[0])


def test_micro_batch_inputs_that_do_not_stack_run_apart(pipe):
    """A prompt over 75 tokens has longer embeddings: it meets the group at every UNet call but
    runs as its own call; both requests still get their own images."""
    long_prompt = ", ".join(["a red circle on a white background"] * 12)
    prompts = [PROMPT, long_prompt]
    with in_thread(max_batch_images=8, batch_wait_ms=50) as live:
        eng = live.state.engine
        with paused(eng) as gate, concurrent.futures.ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(live.api().txt2img, prompt=p, width=64, height=64, steps=5, seed=3, cfg_scale=7) for p in prompts]
            assert wait_for(lambda: len(eng.pending) == 2)
            gate.set()
            results = [f.result() for f in futs]
        assert eng.unet_batches == {2: 10}  # 5 steps x 2 requests, each call its own 2 CFG rows
        for p, r in zip(prompts, results):
            ref = pipe.txt2img(p, width=64, height=64, steps=5, seed=3, guidance=7.0, sampler="Euler a")
            assert same(r.image, ref.images[0])


def test_queue_full_answers_503_with_retry_after():
    with in_thread(max_queue=1, max_batch_images=1) as live:
        eng = live.state.engine
        body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 3}
        with paused(eng) as gate, concurrent.futures.ThreadPoolExecutor(1) as ex:
            first = ex.submit(requests.post, live.url + "/sdapi/v1/txt2img", json=body, timeout=120)
            assert wait_for(lambda: len(eng.pending) == 1)
            r = requests.post(live.url + "/sdapi/v1/txt2img", json=body, timeout=120)
            _check_error(r, 503, "QueueFull", "queue is full")
            assert int(r.headers["Retry-After"]) >= 1
            metrics = requests.get(live.url + "/metrics", timeout=30).text
            assert "sdrt_queue_depth 1.0" in metrics
            gate.set()
            assert first.result().status_code == 200
        assert requests.post(live.url + "/sdapi/v1/txt2img", json=body, timeout=120).status_code == 200


def test_timeout_interrupt_and_drain():
    with in_thread(request_timeout=1.0, max_batch_images=1) as live:
        eng = live.state.engine
        body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 3}
        with paused(eng):
            r = requests.post(live.url + "/sdapi/v1/txt2img", json=body, timeout=120)  # waits in the queue past 1 s
        _check_error(r, 504, "Timeout", "request timeout")
        assert not eng.pending
    with in_thread(max_batch_images=1) as live:
        eng = live.state.engine
        long = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 150, "batch_size": 4}
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            f = ex.submit(requests.post, live.url + "/sdapi/v1/txt2img", json=long, timeout=300)
            assert wait_for(lambda: requests.get(live.url + "/sdapi/v1/progress", timeout=30).json()["state"]["sampling_step"] > 0)
            assert requests.post(live.url + "/sdapi/v1/interrupt", timeout=30).json() == {}
            _check_error(f.result(), 409, "Interrupted", "interrupt")
        assert wait_for(lambda: not eng.running)
        eng.drain()  # what SIGTERM does first
        _check_error(requests.post(live.url + "/sdapi/v1/txt2img", json=body, timeout=60), 503, "ShuttingDown", "shutting down")
        _check_error(requests.get(live.url + "/readyz", timeout=30), 503, "ShuttingDown", "shutting down")
        metrics = requests.get(live.url + "/metrics", timeout=30).text
        for line in ('sdrt_errors_total{kind="Interrupted"} 1.0', 'sdrt_errors_total{kind="ShuttingDown"} 1.0',
                     'sdrt_requests_total{endpoint="/sdapi/v1/txt2img",status="409"} 1.0',
                     'sdrt_request_seconds_bucket{endpoint="/sdapi/v1/txt2img",le="+Inf"} 2.0', "sdrt_in_flight 0.0"):
            assert line in metrics, line


def test_models_dir_switch_by_name(tmp_path):
    from sdrt.models import default_model_path

    for name in ("alpha", "beta"):
        shutil.copytree(default_model_path(), tmp_path / name)
    (tmp_path / "not-a-model").mkdir()
    with in_thread(models_dir=str(tmp_path), max_loaded_models=1) as live:
        api = live.api()
        assert [m["model_name"] for m in api.get_sd_models()] == ["alpha", "beta"]
        assert api.get_options()["sd_model_checkpoint"].startswith("alpha")
        a = api.txt2img(prompt=PROMPT, width=64, height=64, steps=3, seed=4)
        assert a.info["sd_model_name"] == "alpha"
        assert requests.post(live.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "beta"}, timeout=120).status_code == 200
        assert api.get_options()["sd_model_checkpoint"].startswith("beta")
        b = api.txt2img(prompt=PROMPT, width=64, height=64, steps=3, seed=4)
        assert b.info["sd_model_name"] == "beta" and "Model: beta" in b.info["infotexts"][0]
        c = api.txt2img(prompt=PROMPT, width=64, height=64, steps=3, seed=4, override_settings={"sd_model_checkpoint": "alpha"})
        assert c.info["sd_model_name"] == "alpha"
        assert same(a.image, b.image) and same(a.image, c.image)  # the same weights under two names
        for bad in ("../alpha", str(tmp_path / "alpha"), "not-a-model"):
            r = requests.post(live.url + "/sdapi/v1/options", json={"sd_model_checkpoint": bad}, timeout=60)
            _check_error(r, 404, "ModelNotFound", "not found")


def test_sigterm_finishes_requests_in_flight():
    with subprocess_server("--max-batch", "1") as live:
        long = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 150, "batch_size": 2, "seed": 1}
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            f = ex.submit(requests.post, live.url + "/sdapi/v1/txt2img", json=long, timeout=300)
            assert wait_for(lambda: requests.get(live.url + "/sdapi/v1/progress", timeout=30).json()["state"]["sampling_step"] > 0)
            live.proc.send_signal(signal.SIGTERM)
            try:  # a new request is refused: 503 while the socket is open, then no connection at all
                r = requests.post(live.url + "/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2}, timeout=60)
                _check_error(r, 503, "ShuttingDown", "shutting down")
            except requests.ConnectionError:
                pass
            r = f.result()
        assert r.status_code == 200 and len(r.json()["images"]) == 2
        # uvicorn ends a gracefully stopped server by re-raising the signal it caught (exit status 128+15)
        assert live.proc.wait(timeout=120) in (0, -signal.SIGTERM)
        log = live.log.read_text()
        lines = [ln for ln in log.splitlines() if ln.strip()]
        assert lines and all(ln.startswith("{") and json.loads(ln) for ln in lines)  # one JSON object per line
        msgs = [json.loads(ln).get("msg") for ln in lines]
        assert "shutting down" in msgs and "stopped" in msgs and msgs.index("shutting down") < msgs.index("stopped")


def test_base_install_does_not_import_the_service():
    code = ("import sys; import sdrt.runtime; from typer.testing import CliRunner; from sdrt.cli.app import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "r = CliRunner().invoke(app, ['serve', '--help']); assert r.exit_code == 0 and '--api-auth' in r.output; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'ray', 'prometheus_client') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------------- Ray Serve
def test_ray_two_replicas(pipe):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sdrt[ray]')")
    with subprocess_server("--ray", "--replicas", "2", env={"RAY_USAGE_STATS_ENABLED": "0"}) as live:
        # /readyz answers once one replica is up; the second may still be loading its model.
        replicas = set()
        wait_for(lambda: replicas.add(requests.get(live.url + "/readyz", timeout=30).headers.get("x-sdrt-replica"))
                 or len(replicas) == 2, tries=600, step=0.1)
        assert len(replicas) == 2, replicas  # two processes, each with its own model load

        def one(seed):
            r = requests.post(live.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "width": 64, "height": 64, "steps": 4,
                                                                    "seed": seed}, timeout=300)
            return seed, r

        seen = set()
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            for seed, r in ex.map(one, range(12)):
                assert r.status_code == 200, r.text[:300]
                seen.add(r.headers["x-sdrt-replica"])
                if seed < 3:  # A1111's API defaults: sampler Euler (sampler_index), CFG 7
                    ref = pipe.txt2img(PROMPT, width=64, height=64, steps=4, seed=seed, guidance=7.0, sampler="Euler")
                    assert same(decode(r.json()["images"][0]), ref.images[0])
        assert seen <= replicas
        # the HTTP API is unchanged behind Ray's proxy: errors and the real client
        _check_error(_send(live.url, "POST", "/sdapi/v1/txt2img", {"steps": -1}), 422, "ValidationError", "steps")
        assert live.api().txt2img(prompt=PROMPT, width=64, height=64, steps=2, seed=1).image.size == (64, 64)


def test_serve_refuses_to_start_without_a_model(tmp_path):
    for args, says in ((["--models-dir", str(tmp_path)], "holds no model folders"),
                       (["--model", str(tmp_path / "nothing")], "not a folder"),
                       (["--api-auth", "alice"], "user:password")):
        done = subprocess.run([*SDRT, "serve", "--port", str(free_port()), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and says in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("name,want", [("ddim", "DDIM"), ("euler", "Euler"), ("EULER A", "Euler a"), ("k_dpm_fast", "DPM fast"),
                                       ("plms", "PLMS"), ("DPM++ 2M Karras", "DPM++ 2M Karras"),
                                       ("uni_pc", "uni_pc"), ("DDIMScheduler", "DDIMScheduler")])
def test_sampler_names_resolve_in_a1111_context(name, want):
    """A1111's API matches its samplers' names and aliases in any case: there "ddim" is A1111's
    DDIM (ComfyUI's ddim elsewhere in sdrt); names A1111 lacks pass through."""
    from sdrt.schedulers import family_of
    from sdrt.serve.a1111 import a1111_sampler_name

    got = a1111_sampler_name(name)
    assert got == want
    if want[0].isupper() and not want.endswith("Scheduler"):
        assert family_of(got) == "a1111"
