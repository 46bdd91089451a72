"""Real CT through the pretraining preprocessing: the reference scans that TotalSegmentator 2.18.0
ships (an abdomen CT stored as int32 NIfTI in RAS, and a JPEG 2000 DICOM series of the upper
abdomen), fetched once by `make realct`. Their labels are TotalSegmentator's predictions, not
manual ground truth. Every check is in world (scanner) coordinates: a value or a centroid must
be where the scanner put it, whatever the conversion did to the axes."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from preprocessing import ct_to_nifti
from preprocessing import re_spacing_ITK as s2
from preprocessing import splitting_to_patches as s3
from tests.helpers import REALCT, TINY_TRAIN_ARGS, realct_files, run_main_desd
from tools.real_ct_figure import class_map

FILES = os.path.join(REALCT, "tests", "reference_files")


@pytest.fixture(autouse=True)
def _scans():
    realct_files()  # skipped where the scans are missing; under make test (DESD_REQUIRE_REALCT) that fails instead


def class_id(name: str) -> int:
    """The label of `name` in TotalSegmentator's `total` task (its map_to_binary.py)."""
    return next(k for k, v in class_map(REALCT).items() if v == name)


def world_lps_of_sitk(image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """World points (LPS mm) of SimpleITK voxel indices (N, 3) in (x, y, z) order."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (ijk * np.asarray(image.GetSpacing())) @ direction.T


def values_at(path: str, lps: np.ndarray) -> np.ndarray:
    """The NIfTI file's voxels at world points (LPS mm), nearest voxel."""
    img = nib.load(path)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = np.rint((ras - img.affine[:3, 3]) @ np.linalg.inv(img.affine[:3, :3]).T).astype(int)
    assert (ijk >= 0).all() and (ijk < np.array(img.shape)).all(), "a world point fell outside the converted volume"
    return np.asanyarray(img.dataobj)[tuple(ijk.T)]


def centroid_ras(path: str, label: int) -> np.ndarray:
    img = nib.load(path)
    ijk = np.argwhere(np.asanyarray(img.dataobj) == label)
    return ijk.mean(0) @ img.affine[:3, :3].T + img.affine[:3, 3]


def convert(in_dir, data_root) -> str:
    assert ct_to_nifti.main(["--in_dir", str(in_dir), "--data_root", str(data_root)]) == 0
    return str(data_root / "Images_nifti")


def test_the_jpeg2000_dicom_series_keeps_every_value_at_its_world_position(tmp_path):
    series = os.path.join(FILES, "example_ct_dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(series))
    plain = reader.Execute()  # SimpleITK's own series read: the reference
    out = convert(series, tmp_path / "data")
    (name,) = os.listdir(out)
    converted = nib.load(os.path.join(out, name))
    assert nib.aff2axcodes(converted.affine) == ("P", "L", "I") and sorted(converted.shape) == [20, 512, 512]
    ijk = np.random.default_rng(0).integers(0, plain.GetSize(), (5000, 3))
    expected = sitk.GetArrayViewFromImage(plain)[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    assert np.array_equal(values_at(os.path.join(out, name), world_lps_of_sitk(plain, ijk)), expected)


def test_the_labels_carried_along_land_on_the_same_anatomy(tmp_path):
    liver = class_id("liver")
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(os.path.join(FILES, "example_seg_dicom.nii.gz"), labels / "seg.nii.gz")  # stored with y flipped
    out_seg = os.path.join(convert(labels, tmp_path / "seg"), "seg.nii.gz")
    voxel = max(nib.load(out_seg).header.get_zooms())
    before, after = centroid_ras(str(labels / "seg.nii.gz"), liver), centroid_ras(out_seg, liver)
    assert np.linalg.norm(before - after) < voxel
    out_ct = os.path.join(convert(os.path.join(FILES, "example_ct_dicom"), tmp_path / "ct"), "series.nii.gz")
    seg = nib.load(out_seg)
    stored = np.asanyarray(seg.dataobj)
    # median HU of each structure's voxels, read at their world positions in the converted CT
    # (with the label's y flip ignored: T12 -70, aorta 12, spleen -86)
    for name, low, high in (("vertebrae_T12", 150, 600), ("aorta", 120, 400), ("spleen", 40, 200), ("liver", 40, 200)):
        ijk = np.argwhere(stored == class_id(name))
        lps = (ijk @ seg.affine[:3, :3].T + seg.affine[:3, 3]) * np.array([-1.0, -1.0, 1.0])
        assert low < np.median(values_at(out_ct, lps)) < high, name


def test_the_int32_ras_abdomen_becomes_patches_that_a_short_pretraining_reads(tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    shutil.copy(os.path.join(FILES, "example_ct.nii.gz"), in_dir / "abdomen.nii.gz")
    root = tmp_path / "data"
    out = os.path.join(convert(in_dir, root), "abdomen.nii.gz")
    source = sitk.ReadImage(str(in_dir / "abdomen.nii.gz"))
    ijk = np.random.default_rng(1).integers(0, source.GetSize(), (5000, 3))
    expected = sitk.GetArrayViewFromImage(source)[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    assert np.array_equal(values_at(out, world_lps_of_sitk(source, ijk)), expected)

    liver = class_id("liver")
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(os.path.join(FILES, "example_seg_fast_force_split.nii.gz"), labels / "abdomen_seg.nii.gz")
    out_seg = os.path.join(convert(labels, tmp_path / "seg"), "abdomen_seg.nii.gz")
    assert np.linalg.norm(centroid_ras(str(labels / "abdomen_seg.nii.gz"), liver) - centroid_ras(out_seg, liver)) < 3.0

    assert s2.main(["--data_root", str(root), "--workers", "1"]) == 0
    assert s3.main(["--data_root", str(root), "--workers", "1", "--ext", ".nii"]) == 0
    patches = (root / "SSL_data_deeplesion.txt").read_text().split()
    assert len(patches) >= 10  # 112 slices at 3 mm: 336 slices at 1 mm, 24-slice patches every 12
    run_main_desd(
        ["--data_path", str(root), "--output_dir", str(tmp_path / "run"), *TINY_TRAIN_ARGS, "--epochs", "1", "--max_iters_per_epoch", "2"]
    )
    assert len((tmp_path / "run" / "log.txt").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_real_labelled_set_passes_the_check_fine_tunes_and_predicts_in_each_inputs_geometry(tmp_path):
    """The nnU-Net v2 set of the three real scans (tools/real_ct_dataset.py): the whole-geometry
    check passes, a short fine-tuning runs on it, and prediction of the DICOM folder and of the
    int32 RAS NIfTI writes label maps on each input's own grid, with overlays."""
    import finetune
    import predict
    from downstream import labelled
    from tools import real_ct_dataset

    task = tmp_path / "Dataset901_RealCT"
    assert real_ct_dataset.main(["--realct", REALCT, "--out", str(task)]) == 0
    data = labelled.read_dataset(str(task))
    assert data.layout == "nnunetv2" and data.ignore == 7 and len(data.cases) == 3
    assert labelled.main(["--data_dir", str(task)]) == 0  # the whole-geometry check: no problem found
    # the angiogram is labelled on its heart and aorta only, the rest ignored; the DICOM case on its liver
    cta = sitk.GetArrayFromImage(sitk.ReadImage(str(task / "labelsTr" / "chestcta.nii.gz")))
    assert set(np.unique(cta)) == {5, 6, 7}
    upper = sitk.GetArrayFromImage(sitk.ReadImage(str(task / "labelsTr" / "upperabdomen.nii.gz")))
    assert (upper == 1).mean() > 0.05  # the liver fills much of the upper abdomen's 20 slices

    args = finetune.get_args_parser().parse_args(
        ["--data_dir", str(task), "--output_dir", str(tmp_path / "run"), "--arch", "res3d10", "--spacing", "3",
         "--patch_size", "16", "48", "48", "--epochs", "1", "--max_iters_per_epoch", "2", "--num_workers", "0",
         "--device", "cpu", "--split_file", str(task / "splits_final.json"), "--fold", "0", "--sw_batch_size", "4"]
    )  # fmt: skip
    finetune.main(args)
    scores = json.loads((tmp_path / "run" / "dice.json").read_text())
    assert [c["case"] for c in scores["per_case"]] == ["upperabdomen"]

    series = os.path.join(FILES, "example_ct_dicom")
    abdomen = os.path.join(FILES, "example_ct.nii.gz")
    for given, name in ((series, "example_ct_dicom.nii.gz"), (abdomen, "example_ct.nii.gz")):
        out = tmp_path / "pred"
        assert predict.main(["--model", str(tmp_path / "run"), "--input", given, "--output", str(out), "--overlay", "True"]) == 0
        pred = sitk.ReadImage(str(out / name))
        if given == series:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(series))
            ref = reader.Execute()
        else:
            ref = sitk.ReadImage(given)
        assert pred.GetSize() == ref.GetSize(), name
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-3) and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert np.allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert (out / "overlays" / name.replace(".nii.gz", ".png")).stat().st_size > 10_000
