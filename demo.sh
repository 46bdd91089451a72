#!/bin/sh
# The whole pipeline on generated data, on the CPU: synthetic DeepLesion -> the three
# preprocessing scripts -> a short DeSD pretraining of res3d50 through run_ssl.sh -> fine-tuning
# on generated labelled CT from the demo's teacher and from scratch, Dice side by side, and a
# prediction with the fine-tuned model.
# Run by `make demo`; PYTHON is the interpreter of the project's virtual environment.
set -e
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
DATA=demo_data/DeepLesion
TASK=demo_data/Task01_SyntheticAbdomen
OUT=demo_output
WORKERS=${WORKERS:-2}
START=$(date +%s)

echo "== 1/6 generating a synthetic DeepLesion and a labelled set"
$PYTHON preprocessing/synthetic_deeplesion.py --out "$DATA" --patients 3 --context_mm 24 --seed 0 \
  --msd_dir "$TASK" --msd_cases 10 --msd_size 128 --msd_slices 48

echo "== 2/6 PNG -> NIfTI"
$PYTHON preprocessing/DL_save_nifti.py --data_root "$DATA" --workers "$WORKERS"
echo "== 3/6 resampling to 1 mm"
$PYTHON preprocessing/re_spacing_ITK.py --data_root "$DATA" --workers "$WORKERS"
echo "== 4/6 splitting into 24-slice patches"
$PYTHON preprocessing/splitting_to_patches.py --data_root "$DATA" --workers "$WORKERS" --ext .nii
$PYTHON tools/demo_figure.py --data_root "$DATA" --out "$OUT/demo.png"

echo "== 5/6 DeSD pretraining (res3d50, published flags, a CPU-sized budget)"
echo "   Expected here, from the budget and not a fault: two WARNINGs, a peak learning rate below --min_lr"
echo "   (lr 0.3 x batch 2 / 256) and a teacher that keeps most of its random initialisation over 24 steps."
rm -rf "$OUT/pretrain"
PYTHON=$PYTHON DATA_PATH=$DATA OUTPUT_DIR=$OUT/pretrain NPROC_PER_NODE=1 sh run_ssl.sh \
  --device cpu --epochs 2 --max_iters_per_epoch 12 --batch_size_per_gpu 2 --num_workers "$WORKERS" \
  --out_dim 8192 --warmup_epochs 1 --warmup_teacher_temp_epochs 1 --saveckp_freq 0 --print_freq 4
# the demo keeps only the teacher backbone it fine-tunes from (the run's state is ~1 GB)
$PYTHON tools/export_teacher.py "$OUT/pretrain/checkpoint.pth" "$OUT/pretrain/teacher.pth"
rm -f "$OUT/pretrain/checkpoint.pth" "$OUT/pretrain/checkpoint.prev.pth"

echo "== 6/6 fine-tuning from the demo teacher and from scratch (same budget)"
for run in pretrained scratch; do
  rm -rf "$OUT/ft_$run"
  PRETRAINED=$([ $run = pretrained ] && echo "$OUT/pretrain/teacher.pth" || echo "")
  $PYTHON finetune.py --data_dir "$TASK" --output_dir "$OUT/ft_$run" --arch res3d50 ${PRETRAINED:+--pretrained "$PRETRAINED"} \
    --device cpu --spacing 2.5 --patch_size 32 96 96 --epochs 4 --max_iters_per_epoch 6 --batch_size 1 \
    --eval_every 4 --num_workers "$WORKERS" --lr 3e-4 --preprocessed_dir demo_data/finetune_cache
  rm -f "$OUT/ft_$run/checkpoint.pth"  # resume state; best.pth and dice.json stay
done

echo
echo "Dice on the validation cases (synthetic labels; a CPU-sized budget, so expect small numbers):"
$PYTHON tools/compare_dice.py "pretrained=$OUT/ft_pretrained/dice.json" "scratch=$OUT/ft_scratch/dice.json"
echo
echo "== prediction: a label map for one case, in that case's own geometry"
$PYTHON predict.py --model "$OUT/ft_pretrained" --input "$TASK/imagesTr/synth_000.nii.gz" --output "$OUT/predictions" --device cpu
echo
echo "Teacher backbone: $(pwd)/$OUT/pretrain/teacher.pth (key 'teacher'); picture: $OUT/demo.png"
echo "Demo took $(( $(date +%s) - START )) s; it keeps $(du -sh "$OUT" | cut -f1) in $OUT and $(du -sh demo_data | cut -f1) in demo_data."
