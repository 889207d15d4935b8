#!/usr/bin/env bash
# GPU check (make gpu-check): the CUDA tests and the GPU benchmark, under 8 minutes, without
# network.  Runs on a machine with an NVIDIA GPU and a CUDA build of PyTorch.
#
#   1. on a machine with network access, same Python version/platform:  make wheelhouse
#   2. copy the repository (with wheelhouse/ and ../shared/reference) to the GPU machine
#   3. there:  make gpu-check        (results: benchmarks/results/gpu.md, gpu.json)
#
# Environment: PYTHON (default python3; must import a CUDA torch), GPU_VENV (default
# .venv-gpu; created with --system-site-packages so the machine's torch is used),
# WHEELHOUSE (default wheelhouse), VPR_SHARED_DIR (fixtures, default ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-.venv-gpu}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
start=$(date +%s)

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: $PYTHON cannot import a CUDA build of torch with a visible GPU" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
if [ -d "$WHEELHOUSE" ]; then
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" -r requirements-gpu-check.txt
fi
if ! "$PY" -c "import vpr_ros" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
fi
"$PY" -c "import torch; print('gpu-check:', torch.__version__, torch.cuda.get_device_name(0))"

timeout 240 "$PY" -m pytest -q -ra -p no:cacheprovider test/test_cuda.py \
  "test/test_rerank.py::test_cuda_equals_cpu"
timeout 300 "$PY" benchmarks/bench_gpu.py --repeats 10 --out "${OUT:-benchmarks/results}"
echo "gpu-check: done in $(( $(date +%s) - start )) s"
