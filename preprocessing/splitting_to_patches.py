"""Split 1 mm volumes into 24-slice sub-volumes and write the pretraining list (docs/method.md, section 2.3).

Along depth (SimpleITK array axis 0): tiles of 24 slices with stride 12,
ceil((d - 24) / 12) + 1 of them, the last one flush with the end of the volume; a volume of
at most 24 slices gives one tile of its own depth. If rows > 320, only the central 80% of
rows and columns is kept. Patches are int16 with the volume's spacing, origin and direction,
named `DL_patches_v2/{stem}_dep{k}{ext}`. The list file names, sorted and relative to the data
root, every complete patch of that extension in the patch folder, whichever run wrote it:
processing the data in batches, or deleting resampled volumes to free disk, never shrinks it.
The run says how many entries it added to the earlier list, kept, and dropped (patches gone
from disk or found incomplete). Unlike the reference, whose list filter misses the `.nii`
files it writes, the list is never empty when patches exist.

    python preprocessing/splitting_to_patches.py --data_root data/DeepLesion --workers 8
    (add --ext .nii for uncompressed patches: larger on disk, faster to read in training)
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from preprocessing.files import remove_stale_partials, split_ending, write_atomic
from preprocessing.runner import JobResult, command_parser, entry, make_output_dir, nifti_problem, run_command, run_jobs, summarise

TILE, STRIDE, MAX_ROWS = 24, 12, 320
KEEP_FROM, KEEP_TO = 0.1, 0.9  # the central 80% of rows and columns


def tile_starts(depth: int, tile: int = TILE, stride: int = STRIDE) -> list[int]:
    """First slice of each tile; the last tile ends at the volume's end."""
    if depth <= tile:
        return [0]
    n = math.ceil((depth - tile) / stride) + 1
    return [min(k * stride, depth - tile) for k in range(n)]


def central_crop(volume: np.ndarray) -> np.ndarray:
    """Keep rows [0.1 r, 0.9 r) and cols [0.1 c, 0.9 c) when rows > 320; (z, y, x) in and out."""
    _, r, c = volume.shape
    if r <= MAX_ROWS:
        return volume
    return volume[:, int(KEEP_FROM * r) : int(KEEP_TO * r), int(KEEP_FROM * c) : int(KEEP_TO * c)]


def split_volume(volume: np.ndarray) -> list[np.ndarray]:
    """(z, y, x) volume -> its 24-slice tiles, centrally cropped in-plane."""
    volume = central_crop(volume)
    return [volume[s : s + TILE] for s in tile_starts(volume.shape[0])]


def stem_of(name: str) -> str:
    return split_ending(name)[0]


def patch_names(name: str, depth: int, ext: str) -> list[str]:
    return [f"{stem_of(name)}_dep{k}{ext}" for k in range(len(tile_starts(depth)))]


SMALL_SIDE, SMALL_DEPTH = 96, 16  # the global view: a patch smaller than it is padded, warned about


def as_int16(volume: np.ndarray, path: str, result: JobResult) -> np.ndarray:
    """The patches' int16 HU. A float volume with no finite value is refused; one with some
    NaN or infinite voxels gets its lowest finite value there (padding, as outside a scan's
    field of view), with a warning."""
    if np.issubdtype(volume.dtype, np.floating):
        finite = np.isfinite(volume)
        if not finite.any():
            raise ValueError(f"{path}: no finite value (all {volume.size} voxels are NaN or infinite)")
        if not finite.all():
            low = float(volume[finite].min())
            result.warnings.append(
                f"{path}: {volume.size - int(finite.sum())} NaN or infinite voxels, written as {low:g} (its lowest value)"
            )
            volume = np.where(finite, volume, low)
        volume = np.rint(np.clip(volume, -32768, 32767))
    return volume.astype(np.int16)


