#!/bin/sh
# Predict label maps with a fine-tuned model, in each input's own geometry.
#
# Settings from the environment (defaults in brackets):
#   MODEL [snapshots/finetune_res3d50_desd: a fine-tuning output folder or its best.pth]
#   INPUT [data/Task03_Liver: an image, a folder of images, or a dataset folder (its imagesTs/)]
#   OUTPUT [$MODEL/predictions]  PYTHON [python]
# Extra arguments are passed on to predict.py, e.g. --tta
set -e
here=$PWD  # paths given relative to the caller's folder stay so after the cd below
abs() { case "$1" in "" | /*) printf '%s' "$1" ;; *) printf '%s/%s' "$here" "$1" ;; esac; }
if [ -n "${MODEL:-}" ]; then MODEL=$(abs "$MODEL"); fi
if [ -n "${INPUT:-}" ]; then INPUT=$(abs "$INPUT"); fi
if [ -n "${OUTPUT:-}" ]; then OUTPUT=$(abs "$OUTPUT"); fi
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-snapshots/finetune_res3d50_desd}
INPUT=${INPUT:-data/Task03_Liver}
OUTPUT=${OUTPUT:-$([ -d "$MODEL" ] && echo "$MODEL" || dirname "$MODEL")/predictions}
$PYTHON predict.py --model "$MODEL" --input "$INPUT" --output "$OUTPUT" "$@"
