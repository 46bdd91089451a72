"""Labelled sets in the layouts users have: reading, splits, orientation, integrity."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from downstream import labelled
from tests.helpers import NIH, volume, write_msd, write_nnunet


def test_msd_and_nnunet_v2_layouts_give_the_same_cases_and_classes(tmp_path):
    msd = labelled.read_dataset(write_msd(str(tmp_path / "msd")))
    nn = labelled.read_dataset(write_nnunet(str(tmp_path / "nn"), ignore=True))
    assert msd.layout == "msd" and nn.layout == "nnunetv2"
    assert msd.class_names == nn.class_names == ["liver", "tumour"] and nn.ignore == 3 and msd.ignore is None
    assert [c["id"] for c in nn.cases] == ["liver_000", "liver_001", "liver_002"]
    assert nn.cases[0]["image"].endswith("imagesTr/liver_000_0000.nii.gz")
    flipped = labelled.read_dataset(write_msd(str(tmp_path / "names"), labels={"background": 0, "liver": 1}))  # name -> index
    assert flipped.class_names == ["liver"]


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".nii"])
def test_other_formats_read_through_simpleitk_or_nibabel(tmp_path, ending):
    data = labelled.read_dataset(write_nnunet(str(tmp_path / "nn"), n=2, ending=ending))
    arr, affine = labelled.read_volume(data.cases[0]["label"])
    assert arr.shape == (20, 18, 12) and np.array_equal(arr, volume(0)[1])
    assert labelled.check_integrity(data) == []


def test_a_layout_it_cannot_read_is_named_not_reported_as_no_cases(tmp_path):
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    with pytest.raises(ValueError, match="neither a 'training' list"):
        labelled.read_dataset(str(tmp_path / "x"))
    write_nnunet(str(tmp_path / "y"), n=2)
    meta = json.loads((tmp_path / "y" / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (tmp_path / "y" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="2 input channels"):
        labelled.read_dataset(str(tmp_path / "y"))


def test_splits_seeded_from_a_file_of_ids_or_nnunet_folds(tmp_path):
    data = labelled.read_dataset(write_nnunet(str(tmp_path / "nn"), n=4))
    train, val = labelled.split_cases(data.cases, val_fraction=0.25, seed=1)
    assert len(train) == 3 and len(val) == 1 and labelled.split_cases(data.cases, val_fraction=0.25, seed=1) == (train, val)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["liver_000", "liver_001"], "val": ["liver_003"]}))
    train, val = labelled.split_cases(data.cases, str(tmp_path / "split.json"))
    assert [c["id"] for c in train] == ["liver_000", "liver_001"] and [c["id"] for c in val] == ["liver_003"]
    folds = [{"train": ["liver_000", "liver_001", "liver_002"], "val": ["liver_003"]}, {"train": ["liver_003"], "val": ["liver_000"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    train, val = labelled.split_cases(data.cases, str(tmp_path / "splits_final.json"), fold=1)
    assert [c["id"] for c in val] == ["liver_000"]
    with pytest.raises(ValueError, match="2 folds"):
        labelled.split_cases(data.cases, str(tmp_path / "splits_final.json"), fold=5)


def network_input(path, label_path, spacing=2.0):
    from monai.transforms import Compose

    item = Compose(labelled.preprocessing(spacing))({"image": path, "label": label_path})
    return item["image"], item["label"]


@pytest.mark.parametrize("change", ["flip0", "flip1", "flip2", "swap01", "swap02"])
def test_a_volume_stored_in_another_orientation_gives_the_same_network_input(tmp_path, change):
    img, lab = volume(3)
    nib.save(nib.Nifti1Image(img, NIH), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(lab, NIH), tmp_path / "a_lab.nii.gz")
    arr, alab, affine = img, lab, NIH.copy()
    if change.startswith("flip"):  # the same anatomy, one axis stored backwards, the affine compensating
        ax = int(change[-1])
        arr, alab = np.flip(img, ax), np.flip(lab, ax)
        flip = np.eye(4)
        flip[ax, ax], flip[ax, 3] = -1, img.shape[ax] - 1
        affine = NIH @ flip
    else:  # two axes permuted
        a, b = int(change[-2]), int(change[-1])
        order = [0, 1, 2]
        order[a], order[b] = order[b], order[a]
        arr, alab = img.transpose(order), lab.transpose(order)
        perm = np.eye(4)[[*order, 3]].T
        affine = NIH @ perm
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(alab), affine), tmp_path / "b_lab.nii.gz")
    xa, la = network_input(str(tmp_path / "a.nii.gz"), str(tmp_path / "a_lab.nii.gz"))
    xb, lb = network_input(str(tmp_path / "b.nii.gz"), str(tmp_path / "b_lab.nii.gz"))
    assert xa.shape == xb.shape and torch.allclose(xa, xb, atol=1e-5) and torch.equal(la, lb)


def test_a_pli_volume_at_the_pretraining_spacing_enters_the_network_as_pretraining_reads_patches(tmp_path):
    img, lab = volume(4)
    affine = np.array([[0, -1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 0, 0, 1]])  # NIH's affine at 1 mm
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "p.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "p_lab.nii.gz")
    x, y = network_input(str(tmp_path / "p.nii.gz"), str(tmp_path / "p_lab.nii.gz"), spacing=1.0)
    expected = np.clip(img.astype(np.float32), -1024, 1024).transpose(2, 0, 1) / 1024  # depth first, nibabel's (x, y): dataset.py
    assert x.shape == (1, 12, 20, 18) and np.allclose(x[0].numpy(), expected, atol=1e-5)
    assert np.array_equal(y[0].numpy(), lab.transpose(2, 0, 1))


def test_integrity_check_lists_every_problem_with_its_file(tmp_path):
    root = write_nnunet(str(tmp_path / "nn"), n=4)
    img, lab = volume(0)
    bad = lab.copy()
    bad[0, 0, 0] = 7  # undeclared value
    nib.save(nib.Nifti1Image(bad, NIH), os.path.join(root, "labelsTr", "liver_000.nii.gz"))
    nib.save(nib.Nifti1Image(lab[:, :, :10], NIH), os.path.join(root, "labelsTr", "liver_001.nii.gz"))  # another shape
    nib.save(nib.Nifti1Image(lab, NIH @ np.diag([2, 1, 1, 1])), os.path.join(root, "labelsTr", "liver_002.nii.gz"))  # spacing
    nib.save(nib.Nifti1Image(np.stack([img, img], -1), NIH), os.path.join(root, "imagesTr", "liver_003_0000.nii.gz"))  # 2 channels
    problems = labelled.check_integrity(labelled.read_dataset(root))
    text = "\n".join(problems)
    assert "liver_000.nii.gz: label values [7] are not declared" in text
    assert "liver_001.nii.gz: shape" in text
    assert "liver_002.nii.gz: spacing" in text
    assert "liver_003_0000.nii.gz" in text and "channels" in text
    assert labelled.main(["--data_dir", root]) == 1


def _relabel(root, case, array=None, affine=None):
    """Rewrite one case's label with another array or affine (NIfTI)."""
    path = os.path.join(root, "labelsTr", f"case{case}.nii.gz")
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if array is None else array, img.affine if affine is None else affine), path)
    return path


