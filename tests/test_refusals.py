"""Hostile but realistic inputs on the commands' surfaces: each is injected, ends in the right
outcome, and is reported in one message that names the file or flag, the value and what was
expected. Nothing already written is lost. (Prediction and export: tests/test_predict.py.)"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from preprocessing import files
from tests.helpers import TINY_TRAIN_ARGS, run_main_desd, write_cube_task, write_series
from tests.test_nnunet import source_plans, write_raw, write_teacher

# ============ nnU-Net plans ============


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """$nnUNet_raw and $nnUNet_preprocessed with Dataset009_X, its raw cases and nnU-Net's plans."""
    raw, pre = tmp_path / "raw" / "Dataset009_X", tmp_path / "pre" / "Dataset009_X"
    write_raw(str(raw), n_train=2)
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(source_plans()))
    monkeypatch.setenv("nnUNet_raw", str(raw.parent))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre.parent))
    return pre


def plans(*argv):
    from downstream import nnunet

    return nnunet.plans_main(["-d", "9", "--arch", "res3d10", *argv])


def test_plans_never_replace_nnunets_own_plans_nor_a_file_they_did_not_write(nnunet_dirs):
    theirs = (nnunet_dirs / "nnUNetPlans.json").read_text()
    with pytest.raises(SystemExit, match="--plans_name 'nnUNetPlans' is the source plans' name"):
        plans("--plans_name", "nnUNetPlans")
    (nnunet_dirs / "Other.json").write_text('{"someone": "else"}')
    with pytest.raises(SystemExit, match=r"Other.json' exists and is not plans that desd-nnunet-plans wrote.*--overwrite"):
        plans("--plans_name", "Other")
    assert (nnunet_dirs / "nnUNetPlans.json").read_text() == theirs
    assert (nnunet_dirs / "Other.json").read_text() == '{"someone": "else"}'
    assert plans() == 0 and plans() == 0  # its own plans: rewritten on a rerun
    assert plans("--plans_name", "Other", "--overwrite") == 0


def test_plans_refuse_a_weights_file_they_did_not_write(nnunet_dirs, tmp_path):
    write_teacher(tmp_path / "teacher.pth", "res3d10")
    mine = tmp_path / "precious.pth"
    mine.write_bytes(b"not yours")
    with pytest.raises(SystemExit, match="precious.pth' exists and is not a weights file that desd-nnunet-plans wrote"):
        plans("--pretrained", str(tmp_path / "teacher.pth"), "--weights_out", str(mine))
    assert mine.read_bytes() == b"not yours" and not (nnunet_dirs / "nnUNetPlans_DeSD.json").exists()
    assert plans("--pretrained", str(tmp_path / "teacher.pth")) == 0
    assert plans("--pretrained", str(tmp_path / "teacher.pth")) == 0  # its own weights file: rewritten


@pytest.mark.parametrize("spacing", ["0", "-1", "nan", "x"])
def test_a_spacing_that_is_not_above_zero_is_refused_at_parse_time(nnunet_dirs, spacing, capsys):
    with pytest.raises(SystemExit) as stop:
        plans("--spacing", spacing)
    assert stop.value.code == 2 and f"--spacing: {spacing!r}" in capsys.readouterr().err
    assert not (nnunet_dirs / "nnUNetPlans_DeSD.json").exists()


def test_a_patch_that_is_not_a_multiple_of_the_stride_is_refused_at_parse_time(nnunet_dirs, capsys):
    with pytest.raises(SystemExit) as stop:
        plans("--patch_size", "64", "100", "128")
    assert (
        stop.value.code == 2 and "--patch_size 64 100 128: each side must be a multiple of the encoder's stride" in capsys.readouterr().err
    )


def test_a_plans_name_that_leaves_the_preprocessed_folder_is_refused(nnunet_dirs):
    with pytest.raises(SystemExit, match=r"--plans_name '\.\./\.\./x\.json': expected a plain file name"):
        plans("--plans_name", "../../x")
    assert not (nnunet_dirs.parent.parent / "x.json").exists()


def test_damaged_source_plans_are_named(nnunet_dirs):
    path = nnunet_dirs / "nnUNetPlans.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(SystemExit, match=r"nnUNetPlans.json: not valid JSON .*is the file cut short"):
        plans()
    broken = source_plans()
    del broken["transpose_forward"]
    path.write_text(json.dumps(broken))
    with pytest.raises(SystemExit, match=r"nnUNetPlans.json: not nnU-Net v2 plans, or damaged: no transpose_forward"):
        plans()


