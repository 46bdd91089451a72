"""Shared fixtures: tiny patch sets written the way the preprocessing writes them."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


@pytest.fixture
def patch_root(tmp_path):
    return write_patches(str(tmp_path / "data"))


def run_main_desd(argv: list[str]) -> None:
    """Run main_desd in this process with the given command line."""
    import argparse

    import main_desd

    parser = argparse.ArgumentParser("DeSD", parents=[main_desd.get_args_parser()])
    main_desd.train_desd(parser.parse_args(argv))