def test_a_label_off_its_image_by_origin_or_direction_is_found(tmp_path):
    root = write_msd(str(tmp_path / "t"))
    shifted = NIH.copy()
    shifted[:3, 3] += (20.0, 0.0, 0.0)  # 20 mm off along x
    turn = np.radians(20)
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    rotated = NIH.copy()
    rotated[:3, :3] = rotation @ NIH[:3, :3]  # still ('P', 'L', 'I'): the axis codes alone pass it
    assert nib.aff2axcodes(rotated) == nib.aff2axcodes(NIH)
    moved, turned = _relabel(root, 0, affine=shifted), _relabel(root, 1, affine=rotated)
    problems = labelled.check_integrity(labelled.read_dataset(root))
    assert any(p.startswith(moved) and "20 mm from its image's" in p for p in problems), problems
    assert any(p.startswith(turned) and "direction differs" in p and "20 degrees" in p for p in problems), problems
    assert not any(p.startswith(os.path.join(root, "labelsTr", "case2")) for p in problems)


def test_float_labels_are_rounded_to_their_class_and_others_refused(tmp_path):
    root = write_msd(str(tmp_path / "t"))
    _, lab = volume(0)
    stored = lab.astype(np.float32) - 2e-5 * (lab > 0)  # 0.99998 and 1.99998, as some writers store them
    _relabel(root, 0, array=stored)
    data = labelled.read_dataset(root)
    assert labelled.check_integrity(data) == []
    item = labelled.LoadCT(("label",))({"label": data.cases[0]["label"]})
    assert np.array_equal(item["label"][0].numpy(), lab)  # never truncated to 0 and 1
    _relabel(root, 1, array=lab.astype(np.float32) * 0.6)
    problems = labelled.check_integrity(labelled.read_dataset(root))
    assert any("case1.nii.gz: label value 0.6" in p and "not a class index" in p for p in problems), problems


