#!/bin/bash
# One prepared run on a lent GPU machine (see docs/performance.md): the training-step figures,
# the loader with 8 workers and the augmentation on the GPU, and two short end-to-end runs that
# show whether the training loop waits for data. Results go to $OUT (or ./gpu_results).
# Needs nibabel and MONAI: carried as wheels in .whl/ when the machine has none.
#   STEP=0      skips the training-step figures (about 3 minutes)
#   PATCHES=N   generated patches for the loader figures (default 96)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project is not installed there: its root on the path
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, nibabel; print('torch', torch.__version__, 'nibabel', nibabel.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

echo "== smoke: CUDA pretraining with the views and augmentation on the GPU, then fine-tuning"
timeout 150 python3 benchmarks/gpu_smoke.py 2>&1 | grep -vE "^\s*$" | tail -n 5 | tee "$OUT/smoke.txt"

if [ "${STEP:-1}" != 0 ]; then
echo "== training step, res3d50, batch 32, 2 x 16x96x96, out_dim 60000"
(cd benchmarks && timeout 200 python3 bench_train_step.py --device cuda --arch res3d50 --batch 32 \
  --precision fp32 tf32 bf16 --channels_last False True --steps 10 --warmup 3) 2>&1 | tee "$OUT/train_step.txt" | grep -v "^{'arch"
fi

echo "== loader, 8 workers, augmentation on the GPU"
(cd benchmarks && timeout 120 python3 bench_loader.py --root /tmp/bench --patches ${PATCHES:-96} --samples 400 --workers 8 --aug_device cuda) 2>&1 | tee "$OUT/loader.txt"

echo "== end to end: main_desd, res3d50, batch 32, bf16, 8 workers"
for i in $(seq 20); do cat /tmp/bench/list_nii.txt; done > /tmp/bench/list_e2e.txt
for dev_aug in True False; do
  timeout 100 python3 main_desd.py --data_path /tmp/bench --list_path list_e2e.txt --output_dir "/tmp/e2e_$dev_aug" \
    --arch res3d50 --batch_size_per_gpu 32 --epochs 1 --max_iters_per_epoch 30 --num_workers 8 --device cuda \
    --use_fp16 False --use_bf16 True --augment_on_device "$dev_aug" --optimizer sgd --lr 0.3 --clip_grad 0 \
    --use_bn_in_head True --print_freq 10 2>&1 | grep -E "Epoch|Averaged|Error|error" | tee "$OUT/e2e_devaug_$dev_aug.txt"
done
