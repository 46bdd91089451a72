#!/bin/sh
# The experiment scaled up for one H100/H200 (evaluate.py --config gpu: 32 phantoms at 1 mm, res3d18,
# batch 64 of 96 x 96 x 16 views in bf16 with the intensity chain on the device, 2 pretraining seeds
# per method, fine-tuning with 1 and 4 labelled cases logged at several step counts) within 8
# minutes: evaluate.py keeps its own 7-minute clock, sets the step counts from timed first steps and
# writes what finished if time runs out. Prepared for a machine whose Python has torch but not
# SimpleITK, nibabel or MONAI: wheels placed in .whl/ are installed first.
#   sh benchmarks/gpu_evaluate.sh [OUT]      (results in OUT, default evidence_gpu)
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
