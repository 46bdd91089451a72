"""Tiny generated data for smoke runs, benchmarks and tests: noise patches written the way the
preprocessing writes them, and a trivially learnable labelled task."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np

# A configuration small enough for CPU tests: res3d10, 64 x 64 x 16 global views.
TINY_TRAIN_ARGS = [
    "--arch", "res3d10", "--out_dim", "64", "--batch_size_per_gpu", "2", "--global_crop_size", "64",
    "--local_crop_size", "48", "--crop_depth", "16", "--num_workers", "0", "--device", "cpu",
    "--use_fp16", "False", "--print_freq", "1", "--warmup_epochs", "1", "--lr", "0.05",
]  # fmt: skip


def write_patches(root: str, n: int = 6, shape=(80, 70, 20), seed: int = 0, ext: str = ".nii.gz") -> str:
    """n int16 patches of HU-like noise in root/DL_patches_v2 and the list file; returns root."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "DL_patches_v2"), exist_ok=True)
    names = []
    for i in range(n):
        arr = rng.normal(0, 300, shape).clip(-1024, 1024).astype(np.int16)
        name = f"DL_patches_v2/{i:06d}_01_01_000-019_dep0{ext}"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), os.path.join(root, name))
        names.append(name)
    with open(os.path.join(root, "SSL_data_deeplesion.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return root


def write_cube_task(root, n=5):
    """A trivially learnable task: a bright box (label 1) on a noisy background."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "imagesTr"))
    os.makedirs(os.path.join(root, "labelsTr"))
    training = []
    for i in range(n):
        lab = np.zeros((48, 48, 24), np.uint8)
        x, y, z = rng.integers(4, 20, 3)
        lab[x : x + 20, y : y + 20, z // 2 : z // 2 + 10] = 1
        img = (rng.normal(0, 20, lab.shape) + 300.0 * lab).astype(np.int16)
        for sub, arr in (("imagesTr", img), ("labelsTr", lab)):
            nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), os.path.join(root, sub, f"c{i}.nii.gz"))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": {"0": "background", "1": "box"}, "training": training}, f)
