"""What verifying a model folder costs at load: load() + every graph's session, each verify mode in
a fresh process, with an empty and then a filled verification cache.

    python benchmarks/verify_cost.py MODEL_FOLDER [--rounds 1]

Prints seconds per mode: "none" (no check), "auto" with an empty cache (every file hashed, in a
background thread while the sessions are created), "auto" again (files unchanged since their
check: stat only), "full" (every file hashed again), the hashing alone, and `sdrt info` with an
empty and a filled cache. The page cache is warmed by a first "none" load that is not reported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

LOAD = """
import sys, time
t = time.perf_counter()
from sdrt.runtime import load
p = load(sys.argv[1], provider="cpu", verify=sys.argv[2])
p.load_graphs()
p.info.wait_verified()
print(time.perf_counter() - t)
"""
HASH = """
import sys, time
t = time.perf_counter()
from sdrt.runtime.modelfolder import read_model_folder
read_model_folder(sys.argv[1], verify="full")
print(time.perf_counter() - t)
"""


def timed(code: str, *args: str, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def wall(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    sdrt = os.path.join(os.path.dirname(sys.executable), "sdrt")
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().split()[0]}")
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SDRT_CACHE_DIR": cache}
            timed(LOAD, args.folder, "none", env=env)  # warms the page cache
            rows = [
                ("load, verify=none", timed(LOAD, args.folder, "none", env=env)),
                ("load, verify=auto, empty cache", timed(LOAD, args.folder, "auto", env=env)),
                ("load, verify=auto, files checked before", timed(LOAD, args.folder, "auto", env=env)),
                ("load, verify=full", timed(LOAD, args.folder, "full", env=env)),
                ("hashing alone (read_model_folder, full)", timed(HASH, args.folder, env=env)),
            ]
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SDRT_CACHE_DIR": cache}
            rows += [("sdrt info, empty cache", wall([sdrt, "info", args.folder], env)),
                     ("sdrt info, files checked before", wall([sdrt, "info", args.folder], env))]
        print(f"round {r + 1}:")
        for label, s in rows:
            print(f"  {label:42s} {s:6.2f} s")
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[0]}")


if __name__ == "__main__":
    main()
