"""Own CT for pretraining: NIfTI in any orientation, or DICOM series, to the same patches."""

import os

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from preprocessing import ct_to_nifti
from preprocessing import re_spacing_ITK as s2
from preprocessing import splitting_to_patches as s3
from preprocessing.network_input import RAS_LABELS

NIH = np.array([[0, -0.8, 0, 10.0], [-0.8, 0, 0, -20.0], [0, 0, -2.0, 30.0], [0, 0, 0, 1]])  # ('P', 'L', 'I'), DeepLesion's


def stored_as(arr, affine, axcodes):
    """The same volume stored in another orientation: data permuted and flipped, affine compensating."""
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(axcodes, labels=RAS_LABELS))
    return nib.orientations.apply_orientation(arr, transform), affine @ nib.orientations.inv_ornt_aff(transform, arr.shape)


def test_a_volume_in_any_orientation_gives_the_patches_of_its_pli_copy(tmp_path):
    rng = np.random.default_rng(0)
    pli = rng.integers(-1000, 1500, (40, 36, 30)).astype(np.int16)  # (x, y, z) of nibabel, x -> P, y -> L, z -> I
    src = tmp_path / "ct"
    for codes in ("PLI", "RAS", "LPS", "SRA", "IPL"):
        arr, affine = stored_as(pli, NIH, codes)
        assert "".join(nib.aff2axcodes(affine)) == codes
        (src / codes).mkdir(parents=True)
        nib.save(nib.Nifti1Image(arr, affine), src / codes / "vol.nii.gz")
    root = tmp_path / "data"
    assert ct_to_nifti.main(["--in_dir", str(src), "--data_root", str(root)]) == 0
    assert s2.main(["--data_root", str(root), "--workers", "1"]) == 0
    assert s3.main(["--data_root", str(root), "--workers", "1"]) == 0
    written = {codes: nib.load(root / "Images_nifti" / f"{codes}_vol.nii.gz") for codes in ("PLI", "RAS", "LPS", "SRA", "IPL")}
    for codes, img in written.items():
        assert nib.aff2axcodes(img.affine) == ("P", "L", "I"), codes
        assert np.array_equal(np.asarray(img.dataobj), pli) and np.allclose(img.affine, NIH), codes
    patches = sorted(os.listdir(root / "DL_patches_v2"))
    reference = [p for p in patches if p.startswith("PLI_")]
    assert reference and len(patches) == 5 * len(reference)
    for name in reference:
        want = np.asarray(nib.load(root / "DL_patches_v2" / name).dataobj)
        for codes in ("RAS", "LPS", "SRA", "IPL"):
            got = np.asarray(nib.load(root / "DL_patches_v2" / name.replace("PLI_", f"{codes}_")).dataobj)
            assert np.array_equal(got, want), (codes, name)


def write_dicom_series(folder, arr_zyx, spacing, origin):
    """A CT series as scanners export it: one file a slice, with position, orientation and spacing."""
    os.makedirs(folder)
    volume = sitk.GetImageFromArray(arr_zyx)
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(arr_zyx.shape[0]):
        image = volume[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing[2]),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{k:03d}.dcm"))
        writer.Execute(image)


def test_a_dicom_series_becomes_one_volume_in_the_pretraining_orientation(tmp_path, capsys):
    rng = np.random.default_rng(1)
    arr = rng.integers(-1000, 1500, (12, 20, 24)).astype(np.int16)  # SimpleITK's (z, y, x)
    write_dicom_series(str(tmp_path / "dicom" / "patient1"), arr, (0.7, 0.7, 2.5), (-50.0, -60.0, 100.0))
    (tmp_path / "dicom" / "broken.nii.gz").write_bytes(b"not a volume")
    assert ct_to_nifti.main(["--in_dir", str(tmp_path / "dicom"), "--data_root", str(tmp_path / "data")]) == 1
    assert "broken.nii.gz" in capsys.readouterr().err  # named in the summary; the series is still written
    img = nib.load(tmp_path / "data" / "Images_nifti" / "patient1.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("P", "L", "I")
    assert np.allclose(sorted(img.header.get_zooms()), [0.7, 0.7, 2.5])
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "data" / "Images_nifti" / "patient1.nii.gz")))
    assert sorted(back.ravel().tolist()) == sorted(arr.ravel().tolist())  # every voxel kept, reoriented only
    assert ct_to_nifti.main(["--in_dir", str(tmp_path / "dicom"), "--data_root", str(tmp_path / "data")]) == 1
    assert "1 skipped" in capsys.readouterr().out