def test_a_label_that_is_the_image_and_undeclared_values_are_named_in_a_bounded_list(tmp_path):
    root = write_msd(str(tmp_path / "t"))
    meta = json.loads(open(os.path.join(root, "dataset.json")).read())
    meta["training"][0]["label"] = meta["training"][0]["image"]
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    noisy = np.random.default_rng(0).integers(0, 200, volume(1)[1].shape).astype(np.uint8)
    _relabel(root, 1, array=noisy)
    problems = labelled.check_integrity(labelled.read_dataset(root))
    assert any("case0.nii.gz: the label is the image file itself" in p for p in problems), problems
    listing = next(p for p in problems if "case1.nii.gz" in p)
    assert "(197 in all)" in listing and "is this an image" in listing and len(listing) < 400


def test_region_labels_and_duplicate_case_names_are_refused_by_name(tmp_path):
    root = write_nnunet(str(tmp_path / "nn"))
    meta = json.loads(open(os.path.join(root, "dataset.json")).read())
    meta["labels"]["whole"] = [1, 2]
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"region-based labels \(whole map to lists"):
        labelled.read_dataset(root)
    msd = write_msd(str(tmp_path / "msd"))
    os.makedirs(os.path.join(msd, "more"))
    os.replace(os.path.join(msd, "imagesTr", "case2.nii.gz"), os.path.join(msd, "more", "case1.nii.gz"))
    meta = json.loads(open(os.path.join(msd, "dataset.json")).read())
    meta["training"][2]["image"] = "./more/case1.nii.gz"
    with open(os.path.join(msd, "dataset.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="two cases named 'case1'"):
        labelled.read_dataset(msd)


def test_a_cut_short_dataset_json_an_entry_without_label_and_odd_splits_are_named(tmp_path):
    root = write_msd(str(tmp_path / "t"), n=4)
    path = os.path.join(root, "dataset.json")
    whole = open(path).read()
    with open(path, "w") as f:
        f.write(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"dataset.json: not valid JSON .*cut short"):
        labelled.read_dataset(root)
    meta = json.loads(whole)
    del meta["training"][1]["label"]
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"training entry 1 .* needs both 'image' and 'label'"):
        labelled.read_dataset(root)
    with open(path, "w") as f:
        f.write(whole)
    cases = labelled.read_dataset(root).cases
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"training": ["case0"], "val": ["case1"]}))
    with pytest.raises(ValueError, match=r"expected keys 'train' and 'val' \(found \['training', 'val'\]\)"):
        labelled.split_cases(cases, str(split))
    with pytest.raises(ValueError, match=r"--val_fraction 0.99 of 4 cases leaves no case to train on"):
        labelled.split_cases(cases, "", val_fraction=0.99)
