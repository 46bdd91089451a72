"""Preprocessing throughput: seconds per sub-volume of real size for each of the three
scripts, on one core (one process, SimpleITK on one thread).

The input is generated: synthetic series of 512 x 512 16-bit PNG slices in DeepLesion's layout,
one run of --slices consecutive slices each, at DeepLesion-like spacing.

    python benchmarks/bench_preprocessing.py --volumes 3 --slices 60
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import SimpleITK as sitk
from common import report

from preprocessing import DL_save_nifti as s1
from preprocessing import re_spacing_ITK as s2
from preprocessing import splitting_to_patches as s3
from preprocessing.synthetic_deeplesion import Phantom, scanner, write_png


def make_series(root: str, volumes: int, slices: int, size: int = 512) -> dict[str, str]:
    """`volumes` series folders of one run each; returns {folder: spacing text}."""
    rng = np.random.default_rng(0)
    spacing = {}
    for v in range(volumes):
        phantom = Phantom(rng, style="portal")  # the phantoms of the recorded figures
        px, interval = phantom.series_spacing(size), 1.25
        folder = f"{v + 1:06d}_01_01"
        os.makedirs(os.path.join(root, "Images_png", folder))
        start = rng.uniform(100, 200)
        for i in range(slices):
            hu, _ = phantom.render(start + i * interval, size, px)
            write_png(os.path.join(root, "Images_png", folder, f"{i + 1:03d}.png"), scanner(hu, px, 15, rng))
        spacing[folder] = f"{px}, {px}, {interval}"
    return spacing


def main() -> None:
    parser = argparse.ArgumentParser("preprocessing benchmark")
    parser.add_argument("--volumes", default=3, type=int)
    parser.add_argument("--slices", default=60, type=int, help="Slices per sub-volume (DeepLesion's average is about 50).")
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    with tempfile.TemporaryDirectory() as root:
        spacing = make_series(root, args.volumes, args.slices)
        dirs = {k: os.path.join(root, k) for k in ("Images_png", "Images_nifti", "Images_nifti_spacing", "DL_patches_v2")}
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
        rows = []
        timings = {}
        start = time.perf_counter()
        for folder in sorted(spacing):
            s1.convert_series(folder, dirs["Images_png"], dirs["Images_nifti"], spacing)
        timings["DL_save_nifti"] = time.perf_counter() - start
        names = sorted(os.listdir(dirs["Images_nifti"]))
        start = time.perf_counter()
        for name in names:
            s2.resample_file(name, dirs["Images_nifti"], dirs["Images_nifti_spacing"])
        timings["re_spacing_ITK"] = time.perf_counter() - start
        for ext in (".nii.gz", ".nii"):
            start = time.perf_counter()
            for name in names:
                s3.split_file(name, dirs["Images_nifti_spacing"], dirs["DL_patches_v2"], ext)
            timings[f"splitting_to_patches ({ext})"] = time.perf_counter() - start
        shape = sitk.ReadImage(os.path.join(dirs["Images_nifti_spacing"], names[0])).GetSize()
        for step, seconds in timings.items():
            rows.append({"step": step, "s/volume (1 core)": round(seconds / len(names), 2), "volumes": len(names)})
    print(f"input: {args.volumes} series of {args.slices} slices of 512 x 512; first volume at 1 mm: {shape}")
    report("preprocessing s/volume", rows, ["step", "s/volume (1 core)", "volumes"])


if __name__ == "__main__":
    main()
