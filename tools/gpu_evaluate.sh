#!/bin/sh
# The GPU-sized experiment (evaluate.py --config gpu: res3d50, 96 x 96 x 16 views at 1 mm, the
# published SGD recipe at one GPU's batch of 32) on one H100/H200, prepared for a machine whose
# Python has torch but not SimpleITK, nibabel or MONAI: wheels placed in .whl/ are installed first.
#   sh tools/gpu_evaluate.sh [OUT]      (results in OUT, default evidence_gpu)
set -e
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project is not installed there
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
OUT=${1:-evidence_gpu}
PYTHONUNBUFFERED=1 python3 evaluate.py --config gpu --out "$OUT" --figure "$OUT/evidence.png"
