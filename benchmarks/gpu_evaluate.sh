#!/bin/sh
# The experiment scaled up for one H100/H200 (evaluate.py --config gpu: 32 phantoms at 1 mm, res3d18,
# batch 64 of 96 x 96 x 16 views in bf16 with the intensity chain on the device; DeSD and DINO x 3
# seeds as 6 concurrent pretraining processes of 300 steps, then 12 concurrent fine-tunings with 1
# and 4 labelled cases, 2 draws, scored at 50 to 400 steps) within one 9-minute call. evaluate.py
# keeps its own 500 s clock and refuses (exit 2, naming the shortfall) rather than shrink the
# schedule when the timed first epochs of the real runs project past it. Data already in OUT
# (DeepLesion/, Labelled/) are used as they are. Prepared for a machine whose Python has torch
# but not SimpleITK, nibabel or MONAI: wheels placed in .whl/ are installed first.
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
