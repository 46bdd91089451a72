"""Small generated data for smoke runs, benchmarks and tests: noise patches written the way the
preprocessing writes them, CT-like patches of the real size for the benchmarks, and a trivially
learnable labelled task. Look-alike DeepLesion and labelled phantoms are in
preprocessing/synthetic_deeplesion.py."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np

# A configuration small enough for CPU tests: res3d10, 64 x 64 x 16 global views, heads 256 wide
# (checkpoints of 0.2 GB instead of 0.5 GB).
TINY_TRAIN_ARGS = [
    "--arch", "res3d10", "--out_dim", "64", "--batch_size_per_gpu", "2", "--global_crop_size", "64",
    "--local_crop_size", "48", "--crop_depth", "16", "--num_workers", "0", "--device", "cpu",
    "--use_fp16", "False", "--print_freq", "1", "--warmup_epochs", "1", "--lr", "0.05",
    "--head_hidden_dim", "256",
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


REAL_PATCH = (286, 286, 24)  # nibabel (x, y, z) of a typical DeepLesion patch after the 80% crop


def make_patch_set(root: str, n: int, ext: str, shape=REAL_PATCH, seed: int = 0) -> str:
    """n int16 CT-like patches (a smooth body with noise) and their list file, once; returns
    the list file's name, relative to root."""
    list_name = f"list{ext.replace('.', '_')}.txt"
    list_path = os.path.join(root, list_name)
    if os.path.exists(list_path):
        return list_name
    os.makedirs(os.path.join(root, "DL_patches_v2"), exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = np.where(x**2 / 0.8 + y**2 / 0.5 < 1, 40.0, -1000.0)
    names = []
    for i in range(n):
        vol = body[..., None] + rng.normal(0, 20, shape)
        name = f"DL_patches_v2/bench_{i:04d}_dep0{ext}"
        nib.save(nib.Nifti1Image(vol.astype(np.int16), np.eye(4)), os.path.join(root, name))
        names.append(name)
    with open(list_path, "w") as f:
        f.write("\n".join(names) + "\n")
    return list_name


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
