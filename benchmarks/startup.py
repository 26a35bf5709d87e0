"""How long `sdrt --help` and prompt tokenizing take (the tests check why they are fast, not how fast).

    python benchmarks/startup.py

- `sdrt --help` as a new process (the installed console script), best and median of 10; and the
  import of sdrt.cli.app alone. The tests check that it imports neither ONNX Runtime nor PyTorch.
- prompt_chunks on an A1111-style prompt with emphasis, median of 200 calls, with the embedded
  model's tokenizer. The tests check that a prompt is one call into the Rust tokenizer.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("masterpiece, best quality, (a photograph:1.2) of an astronaut riding a [horse] on the moon, "
          "highly detailed, 8k")


def main() -> None:
    sdrt = Path(sys.executable).with_name("sdrt")
    walls = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run([str(sdrt), "--help"], capture_output=True, check=True)
        walls.append(time.perf_counter() - t)
    code = "import time; t = time.perf_counter(); import sdrt.cli.app; print(time.perf_counter() - t)"
    imports = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
               for _ in range(5)]
    print(f"sdrt --help, new process: best {1e3 * min(walls):.0f} ms, median {1e3 * statistics.median(walls):.0f} ms")
    print(f"import sdrt.cli.app: median {1e3 * statistics.median(imports):.0f} ms")

    from sdrt.models import default_model_path
    from sdrt.runtime.text import ClipTokenizer, prompt_chunks

    tok = ClipTokenizer.from_folder(default_model_path() / "tokenizer")
    times = []
    for _ in range(200):
        t = time.perf_counter()
        prompt_chunks(PROMPT, tok)
        times.append(time.perf_counter() - t)
    print(f"prompt_chunks ({len(PROMPT)} characters, with emphasis): median {1e6 * statistics.median(times):.0f} us")


if __name__ == "__main__":
    main()