def test_a_2d_configuration_is_refused(nnunet_dirs):
    two_d = source_plans()
    two_d["configurations"]["2d"] = {**two_d["configurations"]["2d"], "patch_size": [160, 160]}
    (nnunet_dirs / "nnUNetPlans.json").write_text(json.dumps(two_d))
    with pytest.raises(SystemExit, match=r"configuration '2d' is 2-D; the DeSD network is 3-D"):
        plans("-c", "2d")


# ============ output folders ============


def test_an_output_dir_that_is_a_file_is_named_for_every_trainer(tmp_path, patch_root):
    import evaluate
    import finetune

    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"--output_dir '.*taken' is a file, not a folder"):
        run_main_desd(["--data_path", patch_root, "--output_dir", str(taken), *TINY_TRAIN_ARGS])
    write_cube_task(str(tmp_path / "task"), n=3)
    with pytest.raises(NotADirectoryError, match=r"--output_dir '.*taken' is a file, not a folder"):
        finetune.run(["--data_dir", str(tmp_path / "task"), "--output_dir", str(taken), "--device", "cpu"])
    with pytest.raises(NotADirectoryError, match=r"--out '.*taken' is a file, not a folder"):
        evaluate.main(["--config", "smoke", "--out", str(taken)])
    assert taken.read_text() == "a file"


def test_a_folder_that_cannot_be_written_is_refused_before_the_lock(tmp_path, patch_root, monkeypatch):
    import tempfile

    out = tmp_path / "ro"
    out.mkdir()
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):  # root ignores permission bits: the refusal is injected
        if dir is not None and os.path.realpath(dir) == os.path.realpath(out):
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=r"--output_dir '.*ro' cannot be written \(Read-only file system\); nothing was written"):
        run_main_desd(["--data_path", patch_root, "--output_dir", str(out), *TINY_TRAIN_ARGS])
    assert os.listdir(out) == []


def test_a_full_disk_during_the_cache_build_is_blamed_on_the_cache(tmp_path, monkeypatch):
    from downstream import cache, labelled

    write_cube_task(str(tmp_path / "task"), n=2)
    case = labelled.read_dataset(str(tmp_path / "task")).cases[0]

    def short_write(path, arr, *args, **kwargs):  # what numpy raises when the disk fills mid-write
        raise OSError("4800 requested and 992 written")

    (tmp_path / "cache").mkdir()  # build() makes it before any case
    monkeypatch.setattr(np, "save", short_write)
    result = cache.preprocess_case(case, 2.0, str(tmp_path / "cache"))
    assert result.error.startswith(f"the preprocessed cache {tmp_path / 'cache'}: could not write")
    assert "--preprocessed_dir" in result.error and case["image"] not in result.error


# ============ pretraining inputs ============


def test_a_list_path_that_is_a_folder_is_named_as_a_folder(tmp_path, patch_root):
    from dataset import read_list

    os.makedirs(os.path.join(patch_root, "lists"))
    with pytest.raises(IsADirectoryError, match=r"--list_path 'lists': .* is a folder; expected the list file"):
        read_list(patch_root, "lists")


def test_patches_smaller_than_the_views_are_warned_about(tmp_path, capsys):
    from dataset import SSLDataset, ViewConfig

    (tmp_path / "p").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4)), tmp_path / "p" / "tiny.nii.gz")
    (tmp_path / "list.txt").write_text("p/tiny.nii.gz\n")
    SSLDataset(str(tmp_path), "list.txt", ViewConfig())
    assert "1 of the patches sampled are smaller than the global views (96 x 96 in-plane, 16 slices), e.g. tiny.nii.gz (1 x 1 x 1)" in (
        capsys.readouterr().out
    )


def test_a_pretrained_file_that_is_text_is_named_without_torchs_advice(tmp_path):
    from models import create_model
    from models.pretrained import load_pretrained_encoder

    (tmp_path / "teacher.pth").write_text("https://example.org/checkpoint.pth\n")
    with pytest.raises(RuntimeError) as err:
        load_pretrained_encoder(create_model("res3d10"), str(tmp_path / "teacher.pth"))
    assert "teacher.pth' is not a torch checkpoint" in str(err.value) and "weights_only" not in str(err.value)


def test_plot_log_refuses_an_empty_log(tmp_path, capsys):
    from tools import plot_log

    (tmp_path / "log.txt").write_text("")
    with pytest.raises(SystemExit):
        plot_log.main([str(tmp_path / "log.txt"), "--out", str(tmp_path / "c.png")])
    assert "holds no epoch yet" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


# ============ preprocessing inputs ============


