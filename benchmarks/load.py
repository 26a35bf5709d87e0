"""Bounded load test of `sdrt serve` on 127.0.0.1: N concurrent clients send M requests (A1111's
/sdapi/v1/txt2img or img2img on the embedded 64x64 model) under a hard time limit, and report
throughput, latency percentiles, errors, 503s and the server's resident memory over the run.

    python benchmarks/load.py                                   # single process, micro-batching, 2 Ray replicas
    python benchmarks/load.py --modes batch --clients 8 --requests 500 --time-limit 180
    python benchmarks/load.py --modes overload                  # more clients than the queue holds: 503s

Modes (each starts its own server, then stops it):
  single    `sdrt serve --max-batch 1`              one request at a time
  batch     `sdrt serve --max-batch 8`              compatible queued requests share UNet calls
  single-1t, batch-1t   the same with one ONNX Runtime thread (what each of 2 Ray replicas gets on 2 cores)
  ray       `sdrt serve --ray --replicas 2 --max-batch 1`
  overload  `sdrt serve --max-queue 2 --max-batch 1` with every client sending at once (503 + Retry-After)

Clients are closed-loop: each sends its next request when the last one is answered (a 503 is
counted and the client waits Retry-After capped at 1 s). Each request has its own prompt and seed,
with the same size, steps, sampler and guidance (what micro-batching can group).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a yellow star on a gray background",
           "a green triangle on a white background", "a purple circle and an orange square on a black background"]
MODES = {
    "single": ["--max-batch", "1"],
    "single-1t": ["--max-batch", "1", "--threads", "1"],
    "batch": ["--max-batch", "8"],
    "batch-1t": ["--max-batch", "8", "--threads", "1"],
    "ray": ["--ray", "--replicas", "2", "--max-batch", "1"],
    "overload": ["--max-queue", "2", "--max-batch", "1"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def server_pids(proc: subprocess.Popen, ray: bool) -> list[int]:
    """The processes that hold models: the server, or (Ray) its replica actors."""
    if not ray:
        return [proc.pid]
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "ServeReplica:sdrt" in cmd:
                out.append(int(d.name))
    return out


def body(kind: str, i: int, steps: int, image: str | None) -> dict:
    b = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "steps": steps, "width": 64, "height": 64,
         "sampler_name": "Euler a", "cfg_scale": 7}
    if kind == "img2img":
        b.update(init_images=[image], denoising_strength=0.6)
    return b


def run_mode(mode: str, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from sdrt.cli import main; main()", "serve", "--port", str(port), *MODES[mode]]
    log = open(os.devnull, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    ray = mode == "ray"
    try:
        t_start = time.monotonic()
        seen = set()
        while time.monotonic() - t_start < 180:
            try:
                r = requests.get(url + "/readyz", timeout=5)
                if r.status_code == 200:
                    seen.add(r.headers.get("x-sdrt-replica"))
                    if not ray or len(seen) == 2:
                        break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{mode}: server not ready after 180 s")
        startup = time.monotonic() - t_start
        image = None
        if args.kind == "img2img":
            buf = io.BytesIO(Path(ROOT / "models/examples/blue-circle.png").read_bytes())
            image = base64.b64encode(buf.getvalue()).decode()
        # Warm-up: a few requests outside the measurement.
        for i in range(4):
            requests.post(f"{url}/sdapi/v1/{args.kind}", json=body(args.kind, i, args.steps, image), timeout=120)
        pids = server_pids(proc, ray)
        clients = args.clients * (4 if mode == "overload" else 1)
        lock = threading.Lock()
        counter = {"next": 0}
        lat: list[float] = []
        status: dict[str, int] = {}
        rss: list[tuple[int, float]] = [(0, rss_mib(pids))]
        deadline = time.monotonic() + args.time_limit

        def client():
            s = requests.Session()
            while True:
                with lock:
                    i = counter["next"]
                    if i >= args.requests or time.monotonic() > deadline:
                        return
                    counter["next"] += 1
                t = time.perf_counter()
                try:
                    r = s.post(f"{url}/sdapi/v1/{args.kind}", json=body(args.kind, i, args.steps, image), timeout=args.time_limit)
                    code = str(r.status_code)
                except requests.RequestException as e:
                    code, r = type(e).__name__, None
                dt = time.perf_counter() - t
                with lock:
                    status[code] = status.get(code, 0) + 1
                    if code == "200":
                        lat.append(dt)
                    done = sum(status.values())
                    if done % 50 == 0:
                        rss.append((done, rss_mib(pids)))
                if code == "503" and r is not None:
                    time.sleep(min(1.0, float(r.headers.get("Retry-After", "1"))))

        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        rss.append((sum(status.values()), rss_mib(pids)))
        ok = status.get("200", 0)
        q = np.percentile(lat, [50, 95, 99]) if lat else [float("nan")] * 3
        metrics = requests.get(url + "/metrics", timeout=30).text if not ray else ""
        batches = [ln for ln in metrics.splitlines() if ln.startswith("sdrt_unet_batch_rows_bucket")]
        return {
            "mode": mode, "command": " ".join(["sdrt serve", *MODES[mode]]), "kind": args.kind, "steps": args.steps,
            "clients": clients, "requests_sent": sum(status.values()), "ok": ok, "status": status,
            "wall_s": round(wall, 2), "throughput_rps": round(ok / wall, 3), "startup_s": round(startup, 1),
            "latency_s": {"p50": round(float(q[0]), 3), "p95": round(float(q[1]), 3), "p99": round(float(q[2]), 3)},
            "rss_mib": [(n, round(m, 1)) for n, m in rss], "rss_processes": len(pids),
            "unet_batch_rows_buckets": batches, "hit_time_limit": time.monotonic() > deadline,
            "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="single,batch,ray", help="comma-separated: single, batch, ray, overload")
    ap.add_argument("--kind", default="txt2img", choices=["txt2img", "img2img"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--time-limit", type=float, default=180.0, help="hard limit per mode, seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    args = ap.parse_args()
    records = []
    for mode in args.modes.split(","):
        if mode == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray: skipped (pip install 'sdrt[ray]')", file=sys.stderr)
                continue
        rec = run_mode(mode.strip(), args)
        records.append(rec)
        print(f"{rec['mode']:<9} {rec['ok']:>4}/{rec['requests_sent']:<4} ok  {rec['throughput_rps']:7.2f} req/s  "
              f"p50 {rec['latency_s']['p50']:.3f}  p95 {rec['latency_s']['p95']:.3f}  p99 {rec['latency_s']['p99']:.3f} s  "
              f"status {rec['status']}  RSS {rec['rss_mib'][1][1]:.0f} -> {rec['rss_mib'][-1][1]:.0f} MiB", flush=True)
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs", "argv": sys.argv[1:], "records": records}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
