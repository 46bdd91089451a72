"""Your own CT -> NIfTI volumes in the pretraining orientation: the first step for pretraining on
CT other than DeepLesion, in place of DL_save_nifti.py; re_spacing_ITK.py and
splitting_to_patches.py then run as for DeepLesion (docs/method.md, section 2).

Input: a folder of NIfTI volumes (`.nii`, `.nii.gz`, any orientation), or of DICOM series, read
as preprocessing/dicom.py says: one volume per CT series (SeriesInstanceUID) of each folder, on
the grid its slice positions give (gaps, uneven spacing and gantry tilt resampled, with a
warning), localizers and other modalities left out with a line. An output folder inside the
input folder is never read back. Each volume is
1. checked: whole (a NIfTI cut short is refused), 3-D, one channel, plausible spacing;
2. reoriented to the DeepLesion patches' orientation, nibabel axis codes ('P', 'L', 'I'), by
   the permutation and flips MONAI's Orientation applies in fine-tuning (no resampling), so
   that its patches enter the encoder as DeepLesion's do, whatever orientation it was stored in;
3. rounded to int16 HU (non-finite voxels become air, with a warning) and written to
   `<out_dir>/<name>.nii.gz`, under a temporary name then renamed.
Finished volumes are skipped; bad inputs are named in the summary, and the exit status is 1 when
any failed.

    python preprocessing/ct_to_nifti.py --in_dir my_ct/ --data_root data/MyCT --workers 8
    python preprocessing/re_spacing_ITK.py --data_root data/MyCT --workers 8
    python preprocessing/splitting_to_patches.py --data_root data/MyCT --workers 8 --ext .nii
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import sys

import nibabel as nib
import numpy as np

from preprocessing import dicom
from preprocessing.dicom import Series
from preprocessing.files import remove_stale_partials, split_ending, write_atomic
from preprocessing.network_input import HU_RANGE, PRETRAINING_AXCODES, reorient
from preprocessing.runner import (
    JobResult,
    command_parser,
    entry,
    make_output_dir,
    nifti_problem,
    run_command,
    run_jobs,
    spacing_warnings,
    summarise,
)

NIFTI = (".nii", ".nii.gz")


def find_volumes(in_dir: str, out_dir: str | None = None) -> tuple[list[tuple[str, str | Series]], list[str]]:
    """(output name, source) of every volume under `in_dir`, a NIfTI file's path or a DICOM
    `Series` (preprocessing/dicom.py), and the lines of series left out. `out_dir`, where it lies
    inside `in_dir`, is never read back as input."""
    skip = os.path.realpath(out_dir) if out_dir else None
    volumes = []
    for folder, dirs, files in os.walk(in_dir):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skip)
        rel = os.path.relpath(folder, in_dir)
        prefix = "" if rel == "." else re.sub(r"[^\w.-]+", "_", rel) + "_"
        for f in sorted(files):
            if f.endswith(NIFTI) and not f.startswith("."):
                volumes.append((prefix + split_ending(f)[0] + ".nii.gz", os.path.join(folder, f)))
    series, notes = dicom.series_in(in_dir, skip=out_dir)
    return volumes + [(name + ".nii.gz", s) for name, s in series], notes


def read_source(source: str | Series) -> tuple[np.ndarray, np.ndarray, tuple, list[str]]:
    """(array (x, y, z), RAS affine, spacing, warnings) of a NIfTI file or a DICOM series."""
    if isinstance(source, Series):
        volume, geometry, warnings = dicom.read_series(source)
        return volume.transpose(2, 1, 0), geometry.ras_affine(), geometry.spacing, warnings
    problem = nifti_problem(source)
    if problem:
        raise ValueError(problem)
    img = nib.load(source)
    if len(img.shape) != 3:
        raise ValueError(f"shape {img.shape}: expected a single-channel 3-D volume")
    return np.asanyarray(img.dataobj), img.affine, tuple(float(z) for z in img.header.get_zooms()[:3]), []


def to_hu_int16(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """The volume as int16 HU, non-finite voxels as air; and how many there were. An int16
    volume is returned as it is (no copy)."""
    if arr.dtype == np.int16:
        return arr, 0
    arr = np.asarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.all():
        raise ValueError("no finite voxel (all NaN or infinite)")
    arr = np.where(bad, HU_RANGE[0], arr)
    return np.rint(np.clip(arr, -32768, 32767)).astype(np.int16), int(bad.sum())


def convert(item: tuple[str, str], out_dir: str) -> JobResult:
    name, source = item
    result = JobResult(name=name)
    out_path = os.path.join(out_dir, name)
    if os.path.exists(out_path):
        result.skipped.append(name)
        return result
    try:
        arr, affine, spacing, warnings = read_source(source)
        hu, bad = to_hu_int16(arr)
    except (ValueError, RuntimeError, OSError) as err:
        message = str(err).strip().splitlines()[-1]
        raise ValueError(message if message.startswith(str(source)) else f"{source}: {message}") from None
    result.warnings += warnings + spacing_warnings(str(source), spacing)
    if bad:
        result.warnings.append(f"{source}: {bad} NaN or infinite voxels, written as {HU_RANGE[0]:g} HU (air)")
    hu, affine = reorient(hu, affine)
    image = nib.Nifti1Image(np.ascontiguousarray(hu), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    write_atomic(out_path, lambda tmp: nib.save(image, tmp))
    result.written.append(name)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--in_dir", required=True, help="A folder of NIfTI volumes, or of DICOM series (one series a folder).")
    parser.add_argument("--data_root", default="data/MyCT", help="Where Images_nifti/ is written (the later steps' --data_root).")
    parser.add_argument("--out_dir", default=None, help="Default: <data_root>/Images_nifti.")
    parser.add_argument("--workers", default=1, type=int, help="Volumes converted at once (one process each).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_parser("Own CT -> NIfTI in the pretraining orientation", parents=[get_args_parser()]).parse_args(argv)
    out_dir = args.out_dir or os.path.join(args.data_root, "Images_nifti")
    if not os.path.isdir(args.in_dir):
        problem = "is a file, not a folder" if os.path.exists(args.in_dir) else "does not exist"
        raise SystemExit(f"--in_dir {args.in_dir!r} {problem}: give the folder that holds the NIfTI files or DICOM series")
    volumes, notes = find_volumes(args.in_dir, out_dir)
    for line in notes:
        print(line, file=sys.stderr)
    if not volumes:
        print(f"no NIfTI volume (.nii, .nii.gz) or DICOM series found under {args.in_dir}", file=sys.stderr)
        return 1
    names = [n for n, _ in volumes]
    if len(set(names)) != len(names):
        twice = sorted(n for n, k in collections.Counter(names).items() if k > 1)
        raise SystemExit(f"{args.in_dir}: these volumes would get one name each twice: {twice[:5]}; rename their folders or files")
    make_output_dir(out_dir)
    remove_stale_partials(out_dir)
    results = run_jobs(functools.partial(convert, out_dir=out_dir), volumes, args.workers, f"CT -> NIfTI ({PRETRAINING_AXCODES})")
    return summarise(results, f"volumes in {out_dir}")


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
