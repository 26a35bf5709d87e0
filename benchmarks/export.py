"""Peak memory and time of `sdrt export` per target and precision, beside optimum-cli's export.

    python -m sdrt.export.testmodels SD15 --kind sd15
    python benchmarks/export.py SD15 WORK [--only fp32,fp16,int8,int8-folder,optimum]
        [--before DIR] [--optimum-venv VENV] [--lock FILE]

Each export runs alone under `/usr/bin/time -v` (peak RSS: its "Maximum resident set size"; CPU
time: user + system) and prints a row of the table in docs/benchmarks.md with the machine's load
average when it started. Outputs go to WORK and are removed after each row (the fp32 folder is
kept for int8-folder, which quantizes it). --before DIR runs the same exports with the sdrt
found in DIR (PYTHONPATH) for the "before" columns; --optimum-venv runs `optimum-cli export onnx`
from that virtual environment on the same folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

JOBS = {
    "fp32": ("sdrt fp32, cpu target", []),
    "fp16": ("sdrt fp16, cuda target", ["--target", "cuda", "--precision", "fp16"]),
    "int8": ("sdrt int8, from the diffusers folder", ["--precision", "int8"]),
    "int8-folder": ("sdrt int8, from the fp32 sdrt folder", ["--precision", "int8"]),
    "optimum": ("optimum-cli export onnx (fp32)", []),
}


def timed(cmd: list[str], env: dict, log: Path, lock: str | None) -> dict:
    """Run `cmd` under /usr/bin/time -v (and `flock lock`); its peak RSS (MiB), wall and CPU
    seconds, exit status, and the 1-minute load average when it started."""
    with open(log, "w") as f:
        script = 'head -c 5 /proc/loadavg; echo; exec /usr/bin/time -v "$@"'
        rc = subprocess.run([*(["flock", lock] if lock else []), "sh", "-c", script, "sh", *cmd], stdout=f,
                            stderr=subprocess.STDOUT, env=env).returncode
    text = log.read_text(errors="replace")
    load = float(text.split()[0])

    def field(name: str) -> str:
        m = re.search(rf"{re.escape(name)}: (.+)", text)
        return m.group(1).strip() if m else "?"

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"rss_mib": int(field("Maximum resident set size (kbytes)")) // 1024, "wall": wall.split(".")[0],
            "cpu_s": round(cpu), "rc": rc, "load": load}


def run(job: str, src: Path, work: Path, python_path: str | None, optimum_venv: Path | None, lock: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    tag = "before" if python_path else "now"
    if python_path:
        env["PYTHONPATH"] = python_path
    out = work / f"{job}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    if job == "optimum":
        cmd = [str(optimum_venv / "bin" / "optimum-cli"), "export", "onnx", "-m", str(src), "--task", "text-to-image",
               str(out)]
    else:
        source = work / f"fp32-{tag}" if job == "int8-folder" else src
        cmd = [str(Path(sys.executable).with_name("sdrt")), "export", str(source), str(out), *JOBS[job][1]]
    r = timed(cmd, env, work / f"{job}-{tag}.log", lock)
    if job != "fp32":
        shutil.rmtree(out, ignore_errors=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="diffusers folder (python -m sdrt.export.testmodels SRC --kind sd15)")
    ap.add_argument("work", type=Path, help="folder for the exports and their logs")
    ap.add_argument("--only", default="fp32,int8-folder,fp16,int8,optimum")
    ap.add_argument("--before", help="PYTHONPATH holding the sdrt export to compare with")
    ap.add_argument("--optimum-venv", type=Path)
    ap.add_argument("--lock", help="run each export under `flock LOCK` (one heavy job at a time on a shared machine)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("| export | peak RSS (MiB) | wall (m:s) | CPU time (s) | load | before: peak RSS (MiB) | before: wall | "
          "before: CPU time (s) | before: load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job in args.only.split(","):
        if job == "optimum" and not args.optimum_venv:
            continue
        cols = []
        for pp in [None] + ([args.before] if args.before and job != "optimum" else []):
            r = run(job, args.src, args.work, pp, args.optimum_venv, args.lock)
            ok = "" if r["rc"] == 0 else f" (exit {r['rc']})"
            cols += [f"{r['rss_mib']}{ok}", r["wall"], str(r["cpu_s"]), str(r["load"])]
        print(f"| {JOBS[job][0]} | " + " | ".join(cols) + " |", flush=True)
    for tag in ("now", "before"):
        shutil.rmtree(args.work / f"fp32-{tag}", ignore_errors=True)


if __name__ == "__main__":
    main()
