"""What several test files share: the repository root, free ports, runs in this process, and
small data written the way users' files are (DeepLesion series, NIfTI volumes, MSD and nnU-Net
v2 labelled sets). The tiny pretraining and fine-tuning sets come from tools/tiny_data.py."""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from downstream import labelled
from preprocessing import DL_save_nifti as s1
from tools.tiny_data import TINY_TRAIN_ARGS, write_cube_task, write_patches  # noqa: F401 - the tests import them from here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


REALCT = os.environ.get("DESD_REALCT") or os.path.join(os.path.expanduser("~"), ".cache", "desd", "realct")


def realct_files() -> str:
    """The folder of the real reference scans (`make realct`); a test that needs them is skipped
    where they are missing, except under `make test` (DESD_REQUIRE_REALCT), where it fails."""
    import pytest

    files = os.path.join(REALCT, "tests", "reference_files")
    if not os.path.isdir(os.path.join(files, "example_ct_dicom")):
        message = f"the real CT scans are not in {REALCT}: fetch them with `make realct` (once; about 40 MB through pip)"
        if os.environ.get("DESD_REQUIRE_REALCT"):
            raise RuntimeError(message)
        pytest.skip(message)
    return files


def free_port() -> int:
    """A TCP port free on this host now, for a torchrun rendezvous (no fixed ports: two test
    runs on one machine, or a port some other program holds, must not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main_desd(argv: list[str]) -> None:
    """Run main_desd in this process with the given command line."""
    import main_desd

    parser = argparse.ArgumentParser("DeSD", parents=[main_desd.get_args_parser()])
    main_desd.train_desd(parser.parse_args(argv))


# ============ DeepLesion as NIH ships it, and NIfTI volumes ============


def write_series(root, folder, indices, spacing="0.8, 0.8, 2.5", shape=(20, 24), seed=0, extra_rows=()):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "Images_png", folder), exist_ok=True)
    slices = {}
    for i in indices:
        hu = rng.integers(-1000, 1500, size=shape).astype(np.int16)
        Image.fromarray((hu.astype(np.int32) + 32768).astype(np.uint16)).save(os.path.join(root, "Images_png", folder, f"{i:03d}.png"))
        slices[i] = hu
    csv_path = os.path.join(root, "DL_info.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=s1.CSV_COLUMNS)
        if new:
            w.writeheader()
        p, st, se = (int(x) for x in folder.split("_"))
        for sp in (spacing, *extra_rows):
            w.writerow(
                {
                    "File_name": f"{folder}_{indices[0]:03d}.png",
                    "Patient_index": p,
                    "Study_index": st,
                    "Series_ID": se,
                    "Spacing_mm_px_": sp,
                }
            )
    return slices


def make_volume(path, arr_zyx, spacing, origin=(3.0, -2.0, 7.0)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, path)


def prepare_split_input(tmp_path, n=3):
    src = tmp_path / "Images_nifti_spacing"
    src.mkdir(parents=True)
    for i, depth in enumerate([10, 30, 40][:n]):
        make_volume(str(src / f"00000{i}_01_01_001-0{depth}.nii.gz"), np.full((depth, 330, 340), i, np.int16), (1.0, 1.0, 1.0))
    return str(tmp_path)


# ============ labelled sets ============


NIH = np.array([[0, -0.8, 0, 0], [-0.8, 0, 0, 0], [0, 0, -2.0, 0], [0, 0, 0, 1]])  # DeepLesion's ('P', 'L', 'I')


def volume(seed=0, shape=(20, 18, 12)):
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 100, shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[4:10, 3:9, 2:6] = 1
    lab[12:16, 10:15, 6:10] = 2
    return img, lab


def write_msd(root, n=3, labels=None):
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    training = []
    for i in range(n):
        img, lab = volume(i)
        nib.save(nib.Nifti1Image(img, NIH), os.path.join(root, "imagesTr", f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, NIH), os.path.join(root, "labelsTr", f"case{i}.nii.gz"))
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    meta = {"labels": labels or {"0": "background", "1": "liver", "2": "tumour"}, "modality": {"0": "CT"}, "training": training}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return root


def write_nnunet(root, n=3, ending=".nii.gz", ignore=False):
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    for i in range(n):
        img, lab = volume(i)
        for arr, path in ((img, f"imagesTr/liver_{i:03d}_0000{ending}"), (lab, f"labelsTr/liver_{i:03d}{ending}")):
            if ending in labelled.NIFTI:
                nib.save(nib.Nifti1Image(arr, NIH), os.path.join(root, path))
            else:
                im = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
                im.SetSpacing((0.8, 0.8, 2.0))
                sitk.WriteImage(im, os.path.join(root, path))
    labels = {"background": 0, "liver": 1, "tumour": 2, **({"ignore": 3} if ignore else {})}
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": n, "file_ending": ending}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return root
