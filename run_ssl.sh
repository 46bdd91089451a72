#!/bin/sh
# DeSD pretraining with the published hyperparameters (6 GPUs x 32 patches, 300 epochs), which
# recipes/desd_res3d50.json holds (desd-pretrain --config recipes/desd_res3d50.json reads the same file).
#
# Settings from the environment (defaults in brackets):
#   DATA_PATH [data/DeepLesion]  LIST_PATH [SSL_data_deeplesion.txt]  OUTPUT_DIR [snapshots/DeSD_res3d50]
#   NPROC_PER_NODE [number of GPUs, or 1 process on the CPU when there is none]
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]
#   MASTER_PORT [a free port on one node, so that two runs on one machine do not collide; 29500 on several]
#   MAX_RESTARTS [0]: torchrun restarts the workers this many times after a failure; each
#                     restart resumes from OUTPUT_DIR/checkpoint.pth.
#   PYTHON [python]
# Extra arguments are passed on to main_desd.py and override the values below, e.g.
#   sh run_ssl.sh --batch_size_per_gpu 16 --num_workers 8
set -e
here=$PWD  # paths given relative to the caller's folder stay so after the cd below
abs() { case "$1" in "" | /*) printf '%s' "$1" ;; *) printf '%s/%s' "$here" "$1" ;; esac; }
if [ -n "${DATA_PATH:-}" ]; then DATA_PATH=$(abs "$DATA_PATH"); fi
if [ -n "${OUTPUT_DIR:-}" ]; then OUTPUT_DIR=$(abs "$OUTPUT_DIR"); fi
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
DATA_PATH=${DATA_PATH:-data/DeepLesion}
LIST_PATH=${LIST_PATH:-SSL_data_deeplesion.txt}
OUTPUT_DIR=${OUTPUT_DIR:-snapshots/DeSD_res3d50}
GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [ -z "$MASTER_PORT" ]; then
  if [ "$NNODES" -eq 1 ]; then
    MASTER_PORT=$($PYTHON -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  else
    MASTER_PORT=29500  # every node must name the same port
  fi
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
DEVICE=$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)
mkdir -p "$OUTPUT_DIR"

$PYTHON -m preprocessing.runner \
  --nproc_per_node="$NPROC_PER_NODE" \
  --nnodes="$NNODES" \
  --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" \
  --max_restarts="$MAX_RESTARTS" \
  main_desd.py \
  --config recipes/desd_res3d50.json \
  --data_path "$DATA_PATH" \
  --list_path "$LIST_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --device "$DEVICE" \
  "$@"
