"""DeepLesion PNG slices -> NIfTI sub-volumes (SPEC section 2.1, NIH's conversion).

For each series folder `Images_png/{patient:06d}_{study:02d}_{series:02d}/` (sorted):
1. spacing (sx, sy, sz) = `Spacing_mm_px_` of the first `DL_info.csv` row of that series;
2. slice indices sorted and split into runs of consecutive indices (a folder holds only the
   context around key slices, so there are gaps); each run is one sub-volume;
3. PNG values minus 32768 = Hounsfield units (int16), stacked as (rows, cols, slices);
4. written with nibabel and NIH's affine [[0,-sy,0,0],[-sx,0,0,0],[0,0,-sz,0],[0,0,0,1]] to
   `Images_nifti/{folder}_{first:03d}-{last:03d}.nii.gz`. SimpleITK reads its spacing back as
   (sx, sy, sz).

    python preprocessing/DL_save_nifti.py --data_root data/DeepLesion --workers 8
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys

import nibabel as nib
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import JobResult, remove_stale_partials, run_jobs, summarise, write_atomic  # noqa: E402

HU_OFFSET = 32768
CSV_COLUMNS = (
    "File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Measurement_coordinates",
    "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location", "Coarse_lesion_type", "Possibly_noisy",
    "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender", "Patient_age", "Train_Val_Test",
)  # fmt: skip


def parse_spacing(text: str) -> tuple[float, float, float]:
    """'0.7, 0.7, 5' -> (0.7, 0.7, 5.0); anything else raises."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"malformed Spacing_mm_px_ {text!r}: expected three positive numbers 'x, y, z'")
    return values  # type: ignore[return-value]


def read_series_spacing(csv_path: str) -> dict[str, str]:
    """Series folder name -> raw `Spacing_mm_px_` text of its first row in DL_info.csv."""
    spacing: dict[str, str] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("Patient_index", "Study_index", "Series_ID", "Spacing_mm_px_") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing columns {missing}; expected DeepLesion's DL_info.csv")
        for row in reader:
            key = f"{int(row['Patient_index']):06d}_{int(row['Study_index']):02d}_{int(row['Series_ID']):02d}"
            spacing.setdefault(key, row["Spacing_mm_px_"])
    return spacing


def split_runs(indices: list[int]) -> list[list[int]]:
    """Sorted slice indices -> runs of consecutive indices: [1, 2, 3, 7, 8] -> [[1, 2, 3], [7, 8]]."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def read_png_hu(path: str) -> np.ndarray:
    """A 16-bit DeepLesion PNG as int16 Hounsfield units."""
    with Image.open(path) as img:
        if img.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"{path}: not a 16-bit grey PNG (mode {img.mode})")
        arr = np.asarray(img).astype(np.int32)
    if arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"{path}: values outside the 16-bit range")
    return (arr - HU_OFFSET).astype(np.int16)


def nih_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    sx, sy, sz = spacing
    return np.array([[0, -sy, 0, 0], [-sx, 0, 0, 0], [0, 0, -sz, 0], [0, 0, 0, 1]], dtype=np.float64)


def output_name(folder: str, run: list[int]) -> str:
    return f"{folder}_{run[0]:03d}-{run[-1]:03d}.nii.gz"


def convert_series(folder: str, png_dir: str, out_dir: str, spacing_text: dict[str, str]) -> JobResult:
    """Write every sub-volume of one series folder; skip those already written."""
    result = JobResult(name=folder)
    if folder not in spacing_text:
        raise ValueError(f"series {folder} has no row in DL_info.csv")
    spacing = parse_spacing(spacing_text[folder])
    files = [f for f in os.listdir(os.path.join(png_dir, folder)) if f.endswith(".png")]
    indices = []
    for f in files:
        stem = f[: -len(".png")]
        if not stem.isdigit():
            raise ValueError(f"{os.path.join(png_dir, folder, f)}: slice file names must be numbers, like 109.png")
        indices.append(int(stem))
    if not indices:
        raise ValueError(f"series folder {os.path.join(png_dir, folder)} holds no PNG slice")
    for run in split_runs(indices):
        name = output_name(folder, run)
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            result.skipped.append(name)
            continue
        volume = np.stack([read_png_hu(os.path.join(png_dir, folder, f"{i:03d}.png")) for i in run], axis=2)  # (rows, cols, slices)
        image = nib.Nifti1Image(volume, nih_affine(spacing))
        write_atomic(path, lambda tmp, image=image: nib.save(image, tmp))
        result.written.append(name)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DeepLesion PNG -> NIfTI", add_help=False)
    parser.add_argument("--data_root", default="data/DeepLesion", help="Folder holding Images_png/ and DL_info.csv.")
    parser.add_argument("--png_dir", default=None, help="Default: <data_root>/Images_png.")
    parser.add_argument("--csv", default=None, help="Default: <data_root>/DL_info.csv.")
    parser.add_argument("--out_dir", default=None, help="Default: <data_root>/Images_nifti.")
    parser.add_argument("--workers", default=os.cpu_count() or 1, type=int, help="Parallel processes.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser("DeepLesion PNG -> NIfTI", parents=[get_args_parser()]).parse_args(argv)
    png_dir = args.png_dir or os.path.join(args.data_root, "Images_png")
    csv_path = args.csv or os.path.join(args.data_root, "DL_info.csv")
    out_dir = args.out_dir or os.path.join(args.data_root, "Images_nifti")
    if not os.path.isdir(png_dir):
        raise SystemExit(f"PNG folder {png_dir!r} does not exist")
    if not os.path.isfile(csv_path):
        raise SystemExit(f"CSV file {csv_path!r} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_partials(out_dir)
    spacing = read_series_spacing(csv_path)
    folders = sorted(d for d in os.listdir(png_dir) if os.path.isdir(os.path.join(png_dir, d)))
    job = functools.partial(convert_series, png_dir=png_dir, out_dir=out_dir, spacing_text=spacing)
    results = run_jobs(job, folders, args.workers, "PNG -> NIfTI")
    return summarise(results, f"sub-volumes in {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
