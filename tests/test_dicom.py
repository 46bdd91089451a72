"""DICOM series as hospitals export them (preprocessing/dicom.py through ct_to_nifti.py): each
hostile case is written with SimpleITK and injected. The converted volume must hold, at every
world point, the value the scanner recorded there: a smooth phantom is sampled at each slice's
true voxel positions, and the output is compared with it at its own voxels' world positions."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from preprocessing import ct_to_nifti, dicom

UID = "1.2.826.0.1.3680043.2.1125.7"


def phantom(lps: np.ndarray) -> np.ndarray:
    """Smooth HU over world points (..., 3), LPS mm: linear interpolation errs by under 1 HU."""
    x, y, z = lps[..., 0], lps[..., 1], lps[..., 2]
    return 100 + 200 * np.sin(x / 15) + 150 * np.cos(y / 20) + 120 * np.sin(z / 9)


def write_series(
    folder, positions, row=(1, 0, 0), col=(0, 1, 0), size=(24, 20), spacing=(1.5, 1.5), uid=UID, modality="CT", image_type=None, prefix=""
):
    """One file a slice at each LPS position, with the phantom sampled at its voxels' true places."""
    os.makedirs(folder, exist_ok=True)
    row, col = np.asarray(row, float), np.asarray(col, float)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    j, i = np.mgrid[: size[1], : size[0]]
    for k, p in enumerate(positions):
        world = np.asarray(p, float) + i[..., None] * spacing[0] * row + j[..., None] * spacing[1] * col
        image = sitk.GetImageFromArray(np.rint(phantom(world)).astype(np.int16)[None])
        image.SetSpacing((*spacing, 1.0))
        tags = {
            "0008|0060": modality,
            "0020|000d": UID + ".1",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in p),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (*row, *col)),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
        }
        if image_type:
            tags["0008|0008"] = image_type
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{prefix}{uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(image)


def axial(n, dz=2.0, origin=(-20.0, -15.0, 40.0)):
    return [(origin[0], origin[1], origin[2] + k * dz) for k in range(n)]


def convert(tmp_path, capsys):
    code = ct_to_nifti.main(["--in_dir", str(tmp_path / "in"), "--data_root", str(tmp_path / "data")])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def largest_error(path) -> tuple[float, int]:
    """The largest |output - phantom| over the output's voxels that hold data (not tilt fill), and their count."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float64)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
    ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    inside = data > dicom.FILL_HU + 1
    return float(np.abs(data - phantom(lps))[inside].max()), int(inside.sum())


def test_a_regular_series_keeps_every_value_at_its_world_position(tmp_path, capsys):
    write_series(tmp_path / "in" / "a", axial(10))
    code, printed = convert(tmp_path, capsys)
    assert code == 0 and "WARNING" not in printed
    error, n = largest_error(tmp_path / "data" / "Images_nifti" / "a.nii.gz")
    assert error <= 0.5 + 1e-6 and n == 10 * 24 * 20  # int16 rounding only


def test_a_missing_slice_is_resampled_at_the_true_positions_and_named(tmp_path, capsys):
    positions = axial(12)
    del positions[5]
    write_series(tmp_path / "in" / "a", positions)
    code, printed = convert(tmp_path, capsys)
    assert code == 0 and "slice spacing is uneven or has gaps (4.00 mm after" in printed and "regular 2.00 mm grid" in printed
    img = nib.load(tmp_path / "data" / "Images_nifti" / "a.nii.gz")
    assert sorted(img.header.get_zooms())[-1] == pytest.approx(2.0) and 12 in img.shape
    error, _ = largest_error(tmp_path / "data" / "Images_nifti" / "a.nii.gz")
    assert error < 4.0  # the phantom's curvature over the 4 mm gap; averaged spacing (2.2 mm) put slices 1 mm off: 13 HU


def test_uneven_spacing_is_resampled_onto_the_finest_step(tmp_path, capsys):
    z = [0, 1, 2, 3, 5, 7, 9, 11]
    write_series(tmp_path / "in" / "a", [(-20.0, -15.0, 40.0 + v) for v in z])
    code, printed = convert(tmp_path, capsys)
    assert code == 0 and "regular 1.00 mm grid" in printed
    error, n = largest_error(tmp_path / "data" / "Images_nifti" / "a.nii.gz")
    assert error < 4.0 and n == 12 * 24 * 20


def test_a_gantry_tilted_series_is_corrected_onto_an_orthogonal_grid(tmp_path, capsys):
    tilt = math.radians(20)
    col = (0.0, math.cos(tilt), math.sin(tilt))  # tilted planes; positions move along z only
    write_series(tmp_path / "in" / "a", axial(10, dz=2.0), col=col, size=(30, 30))
    code, printed = convert(tmp_path, capsys)
    assert code == 0 and "sheared along the normal (gantry tilt or shear, 20.0 degrees)" in printed
    error, n = largest_error(tmp_path / "data" / "Images_nifti" / "a.nii.gz")
    assert error < 3.0 and n > 0.7 * 10 * 30 * 30  # an unsheared box put voxels up to 6 mm off


def test_a_truncated_slice_is_named_and_its_series_refused(tmp_path, capsys):
    write_series(tmp_path / "in" / "a", axial(6))
    victim = sorted((tmp_path / "in" / "a").iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])  # the header stays, the pixels are cut short
    code, printed = convert(tmp_path, capsys)
    assert code == 1 and victim.name in printed and "refused" in printed
    assert not (tmp_path / "data" / "Images_nifti" / "a.nii.gz").exists()


def test_two_slices_at_one_position_are_refused(tmp_path, capsys):
    write_series(tmp_path / "in" / "a", [*axial(4), axial(4)[2]])
    code, printed = convert(tmp_path, capsys)
    assert code == 1 and "lie at one position along the slice normal" in printed


def test_each_series_of_a_folder_is_its_own_volume_and_other_modalities_and_localizers_are_left_out(tmp_path, capsys):
    folder = tmp_path / "in" / "study"
    write_series(folder, axial(5), uid=UID + ".101")
    write_series(folder, axial(4, dz=3.0), uid=UID + ".202")
    write_series(folder, axial(3), uid=UID + ".303", modality="MR")
    write_series(
        folder,
        [(-20.0, -15.0, 40.0)],
        uid=UID + ".101",
        row=(1, 0, 0),
        col=(0, 0, -1),
        image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
        prefix="scout",
    )
    code, printed = convert(tmp_path, capsys)
    assert code == 0
    assert sorted(os.listdir(tmp_path / "data" / "Images_nifti")) == ["study_211257101.nii.gz", "study_211257202.nii.gz"]
    assert "MR, not CT: skipped" in printed and "a localizer (ImageType LOCALIZER): left out" in printed
    assert nib.load(tmp_path / "data" / "Images_nifti" / "study_211257101.nii.gz").shape[2] == 5


def test_an_output_folder_inside_the_input_is_never_read_back(tmp_path, capsys):
    write_series(tmp_path / "in" / "a", axial(5))
    argv = ["--in_dir", str(tmp_path / "in"), "--out_dir", str(tmp_path / "in" / "nifti")]
    assert ct_to_nifti.main(argv) == 0
    assert ct_to_nifti.main(argv) == 0
    assert os.listdir(tmp_path / "in" / "nifti") == ["a.nii.gz"]
    assert "1 skipped" in capsys.readouterr().out