def split_file(name: str, in_dir: str, out_dir: str, ext: str) -> JobResult:
    result = JobResult(name=name)
    in_path = os.path.join(in_dir, name)
    problem = nifti_problem(in_path)
    if problem:
        raise ValueError(f"{in_path}: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(in_path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ValueError(f"{in_path}: unreadable NIfTI ({str(err).strip().splitlines()[-1]})") from None
    if reader.GetDimension() != 3:
        raise ValueError(f"{in_path}: expected a 3-D volume, got {reader.GetDimension()}-D")
    names = patch_names(name, reader.GetSize()[2], ext)
    if all(os.path.exists(os.path.join(out_dir, n)) for n in names):
        result.skipped.extend(names)
        return result
    size = reader.GetSize()  # (x, y, z)
    if min(size[:2]) < SMALL_SIDE or size[2] < SMALL_DEPTH:
        result.warnings.append(
            f"{in_path}: {size[0]} x {size[1]} x {size[2]} voxels, smaller than the views ({SMALL_SIDE} in-plane, {SMALL_DEPTH} slices): "
            "its patches will be mostly padding"
        )
    image = reader.Execute()
    voxels = sitk.GetArrayFromImage(image)  # (z, y, x)
    if voxels.dtype.kind == "f" and in_path.endswith((".nii", ".nii.gz")):
        voxels = np.asanyarray(nib.load(in_path).dataobj).T  # ITK's NIfTI reader turns NaN into 0: read the stored values
    tiles = split_volume(as_int16(voxels, in_path, result))
    for patch_name, tile in zip(names, tiles):
        path = os.path.join(out_dir, patch_name)
        if os.path.exists(path):
            result.skipped.append(patch_name)
            continue
        patch = sitk.GetImageFromArray(np.ascontiguousarray(tile))
        patch.SetSpacing(image.GetSpacing())
        patch.SetOrigin(image.GetOrigin())
        patch.SetDirection(image.GetDirection())
        write_atomic(path, lambda tmp, patch=patch: sitk.WriteImage(patch, tmp, useCompression=tmp.endswith(".gz")))
        result.written.append(patch_name)
    return result


PATCH_NAME = re.compile(r"_dep\d+$")


def complete_patches(out_dir: str, ext: str) -> tuple[list[str], list[str]]:
    """(complete, incomplete) patch file names of extension `ext` in `out_dir`."""
    names = sorted(f for f in os.listdir(out_dir) if f.endswith(ext) and not f.startswith(".") and PATCH_NAME.search(stem_of(f)))
    if ext == ".nii":  # `.nii.gz` names end in `.gz`, never in `.nii`
        names = [f for f in names if not f.endswith(".nii.gz")]
    bad = [f for f in names if nifti_problem(os.path.join(out_dir, f))]
    return [f for f in names if f not in set(bad)], bad


def write_list(list_path: str, patch_folder: str, out_dir: str, ext: str) -> dict[str, int]:
    """Write the list of every complete patch in the patch folder; returns what changed
    against the list already there (added, kept, dropped) and its length."""
    names, bad = complete_patches(out_dir, ext)
    entries = [f"{patch_folder}/{n}" for n in names]
    before: set[str] = set()
    if os.path.isfile(list_path):
        with open(list_path) as f:
            before = {line.strip() for line in f if line.strip()}
    for n in bad:
        print(
            f"  WARNING {os.path.join(out_dir, n)}: incomplete ({nifti_problem(os.path.join(out_dir, n))}); left out of the list",
            file=sys.stderr,
        )

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(e + "\n" for e in entries)

    write_atomic(list_path, write)
    now = set(entries)
    return {"total": len(entries), "added": len(now - before), "kept": len(now & before), "dropped": len(before - now)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Split into 24-slice patches", add_help=False)
    parser.add_argument("--data_root", default="data/DeepLesion", help="Folder holding Images_nifti_spacing/; patches and list go here.")
    parser.add_argument("--in_dir", default=None, help="Default: <data_root>/Images_nifti_spacing.")
    parser.add_argument("--patch_folder", default="DL_patches_v2", help="Patch folder, relative to the data root.")
    parser.add_argument("--list_name", default="SSL_data_deeplesion.txt", help="List file, written in the data root.")
    parser.add_argument(
        "--ext", default=".nii.gz", choices=[".nii.gz", ".nii"], help=".nii is ~2x larger and several times faster to read."
    )
    parser.add_argument("--workers", default=os.cpu_count() or 1, type=int, help="Parallel processes.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_parser("Split into 24-slice patches", parents=[get_args_parser()]).parse_args(argv)
    in_dir = args.in_dir or os.path.join(args.data_root, "Images_nifti_spacing")
    out_dir = os.path.join(args.data_root, args.patch_folder)
    if not os.path.isdir(in_dir):
        raise SystemExit(f"input folder {in_dir!r} does not exist: run re_spacing_ITK.py first")
    make_output_dir(out_dir)
    remove_stale_partials(out_dir)
    names = sorted(f for f in os.listdir(in_dir) if f.endswith((".nii.gz", ".nii")) and not f.startswith("."))
    if not names:
        print(f"note: no .nii or .nii.gz volume in {in_dir}; the list is rebuilt from the patches already on disk", file=sys.stderr)
    job = functools.partial(split_file, in_dir=in_dir, out_dir=out_dir, ext=args.ext)
    results = run_jobs(job, names, args.workers, "split 24 slices")
    remove_stale_partials(out_dir)  # again: the workers of a run killed just before may have been dying at the start
    status = summarise(results, f"patches in {out_dir}")
    list_path = os.path.join(args.data_root, args.list_name)
    change = write_list(list_path, args.patch_folder, out_dir, args.ext)
    print(
        f"list: {change['total']} patches in {list_path} "
        f"({change['added']} added, {change['kept']} kept from the earlier list, {change['dropped']} dropped)"
    )
    return status


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
