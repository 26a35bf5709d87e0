#!/usr/bin/env bash
# Install sdrt's GPU dependencies on a machine without network, from wheels carried in parts.
#
#   bash scripts/gpu-install.sh          # reassemble .gpu/part*/chunk.* into the onnxruntime-gpu wheel, install it
#                                        # and the wheels in .gpu/small into /tmp/site, make sdrt importable there
#   bash scripts/gpu-install.sh --link   # only make this checkout's sdrt importable from /tmp/site (later calls)
#
# Then: PYTHONPATH=/tmp/site python3 ...   (docs/gpu.md is the whole runbook)
set -euo pipefail
site=${SDRT_SITE:-/tmp/site}
mkdir -p "$site/sdrt"
# sdrt's folders are packages sdrt.<folder> (pyproject.toml's package-dir): link them under $site/sdrt.
for d in runtime schedulers export cli models; do ln -sfn "$PWD/$d" "$site/sdrt/$d"; done
if [ "${1:-}" != "--link" ]; then
  name="$(cat .gpu/small/ORT_WHEEL_NAME)"
  mkdir -p /tmp/wheels
  cat .gpu/part*/chunk.* > "/tmp/wheels/$name"
  cp .gpu/small/*.whl /tmp/wheels/ 2>/dev/null || true
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" /tmp/wheels/*.whl
  for d in runtime schedulers export cli models; do ln -sfn "$PWD/$d" "$site/sdrt/$d"; done
fi
PYTHONPATH="$site" python3 - <<'PY'
import onnxruntime as ort
ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* pip packages beside PyTorch
import sdrt.runtime
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu is not the onnxruntime imported"
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
