"""Resample NIfTI sub-volumes to 1 x 1 x 1 mm (docs/method.md, section 2.2).

Order of operations: check that the file is whole; read with SimpleITK; clip to
[-1024, 1024] HU; resample with cubic B-splines at the reference's sampling positions; clip
to the clipped input's range; round to int16; write under the same file name.

Sampling positions. Output size per axis is input size x spacing (depth, the third
SimpleITK axis, rounded; the in-plane axes truncated, as in the reference). The reference
resizes the array edge-aligned (skimage's resize): output voxel i of n_out samples input
index (i + 0.5) * n_in / n_out - 0.5, so the output covers exactly the input's extent and no
output voxel lies beyond it. We sample the same positions, and the saved geometry says where
they are: spacing = input extent / n_out per axis (1 mm up to the rounding of the size) and
origin = the physical position of the first sample; direction unchanged. The half voxel
beyond the outermost input samples is interpolated with the volume mirrored at its edge (the
boundary of ITK's B-spline and of skimage's resize), and the result is clipped to the input's
range, as skimage's resize clips, which also holds axes of 1 to 4 samples in range.

The resampling is separable (preprocessing/resample.py): a prefilter and 4 taps per axis in
float32 blocks, the values of SimpleITK's cubic B-spline at these positions to float32
rounding, several times faster on one core and with no axis too short for it.

    python preprocessing/re_spacing_ITK.py --data_root data/DeepLesion --workers 8
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from preprocessing.files import remove_stale_partials, write_atomic
from preprocessing.network_input import HU_RANGE
from preprocessing.resample import edge_aligned_positions, resample_axes
from preprocessing.runner import (
    JobResult,
    command_parser,
    entry,
    make_output_dir,
    nifti_problem,
    positive_float,
    run_command,
    run_jobs,
    spacing_warnings,
    summarise,
)

MAX_SIDE = 1024  # a resampled axis longer than this is seldom a CT sub-volume


def target_size(size: tuple[int, int, int], spacing: tuple[float, float, float], new_spacing: float = 1.0) -> list[int]:
    """(x, y, z) size on the new grid: x and y truncated, z rounded, of size x spacing ratio
    with the ratio rounded to 4 decimals, as the reference computes it (so a float32 spacing
    of 0.7 gives 40 -> 28, not 27)."""
    x, y, z = (n * round(s / new_spacing, 4) for n, s in zip(size, spacing))
    return [max(int(x), 1), max(int(y), 1), max(int(round(z)), 1)]


def output_grid(image: sitk.Image, new_spacing: float = 1.0) -> tuple[list[int], list[float], tuple[float, ...]]:
    """(size, spacing, origin) of the edge-aligned output grid (see the module docstring)."""
    n_in, spacing = image.GetSize(), image.GetSpacing()
    n_out = target_size(n_in, spacing, new_spacing)
    out_spacing = [n * s / m for n, s, m in zip(n_in, spacing, n_out)]
    shift = [(0.5 * n / m - 0.5) * s for n, s, m in zip(n_in, spacing, n_out)]  # first sample, in input index units x spacing
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = tuple(float(v) for v in np.array(image.GetOrigin()) + direction @ np.array(shift))
    return n_out, out_spacing, origin


def resample_volume(image: sitk.Image, new_spacing: float = 1.0, hu_range=HU_RANGE) -> sitk.Image:
    """Clip, then resample to `new_spacing` mm with cubic B-splines on the edge-aligned grid
    (separably, mirrored at the edges: the values of SimpleITK's B-spline and of the
    reference's resize); int16 out, within the clipped input's range. Non-finite voxels count as
    the lower bound (air)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (z, y, x)
    arr = np.clip(np.nan_to_num(arr, copy=False, nan=hu_range[0], posinf=hu_range[1], neginf=hu_range[0]), *hu_range)
    low, high = float(arr.min()), float(arr.max())
    size, spacing, origin = output_grid(image, new_spacing)
    positions = [edge_aligned_positions(n, m) for n, m in zip(arr.shape, size[::-1])]
    out = resample_axes(arr, positions, order=3, mode="mirror")
    result = sitk.GetImageFromArray(np.rint(np.clip(out, low, high, out=out)).astype(np.int16))
    result.SetSpacing(spacing)
    result.SetOrigin(origin)
    result.SetDirection(image.GetDirection())
    return result


def resample_file(name: str, in_dir: str, out_dir: str, spacing: float = 1.0) -> JobResult:
    result = JobResult(name=name)
    out_path = os.path.join(out_dir, name)
    if os.path.exists(out_path):
        result.skipped.append(name)
        return result
    in_path = os.path.join(in_dir, name)
    problem = nifti_problem(in_path)
    if problem:
        raise ValueError(f"{in_path}: {problem}")
    try:
        image = sitk.ReadImage(in_path)
    except RuntimeError as err:
        raise ValueError(f"{in_path}: unreadable NIfTI ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3:
        raise ValueError(f"{in_path}: expected a 3-D volume, got {image.GetDimension()}-D")
    result.warnings += geometry_warnings(in_path, image, spacing)
    stored = nib.load(in_path)
    if stored.get_data_dtype().kind == "f":  # ITK reads NaN voxels as 0 HU: find them with nibabel
        bad = ~np.isfinite(np.asanyarray(stored.dataobj))  # (x, y, z), the file's voxel order
        if bad.all():
            raise ValueError(f"{in_path}: no finite voxel (all NaN or infinite)")
        if bad.any():
            result.warnings.append(f"{in_path}: {int(bad.sum())} NaN or infinite voxels, read as {HU_RANGE[0]:g} HU (air)")
            voxels = sitk.GetArrayFromImage(image)  # (z, y, x)
            voxels[bad.transpose(2, 1, 0)] = HU_RANGE[0]
            fixed = sitk.GetImageFromArray(voxels)
            fixed.CopyInformation(image)
            image = fixed
    if image.GetSize()[2] == 1:
        result.warnings.append(f"{in_path}: a single slice; its patches will be almost all padding in depth")
    resampled = resample_volume(image, spacing)
    write_atomic(out_path, lambda tmp: sitk.WriteImage(resampled, tmp, useCompression=tmp.endswith(".gz")))
    result.written.append(name)
    return result


def geometry_warnings(path: str, image: sitk.Image, new_spacing: float = 1.0) -> list[str]:
    """Implausible spacing, a zero pixdim that the reader took for 1 mm, an oversized output."""
    warnings = spacing_warnings(path, image.GetSpacing())
    with nib.openers.ImageOpener(path) as f:
        pixdim = nib.Nifti1Header.from_fileobj(f, check=False)["pixdim"][1:4]  # as stored: a checked header has zeros set to 1
    if np.any(pixdim == 0):
        warnings.append(f"{path}: pixdim {tuple(float(p) for p in pixdim)} has a zero, read as 1 mm")
    size = target_size(image.GetSize(), image.GetSpacing(), new_spacing)
    if max(size) > MAX_SIDE:
        warnings.append(f"{path}: resampled size {tuple(size)} exceeds {MAX_SIDE} on an axis (spacing {image.GetSpacing()})")
    return warnings


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Resample to 1 mm", add_help=False)
    parser.add_argument("--data_root", default="data/DeepLesion", help="Folder holding Images_nifti/.")
    parser.add_argument("--in_dir", default=None, help="Default: <data_root>/Images_nifti.")
    parser.add_argument("--out_dir", default=None, help="Default: <data_root>/Images_nifti_spacing.")
    parser.add_argument("--workers", default=os.cpu_count() or 1, type=int, help="Parallel processes.")
    parser.add_argument(
        "--spacing",
        default=1.0,
        type=positive_float,
        help="Isotropic output spacing in mm (1 mm is the method's; coarser ones suit CPU runs).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_parser("Resample to 1 mm", parents=[get_args_parser()]).parse_args(argv)
    in_dir = args.in_dir or os.path.join(args.data_root, "Images_nifti")
    out_dir = args.out_dir or os.path.join(args.data_root, "Images_nifti_spacing")
    if not os.path.isdir(in_dir):
        raise SystemExit(f"input folder {in_dir!r} does not exist: run DL_save_nifti.py first")
    make_output_dir(out_dir)
    remove_stale_partials(out_dir)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1 if args.workers > 1 else os.cpu_count() or 1)
    names = sorted(f for f in os.listdir(in_dir) if f.endswith((".nii.gz", ".nii")) and not f.startswith("."))
    if not names:
        print(f"no .nii or .nii.gz volume found in {in_dir}", file=sys.stderr)
        return 1
    if not (args.spacing > 0 and np.isfinite(args.spacing)):
        raise SystemExit(f"--spacing must be a positive number of mm, got {args.spacing}")
    job = functools.partial(resample_file, in_dir=in_dir, out_dir=out_dir, spacing=args.spacing)
    results = run_jobs(job, names, args.workers, f"resample {args.spacing:g} mm")
    remove_stale_partials(out_dir)  # again: the workers of a run killed just before may have been dying at the start
    return summarise(results, f"volumes in {out_dir}")


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
