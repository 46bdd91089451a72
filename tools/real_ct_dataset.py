"""A labelled set of real CT in nnU-Net v2's layout, from the reference scans that TotalSegmentator
2.18.0 ships (`make realct` fetches them once into ~/.cache/desd/realct):

- `abdomen`: the abdomen/pelvis CT, as shipped (int32 NIfTI stored RAS, 3 mm);
- `upperabdomen`: the JPEG 2000 DICOM series of the upper abdomen, converted by
  preprocessing/ct_to_nifti.py (0.98 x 0.98 x 2 mm);
- `chestcta`: the chest CT angiogram, as shipped (int16 NIfTI stored LPS, 1.5 mm).

The classes are those the scans share: liver, spleen, kidney (left and right), stomach, aorta and
heart. The abdomen and the DICOM case are labelled everywhere; the angiogram has masks of its
heart and aorta only, so every other voxel of it is nnU-Net's `ignore` label. Each label map is
written on its image's grid (the DICOM case's and the angiogram's aorta are resampled onto it,
nearest neighbour, in world coordinates). The labels are TotalSegmentator's predictions, not
manual ground truth.

Three cases are too few for nnU-Net's own five-fold split, so the set comes with
`splits_final.json`: one fold that trains on the abdomen and the angiogram and validates on the
DICOM case. `finetune.py --split_file` reads it in place; for nnU-Net, copy it into
`$nnUNet_preprocessed/Dataset901_RealCT/` before `nnUNetv2_train`. The images are stored in three
orientations, so `desd-nnunet-plans` needs `--reader SimpleITKIOWithReorient`.

    python tools/real_ct_dataset.py --out data/Dataset901_RealCT
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import SimpleITK as sitk

from preprocessing import ct_to_nifti
from preprocessing.files import prepare_output_folder
from preprocessing.runner import command_parser, entry, run_command
from tools.real_ct_figure import REALCT, class_map

CLASSES = {"liver": ("liver",), "spleen": ("spleen",), "kidney": ("kidney_right", "kidney_left"), "stomach": ("stomach",)}
CLASSES.update(aorta=("aorta",), heart=("heart",))
LABELS = {"background": 0, **{name: k + 1 for k, name in enumerate(CLASSES)}, "ignore": len(CLASSES) + 1}
SPLITS = [{"train": ["abdomen", "chestcta"], "val": ["upperabdomen"]}]  # nnU-Net's splits_final.json, one fold


def total_to_ours(realct: str) -> np.ndarray:
    """A lookup table from TotalSegmentator's `total` ids to this set's labels (0 elsewhere)."""
    ids = {name: k for k, name in class_map(realct).items()}
    table = np.zeros(256, np.uint8)
    for ours, names in CLASSES.items():
        for name in names:
            table[ids[name]] = LABELS[ours]
    return table


def on_grid(label: sitk.Image, image: sitk.Image) -> np.ndarray:
    """The label map sampled on the image's grid (nearest neighbour, world coordinates), as an
    array (z, y, x); voxels outside the label's extent are 0."""
    resampled = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def write_case(out: str, case: str, image_path: str, labels: np.ndarray) -> None:
    """The image (copied) and its label map on the image's own grid."""
    shutil.copy(image_path, os.path.join(out, "imagesTr", f"{case}_0000.nii.gz"))
    image = sitk.ReadImage(image_path)
    seg = sitk.GetImageFromArray(labels.astype(np.uint8))
    seg.CopyInformation(image)
    sitk.WriteImage(seg, os.path.join(out, "labelsTr", f"{case}.nii.gz"), useCompression=True)


def build(realct: str, out: str) -> dict:
    """Write the three cases and dataset.json into `out`; returns dataset.json's content."""
    files = os.path.join(realct, "tests", "reference_files")
    table = total_to_ours(realct)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)

    abdomen = os.path.join(files, "example_ct.nii.gz")
    seg = sitk.ReadImage(os.path.join(files, "example_seg_fast_force_split.nii.gz"))
    write_case(out, "abdomen", abdomen, table[on_grid(seg, sitk.ReadImage(abdomen))])

    with tempfile.TemporaryDirectory() as work:
        if ct_to_nifti.main(["--in_dir", os.path.join(files, "example_ct_dicom"), "--out_dir", work]) != 0:
            raise SystemExit(f"{files}/example_ct_dicom: the conversion failed")
        (name,) = os.listdir(work)
        series = os.path.join(work, name)
        seg = sitk.ReadImage(os.path.join(files, "example_seg_dicom.nii.gz"))
        write_case(out, "upperabdomen", series, table[on_grid(seg, sitk.ReadImage(series))])

    cta = os.path.join(files, "aorta_report", "example_ct.nii.gz")
    image = sitk.ReadImage(cta)
    labels = np.full(image.GetSize()[::-1], LABELS["ignore"], np.uint8)
    for name, path in (("heart", "pulmonary_report/models/heart.nii.gz"), ("aorta", "aorta_report/test_result/models/aorta.nii.gz")):
        labels[on_grid(sitk.ReadImage(os.path.join(files, path)), image) > 0] = LABELS[name]
    write_case(out, "chestcta", cta, labels)

    meta = {
        "name": "RealCT",
        "description": "TotalSegmentator 2.18.0's reference scans (Apache-2.0) with its predicted labels, "
        "not manual ground truth; the angiogram's voxels outside its heart and aorta are ignored",
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out, "splits_final.json"), "w") as f:
        json.dump(SPLITS, f, indent=1)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("A labelled nnU-Net v2 dataset of real CT from TotalSegmentator's reference scans")
    parser.add_argument("--realct", default=REALCT, help="Where `make realct` put the reference scans.")
    parser.add_argument("--out", required=True, help="The dataset folder to write (e.g. $nnUNet_raw/Dataset901_RealCT).")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.realct, "tests", "reference_files", "example_ct_dicom")):
        raise SystemExit(f"{args.realct}: the reference scans are not there; fetch them once with `make realct`")
    prepare_output_folder(args.out, "--out")
    existing = os.path.join(args.out, "dataset.json")
    if os.path.exists(existing):
        with open(existing) as f:
            if json.load(f).get("name") != "RealCT":
                raise SystemExit(f"{existing}: another dataset is there; give a new --out (nothing was written)")
    work = tempfile.mkdtemp(prefix=".real-ct-", dir=args.out)  # built aside, then renamed into place
    try:
        build(args.realct, work)
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(args.out, sub), exist_ok=True)
            for name in os.listdir(os.path.join(work, sub)):
                os.replace(os.path.join(work, sub, name), os.path.join(args.out, sub, name))
        os.replace(os.path.join(work, "splits_final.json"), os.path.join(args.out, "splits_final.json"))
        os.replace(os.path.join(work, "dataset.json"), existing)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"3 cases of real CT in {args.out} (labels: {', '.join(CLASSES)}; the angiogram's other voxels ignored)")
    print(f"one fold in {args.out}/splits_final.json (nnU-Net reads it from $nnUNet_preprocessed/<dataset>/)")
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
