"""Label maps back on an input grid finer than the network's: the argmax moved by nearest
neighbour, against the class probabilities resampled (linear) before the argmax, as nnU-Net
does (predict.to_input_grid). Dice against the exact fine-grid truth, time and peak memory.

A tiny network is fine-tuned at 2 mm on generated cases stored at 0.5 mm (ellipsoids brighter
than their noise), then predicts held-out 0.5 mm cases both ways.

    python benchmarks/bench_prediction_resampling.py --out /tmp/bench_resampling
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from common import report  # noqa: I001

import finetune
import predict
from downstream import labelled

SPACING, SHAPE = 0.5, (192, 192, 96)  # the stored grid: 96 x 96 x 48 mm


def write_case(path_image: str, path_label: str, rng: np.random.Generator) -> None:
    """An ellipsoid (label 1) of random centre and radii, 300 HU above noise of sd 20."""
    x, y, z = np.meshgrid(*[(np.arange(n) + 0.5) * SPACING for n in SHAPE], indexing="ij")
    centre = rng.uniform([35, 35, 20], [61, 61, 28])
    radii = rng.uniform([10, 10, 8], [22, 22, 14])
    inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 <= 1
    image = (rng.normal(0, 20, SHAPE) + 300.0 * inside).astype(np.int16)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    nib.save(nib.Nifti1Image(image, affine), path_image)
    nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), path_label)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_resampling", help="Working folder.")
    parser.add_argument("--cases", default=8, type=int, help="Generated cases; the last two are predicted.")
    args = parser.parse_args()
    task = os.path.join(args.out, "task")
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(task, sub), exist_ok=True)
    training = []
    for i in range(args.cases):
        write_case(os.path.join(task, "imagesTr", f"e{i}.nii.gz"), os.path.join(task, "labelsTr", f"e{i}.nii.gz"), rng)
        training.append({"image": f"./imagesTr/e{i}.nii.gz", "label": f"./labelsTr/e{i}.nii.gz"})
    with open(os.path.join(task, "dataset.json"), "w") as f:
        json.dump({"labels": {"0": "background", "1": "ellipsoid"}, "training": training}, f)
    held_out = [f"e{i}" for i in range(args.cases - 2, args.cases)]
    with open(os.path.join(args.out, "split.json"), "w") as f:
        json.dump({"train": [f"e{i}" for i in range(args.cases - 2)], "val": held_out}, f)
    run = os.path.join(args.out, "run")
    if not os.path.isfile(os.path.join(run, "best.pth")):
        ft = argparse.ArgumentParser(parents=[finetune.get_args_parser()]).parse_args(
            ["--data_dir", task, "--output_dir", run, "--arch", "res3d10", "--spacing", "2", "--patch_size", "16", "48", "48",
             "--epochs", "6", "--num_workers", "0", "--device", "cpu", "--lr", "1e-3", "--split_file", os.path.join(args.out, "split.json"),
             "--preprocessed_dir", os.path.join(args.out, "cache")]
        )  # fmt: skip
        finetune.main(ft)
    model, run_args = predict.load_model(run, torch.device("cpu"))
    rows = []
    for case in held_out:
        path = os.path.join(task, "imagesTr", f"{case}.nii.gz")
        truth = np.asanyarray(nib.load(os.path.join(task, "labelsTr", f"{case}.nii.gz")).dataobj).astype(bool)
        item = labelled.preprocessing(2.0, keys=("image",), grid_only=True)
        from monai.transforms import Compose

        item = Compose(item)({"image": path})
        grid_affine = item["image"].affine
        image = Compose(labelled.network_layout(("image",)))(item)["image"]
        probs = predict.segment(model, image[None], tuple(run_args["patch_size"]))[0].numpy()
        row = {"case": case}
        for name, flag in (("labels_nearest", False), ("probabilities_linear", True)):
            start = time.perf_counter()
            out = predict.to_input_grid(probs, grid_affine, item["image_input_grid"], path, resample_probabilities=flag)
            row[f"{name}_seconds"] = round(time.perf_counter() - start, 4)
            pred = sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(bool)  # (x, y, z) as nibabel reads the truth
            row[f"{name}_dice"] = round(dice(pred, truth), 4)
        rows.append(row)
    print(f"peak RSS of the whole run (training included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    report("prediction resampling, 0.5 mm input, 2 mm network", rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
