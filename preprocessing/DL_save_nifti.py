"""DeepLesion PNG slices -> NIfTI sub-volumes (docs/method.md, section 2.1; NIH's conversion).

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
import io
import os
import sys

import nibabel as nib
import numpy as np
from PIL import Image

from preprocessing.files import remove_stale_partials, write_atomic
from preprocessing.runner import JobResult, command_parser, entry, make_output_dir, run_command, run_jobs, spacing_warnings, summarise

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


def read_series_spacing(csv_path: str) -> tuple[dict[str, str], list[str]]:
    """Series folder name -> raw `Spacing_mm_px_` text of its first row in DL_info.csv, and
    the warnings met: rows that cannot be used (named by line number, then skipped), a file
    that is not UTF-8 (read as Latin-1), exact duplicate rows, and series whose rows give
    different spacings (the first row's is used)."""
    with open(csv_path, "rb") as f:
        raw = f.read()
    warnings: list[str] = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        text = raw.decode("latin-1")
        warnings.append(f"{csv_path}: not UTF-8 (first at line {line}); read as Latin-1")
    if not text.strip():
        raise ValueError(f"{csv_path}: the file is empty ({len(raw)} bytes); expected DeepLesion's DL_info.csv")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    reader.fieldnames = [name.strip() for name in reader.fieldnames or []]  # "Spacing_mm_px_ " as some editors save it
    missing = [c for c in ("Patient_index", "Study_index", "Series_ID", "Spacing_mm_px_") if c not in reader.fieldnames]
    if missing:
        header = text.splitlines()[0]
        hint = next(
            (f"; its columns are separated by {sep!r}, not commas" for sep in (";", "\t") if sep in header and "," not in header), ""
        )
        raise ValueError(f"{csv_path}: missing columns {missing}{hint}; expected DeepLesion's DL_info.csv")
    spacing: dict[str, str] = {}
    conflicts: dict[str, set[str]] = {}
    seen: set[tuple] = set()
    for row in reader:
        line = reader.line_num
        fields = tuple(row.get(c) for c in reader.fieldnames or [])
        if fields in seen:
            warnings.append(f"{csv_path}, line {line}: duplicate of an earlier row")
            continue
        seen.add(fields)
        try:
            key = f"{int(row['Patient_index']):06d}_{int(row['Study_index']):02d}_{int(row['Series_ID']):02d}"
        except (TypeError, ValueError):
            ids = (row.get("Patient_index"), row.get("Study_index"), row.get("Series_ID"))
            warnings.append(f"{csv_path}, line {line}: Patient_index, Study_index, Series_ID {ids} are not integers; row skipped")
            continue
        text_spacing = (row["Spacing_mm_px_"] or "").strip()
        if key in spacing and text_spacing != spacing[key]:
            conflicts.setdefault(key, {spacing[key]}).add(text_spacing)
        spacing.setdefault(key, text_spacing)
    for key, values in sorted(conflicts.items()):
        warnings.append(f"{csv_path}: series {key} has rows with different spacings {sorted(values)}; using the first, {spacing[key]!r}")
    return spacing, warnings


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
    """A 16-bit DeepLesion PNG as int16 Hounsfield units; a truncated or corrupt file raises
    naming it."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("I;16", "I;16B", "I"):
                raise ValueError(f"{path}: not a 16-bit grey PNG (mode {img.mode})")
            arr = np.asarray(img).astype(np.int32)
    except (OSError, SyntaxError) as err:  # PIL's errors for truncated and corrupt files
        raise ValueError(f"{path}: unreadable PNG ({err})") from None
    if arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"{path}: values outside the 16-bit range")
    return (arr - HU_OFFSET).astype(np.int16)


def nih_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    sx, sy, sz = spacing
    return np.array([[0, -sy, 0, 0], [-sx, 0, 0, 0], [0, 0, -sz, 0], [0, 0, 0, 1]], dtype=np.float64)


def output_name(folder: str, run: list[int]) -> str:
    return f"{folder}_{run[0]:03d}-{run[-1]:03d}.nii.gz"


def stack_slices(paths: list[str]) -> np.ndarray:
    """The slices as one (rows, cols, slices) int16 volume; slices of another size than the
    first are named with both sizes."""
    slices = [read_png_hu(p) for p in paths]
    odd = [(p, a.shape) for p, a in zip(paths, slices) if a.shape != slices[0].shape]
    if odd:
        raise ValueError(f"{odd[0][0]} is {odd[0][1][0]} x {odd[0][1][1]}, but {paths[0]} is {slices[0].shape[0]} x {slices[0].shape[1]}")
    return np.stack(slices, axis=2)


def convert_series(folder: str, png_dir: str, out_dir: str, spacing_text: dict[str, str]) -> JobResult:
    """Write every sub-volume of one series folder; skip those already written. A sub-volume
    that fails is reported; the others are still written, and all are counted."""
    result = JobResult(name=folder)
    if folder not in spacing_text:
        raise ValueError(f"series {folder} has no usable row in DL_info.csv")
    spacing = parse_spacing(spacing_text[folder])
    result.warnings += spacing_warnings(f"series {folder}", spacing)
    files = [f for f in os.listdir(os.path.join(png_dir, folder)) if f.lower().endswith(".png")]  # 109.png, 109.PNG
    by_index: dict[int, str] = {}  # slice index -> file name: 109.png, or 1.png unpadded
    for f in files:
        stem = f[: -len(".png")]
        if not stem.isdigit():
            raise ValueError(f"{os.path.join(png_dir, folder, f)}: slice file names must be numbers, like 109.png")
        if int(stem) in by_index:
            raise ValueError(f"{os.path.join(png_dir, folder)}: {by_index[int(stem)]} and {f} are both slice {int(stem)}")
        by_index[int(stem)] = f
    indices = list(by_index)
    if not indices:
        raise ValueError(f"series folder {os.path.join(png_dir, folder)} holds no PNG slice")
    for run in split_runs(indices):
        name = output_name(folder, run)
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            result.skipped.append(name)
            continue
        try:
            volume = stack_slices([os.path.join(png_dir, folder, by_index[i]) for i in run])  # (rows, cols, slices)
        except ValueError as err:
            result.error = "; ".join(filter(None, [result.error, str(err)]))
            continue
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
    args = command_parser("DeepLesion PNG -> NIfTI", parents=[get_args_parser()]).parse_args(argv)
    png_dir = args.png_dir or os.path.join(args.data_root, "Images_png")
    csv_path = args.csv or os.path.join(args.data_root, "DL_info.csv")
    out_dir = args.out_dir or os.path.join(args.data_root, "Images_nifti")
    if not os.path.isdir(png_dir):
        raise SystemExit(f"PNG folder {png_dir!r} does not exist")
    if os.path.isdir(csv_path):
        raise SystemExit(f"CSV file {csv_path!r} is a folder; give DeepLesion's DL_info.csv with --csv")
    if not os.path.isfile(csv_path):
        raise SystemExit(f"CSV file {csv_path!r} does not exist")
    make_output_dir(out_dir)
    remove_stale_partials(out_dir)
    try:
        spacing, warnings = read_series_spacing(csv_path)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for w in warnings:
        print(f"WARNING {w}", file=sys.stderr)
    folders = sorted(d for d in os.listdir(png_dir) if os.path.isdir(os.path.join(png_dir, d)))
    if not folders:
        print(f"no series folder found in {png_dir}: nothing to convert (expected Images_png/<patient>_<study>_<series>/)", file=sys.stderr)
        return 1
    job = functools.partial(convert_series, png_dir=png_dir, out_dir=out_dir, spacing_text=spacing)
    results = run_jobs(job, folders, args.workers, "PNG -> NIfTI")
    remove_stale_partials(out_dir)  # again: the workers of a run killed just before may have been dying at the start
    return summarise(results, f"sub-volumes in {out_dir}")


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