def test_an_all_nan_volume_is_refused_and_a_partly_nan_one_warned_about(tmp_path):
    from preprocessing import splitting_to_patches as s3
    from preprocessing.runner import JobResult

    result = JobResult("v")
    with pytest.raises(ValueError, match="v.nii: no finite value"):
        s3.as_int16(np.full((4, 4, 4), np.nan, np.float32), "v.nii", result)
    vol = np.full((4, 4, 4), -1000.0, np.float32)
    vol[0, 0, 0] = np.nan
    vol[1, 1, 1] = 40.4
    out = s3.as_int16(vol, "v.nii", result)
    assert out[0, 0, 0] == -1000 and out[1, 1, 1] == 40 and out.dtype == np.int16
    assert result.warnings == ["v.nii: 1 NaN or infinite voxels, written as -1000 (its lowest value)"]


def test_an_all_nan_volume_file_is_named_by_the_split_script(tmp_path, capsys):
    from preprocessing import splitting_to_patches as s3

    src = tmp_path / "Images_nifti_spacing"
    src.mkdir()
    img = sitk.GetImageFromArray(np.full((30, 40, 40), np.nan, np.float32))
    sitk.WriteImage(img, str(src / "000001_01_01_001-030.nii.gz"))
    assert s3.main(["--data_root", str(tmp_path), "--workers", "1"]) == 1
    assert "000001_01_01_001-030.nii.gz: no finite value" in capsys.readouterr().err


@pytest.mark.parametrize("rename", [lambda i: f"{i}.png", lambda i: f"{i:03d}.PNG"], ids=["unpadded", "upper-case"])
def test_png_slices_named_without_padding_or_in_upper_case_are_read(tmp_path, rename):
    from preprocessing import DL_save_nifti as s1

    root = str(tmp_path)
    slices = write_series(root, "000001_01_01", [9, 10, 11], shape=(32, 32))
    folder = os.path.join(root, "Images_png", "000001_01_01")
    for i in (9, 10, 11):
        os.rename(os.path.join(folder, f"{i:03d}.png"), os.path.join(folder, rename(i)))
    assert s1.main(["--data_root", root, "--workers", "1"]) == 0
    (name,) = os.listdir(os.path.join(root, "Images_nifti"))
    volume = np.asanyarray(nib.load(os.path.join(root, "Images_nifti", name)).dataobj)
    assert [np.array_equal(volume[:, :, k], slices[i]) for k, i in enumerate((9, 10, 11))] == [True] * 3


def test_an_in_dir_that_is_a_file_is_named_as_a_file(tmp_path):
    from preprocessing import ct_to_nifti

    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"--in_dir '.*scan.nii.gz' is a file, not a folder"):
        ct_to_nifti.main(["--in_dir", str(tmp_path / "scan.nii.gz"), "--data_root", str(tmp_path / "out")])


# ============ the compiled chain ============


def test_a_cached_library_that_is_not_the_build_is_rebuilt(compiled_chain, monkeypatch):
    from augment import native_chain

    path = native_chain._build()
    assert native_chain._intact(path)
    original = open(path, "rb").read()
    try:
        with open(path, "ab") as f:
            f.write(b"tampered")
        assert not native_chain._intact(path)
        rebuilt = native_chain._build()
        assert native_chain._intact(rebuilt) and open(rebuilt, "rb").read() != original + b"tampered"
    finally:
        if not native_chain._intact(path):
            files.write_atomic(path, lambda tmp: open(tmp, "wb").write(original))


def test_the_library_key_names_the_compilers_file_size_and_time(tmp_path):
    from augment import native_chain

    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    first = native_chain._compiler_identity(str(fake))
    os.utime(fake, ns=(1, 1))
    assert first[0] == str(fake) and native_chain._compiler_identity(str(fake)) != first


def test_plot_log_never_writes_over_its_log_nor_a_file_that_is_no_picture(tmp_path, capsys):
    from tools import plot_log

    log = tmp_path / "log.txt"
    log.write_text('{"epoch": 0, "loss": 1.0}\n')
    with pytest.raises(SystemExit):
        plot_log.main([str(log), "--out", str(log)])
    assert "is the log" in capsys.readouterr().err and log.read_text() == '{"epoch": 0, "loss": 1.0}\n'
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    with pytest.raises(FileExistsError, match="notes.png' exists and is not a picture"):
        plot_log.main([str(log), "--out", str(notes)])
    assert notes.read_text() == "not a picture"
    assert plot_log.main([str(log), "--out", str(tmp_path / "c.png")]) == 0
    assert plot_log.main([str(log), "--out", str(tmp_path / "c.png")]) == 0  # a picture: replaced
