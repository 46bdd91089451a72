#!/bin/sh
# Fine-tune a res3d50 segmentation network from a DeSD teacher (or from scratch) on a
# Decathlon-layout data set, through torchrun on every GPU of this node (or one CPU process).
#
# Settings from the environment (defaults in brackets):
#   DATA_DIR [data/Task03_Liver]  PRETRAINED [snapshots/DeSD_res3d50/checkpoint.pth; empty: from scratch]
#   OUTPUT_DIR [snapshots/finetune_res3d50_desd, or ..._scratch without PRETRAINED: each run its own folder]
#   NPROC_PER_NODE [number of GPUs, or 1]  NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]
#   MASTER_PORT [a free port on one node; 29501 on several]  PYTHON [python]
# Extra arguments are passed on to finetune.py, e.g. --train_fraction 0.1 --epochs 200
set -e
here=$PWD  # paths given relative to the caller's folder stay so after the cd below
abs() { case "$1" in "" | /*) printf '%s' "$1" ;; *) printf '%s/%s' "$here" "$1" ;; esac; }
if [ -n "${DATA_DIR:-}" ]; then DATA_DIR=$(abs "$DATA_DIR"); fi
if [ -n "${OUTPUT_DIR:-}" ]; then OUTPUT_DIR=$(abs "$OUTPUT_DIR"); fi
if [ -n "${PRETRAINED:-}" ]; then PRETRAINED=$(abs "$PRETRAINED"); fi
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-data/Task03_Liver}
PRETRAINED=${PRETRAINED-snapshots/DeSD_res3d50/checkpoint.pth}
OUTPUT_DIR=${OUTPUT_DIR:-snapshots/finetune_res3d50_$([ -n "$PRETRAINED" ] && echo desd || echo scratch)}
GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}
DEVICE=$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)
if [ -z "$MASTER_PORT" ]; then
  if [ "${NNODES:-1}" -eq 1 ]; then
    MASTER_PORT=$($PYTHON -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  else
    MASTER_PORT=29501  # every node must name the same port
  fi
fi

$PYTHON -m preprocessing.runner \
  --nproc_per_node="$NPROC_PER_NODE" \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="$MASTER_PORT" \
  finetune.py \
  --data_dir "$DATA_DIR" \
  --output_dir "$OUTPUT_DIR" \
  --pretrained "$PRETRAINED" \
  --arch res3d50 \
  --device "$DEVICE" \
  --spacing 1.0 \
  --patch_size 64 128 128 \
  "$@"
