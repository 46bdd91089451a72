"""predict.py: label maps in each input's own geometry, reproducing the validation Dice."""

import argparse
import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import finetune
import predict
from tools.tiny_data import write_cube_task


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    write_cube_task(str(root / "task"), n=4)
    split = {"train": ["c0", "c1", "c2"], "val": ["c3"]}
    (root / "split.json").write_text(json.dumps(split))
    parser = argparse.ArgumentParser(parents=[finetune.get_args_parser()])
    args = parser.parse_args(
        ["--data_dir", str(root / "task"), "--output_dir", str(root / "out"), "--arch", "res3d10", "--spacing", "2",
         "--patch_size", "16", "48", "48", "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--lr", "1e-3",
         "--split_file", str(root / "split.json")]
    )  # fmt: skip
    finetune.main(args)
    return root


def test_a_prediction_has_its_input_geometry_and_reproduces_the_validation_dice(trained, tmp_path):
    image = trained / "task" / "imagesTr" / "c3.nii.gz"
    assert predict.main(["--model", str(trained / "out"), "--input", str(image), "--output", str(tmp_path / "p"), "--device", "cpu"]) == 0
    out = sitk.ReadImage(str(tmp_path / "p" / "c3.nii.gz"))
    ref = sitk.ReadImage(str(image))
    assert out.GetSize() == ref.GetSize()
    assert np.allclose(out.GetSpacing(), ref.GetSpacing()) and np.allclose(out.GetOrigin(), ref.GetOrigin())
    assert np.allclose(out.GetDirection(), ref.GetDirection())
    pred = sitk.GetArrayFromImage(out) == 1
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(trained / "task" / "labelsTr" / "c3.nii.gz"))) == 1
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    import torch

    best = torch.load(trained / "out" / "best.pth", weights_only=True)
    assert dice == pytest.approx(best["dice"][0], abs=1e-4)


def test_a_dataset_folder_predicts_its_imagests_in_a_rotated_geometry(trained, tmp_path):
    task = tmp_path / "task"
    os.makedirs(task / "imagesTs")
    (task / "dataset.json").write_text((trained / "task" / "dataset.json").read_text())
    img = nib.load(trained / "task" / "imagesTr" / "c2.nii.gz")
    affine = img.affine @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 23], [0, 0, 0, 1]])  # axes swapped, depth flipped
    data = np.asarray(img.dataobj).transpose(1, 0, 2)[:, :, ::-1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), task / "imagesTs" / "x_0000.nii.gz")
    assert predict.main(["--model", str(trained / "out" / "best.pth"), "--input", str(task), "--output", str(tmp_path / "p"), "--tta"]) == 0
    out = sitk.ReadImage(str(tmp_path / "p" / "x.nii.gz"))
    ref = sitk.ReadImage(str(task / "imagesTs" / "x_0000.nii.gz"))
    assert out.GetSize() == ref.GetSize() and np.allclose(out.GetDirection(), ref.GetDirection())
    assert np.allclose(out.GetOrigin(), ref.GetOrigin())
