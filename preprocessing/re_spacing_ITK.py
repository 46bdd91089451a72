"""Resample NIfTI sub-volumes to 1 x 1 x 1 mm (SPEC section 2.2).

Order of operations: read with SimpleITK; clip to [-1024, 1024] HU; resample with cubic
B-spline interpolation onto a grid with the same origin and direction and 1 mm spacing, of
size input size x spacing per axis (depth, the third SimpleITK axis, rounded; the in-plane
axes truncated, as in the reference); round to int16; write under the same file name.

    python preprocessing/re_spacing_ITK.py --data_root data/DeepLesion --workers 8
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import JobResult, remove_stale_partials, run_jobs, summarise, write_atomic  # noqa: E402

HU_RANGE = (-1024, 1024)


def target_size(size: tuple[int, int, int], spacing: tuple[float, float, float], new_spacing: float = 1.0) -> list[int]:
    """(x, y, z) size on the new grid: x and y truncated, z rounded (the reference's choice)."""
    x, y, z = (n * s / new_spacing for n, s in zip(size, spacing))
    return [max(int(x), 1), max(int(y), 1), max(int(round(z)), 1)]


def resample_volume(image: sitk.Image, new_spacing: float = 1.0, hu_range=HU_RANGE) -> sitk.Image:
    """Clip, then resample to isotropic `new_spacing` mm with cubic B-splines; int16 out."""
    clipped = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, float(hu_range[0]), float(hu_range[1]))
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing([new_spacing] * 3)
    resampler.SetSize(target_size(image.GetSize(), image.GetSpacing(), new_spacing))
    resampler.SetOutputOrigin(image.GetOrigin())
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkBSpline)
    resampler.SetDefaultPixelValue(float(hu_range[0]))
    out = resampler.Execute(clipped)
    arr = np.rint(sitk.GetArrayFromImage(out)).clip(-32768, 32767).astype(np.int16)
    result = sitk.GetImageFromArray(arr)
    result.CopyInformation(out)
    return result


def resample_file(name: str, in_dir: str, out_dir: str) -> JobResult:
    result = JobResult(name=name)
    out_path = os.path.join(out_dir, name)
    if os.path.exists(out_path):
        result.skipped.append(name)
        return result
    in_path = os.path.join(in_dir, name)
    try:
        image = sitk.ReadImage(in_path)
    except RuntimeError as err:
        raise ValueError(f"{in_path}: unreadable NIfTI ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3:
        raise ValueError(f"{in_path}: expected a 3-D volume, got {image.GetDimension()}-D")
    resampled = resample_volume(image)
    write_atomic(out_path, lambda tmp: sitk.WriteImage(resampled, tmp, useCompression=tmp.endswith(".gz")))
    result.written.append(name)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Resample to 1 mm", add_help=False)
    parser.add_argument("--data_root", default="data/DeepLesion", help="Folder holding Images_nifti/.")
    parser.add_argument("--in_dir", default=None, help="Default: <data_root>/Images_nifti.")
    parser.add_argument("--out_dir", default=None, help="Default: <data_root>/Images_nifti_spacing.")
    parser.add_argument("--workers", default=os.cpu_count() or 1, type=int, help="Parallel processes.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser("Resample to 1 mm", parents=[get_args_parser()]).parse_args(argv)
    in_dir = args.in_dir or os.path.join(args.data_root, "Images_nifti")
    out_dir = args.out_dir or os.path.join(args.data_root, "Images_nifti_spacing")
    if not os.path.isdir(in_dir):
        raise SystemExit(f"input folder {in_dir!r} does not exist: run DL_save_nifti.py first")
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_partials(out_dir)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1 if args.workers > 1 else os.cpu_count() or 1)
    names = sorted(f for f in os.listdir(in_dir) if f.endswith((".nii.gz", ".nii")) and not f.startswith("."))
    results = run_jobs(functools.partial(resample_file, in_dir=in_dir, out_dir=out_dir), names, args.workers, "resample 1 mm")
    return summarise(results, f"volumes in {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
