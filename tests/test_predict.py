"""predict.py: label maps in each input's own geometry, reproducing the validation Dice."""

import argparse
import json
import os
import shutil

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


def _msd_folder(trained, folder):
    """Two MSD-style images (no _0000) in `folder`, as a user's imagesTr holds them."""
    os.makedirs(folder)
    for case in ("c2", "c3"):
        shutil.copy(trained / "task" / "imagesTr" / f"{case}.nii.gz", folder / f"{case}.nii.gz")
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_an_output_folder_that_is_the_input_folder_is_refused_before_any_work(trained, tmp_path, capsys):
    folder = tmp_path / "images"
    before = _msd_folder(trained, folder)
    with pytest.raises(ValueError, match=r"c2.nii.gz' would be written over the input .*c2.nii.gz"):
        predict.main(["--model", str(trained / "out"), "--input", str(folder), "--output", str(folder), "--device", "cpu"])
    assert {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))} == before  # every input as it was
    link = tmp_path / "link"
    os.symlink(folder, link)  # the same folder under another name
    with pytest.raises(ValueError, match="would be written over the input"):
        predict.main(["--model", str(trained / "out"), "--input", str(folder), "--output", str(link), "--device", "cpu"])


def test_two_inputs_with_one_output_name_and_a_second_channel_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x_0000.nii.gz", "x.nii.gz"):
        (tmp_path / "a" / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"would both be written to .*x.nii.gz"):
        predict.check_outputs(predict.find_images(str(tmp_path / "a")), str(tmp_path / "out"))
    (tmp_path / "b").mkdir()
    for name in ("x_0000.nii.gz", "x_0001.nii.gz", "case_0001.nii.gz"):
        (tmp_path / "b" / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"second channel \(x_0001.nii.gz\)"):  # case_0001 alone is a case, not a channel
        predict.find_images(str(tmp_path / "b"))


def test_a_bad_image_is_named_the_others_are_predicted_and_the_exit_status_says_so(trained, tmp_path, capsys):
    folder = tmp_path / "images"
    _msd_folder(trained, folder)
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    status = predict.main(["--model", str(trained / "out"), "--input", str(folder), "--output", str(tmp_path / "p"), "--device", "cpu"])
    assert status == 1
    assert sorted(os.listdir(tmp_path / "p")) == ["c2.nii.gz", "c3.nii.gz", "console.log"]
    err = capsys.readouterr().err
    assert "1 image(s) could not be predicted" in err and "broken.nii.gz" in err


def test_a_two_file_prediction_keeps_no_temporary_name_and_survives_the_clean_up(trained, tmp_path):
    from preprocessing import files

    image = sitk.ReadImage(str(trained / "task" / "imagesTr" / "c3.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "c3.mhd"))
    assert predict.main(["--model", str(trained / "out"), "--input", str(tmp_path / "c3.mhd"), "--output", str(tmp_path / "p")]) == 0
    written = sorted(os.listdir(tmp_path / "p"))
    assert written in (["c3.mhd", "c3.raw", "console.log"], ["c3.mhd", "c3.zraw", "console.log"])
    files.remove_stale_partials(str(tmp_path / "p"))
    assert sitk.ReadImage(str(tmp_path / "p" / "c3.mhd")).GetSize() == image.GetSize()  # its data file is the one it names


def test_a_model_that_is_not_a_fine_tuning_checkpoint_is_named(tmp_path):
    import torch

    torch.save({"teacher": {}, "student": {}, "epoch": 1}, tmp_path / "pretrain.pth")
    with pytest.raises(KeyError, match=r"pretrain.pth' holds no 'model' or 'num_classes' entry .*expected a fine-tuning checkpoint"):
        predict.load_model(str(tmp_path / "pretrain.pth"), torch.device("cpu"))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match=r"notes.pth' is not a torch checkpoint"):
        predict.load_model(str(tmp_path / "notes.pth"), torch.device("cpu"))


def test_tta_takes_the_trainers_flag_style_and_the_bare_flag(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(predict, "load_model", lambda path, device: (None, {}))
    monkeypatch.setattr(predict, "find_images", lambda path: [])
    monkeypatch.setattr(predict, "predict_all", lambda model, run_args, images, args, device: seen.append(args.tta) or 0)
    for flag, expected in (([], False), (["--tta"], True), (["--tta", "True"], True), (["--tta", "False"], False)):
        predict.main(["--model", "m", "--input", "i", "--output", str(tmp_path / "p"), "--device", "cpu", *flag])
        assert seen.pop() is expected


def test_an_ensemble_averages_probabilities_and_refuses_runs_that_cannot_be_averaged(trained, tmp_path, monkeypatch):
    image = trained / "task" / "imagesTr" / "c3.nii.gz"
    model = str(trained / "out")
    assert predict.main(["--model", model, "--input", str(image), "--output", str(tmp_path / "one"), "--device", "cpu"]) == 0
    assert predict.main(["--model", model, model, "--input", str(image), "--output", str(tmp_path / "two"), "--device", "cpu"]) == 0
    one, two = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / "c3.nii.gz"))) for d in ("one", "two"))
    assert np.array_equal(one, two)  # the mean of two equal probability maps is that map
    import torch

    x = torch.randn(1, 1, 16, 32, 32)
    nets = [torch.nn.Conv3d(1, 3, 1), torch.nn.Conv3d(1, 3, 1)]
    mean = (torch.softmax(nets[0](x), 1) + torch.softmax(nets[1](x), 1)) / 2
    assert torch.allclose(torch.softmax(predict.Ensemble(nets)(x), 1), mean, atol=1e-6)
    runs = {"a": {"spacing": 2.0, "num_classes": 2, "classes": ["box"]}, "b": {"spacing": 1.0, "num_classes": 2, "classes": ["box"]}}
    monkeypatch.setattr(predict, "load_model", lambda path, device: (torch.nn.Identity(), runs[path]))
    with pytest.raises(ValueError, match=r"--model 'b' has spacing 1.0, 'a' 2.0: they cannot be averaged"):
        predict.load_models(["a", "b"], torch.device("cpu"))


def test_an_overlay_picture_is_drawn_on_request_beside_the_label_maps(trained, tmp_path):
    from PIL import Image

    image = trained / "task" / "imagesTr" / "c3.nii.gz"
    out = tmp_path / "p"
    assert predict.main(["--model", str(trained / "out"), "--input", str(image), "--output", str(out), "--overlay", "True"]) == 0
    assert sorted(os.listdir(out)) == ["c3.nii.gz", "console.log", "overlays"] and os.listdir(out / "overlays") == ["c3.png"]
    picture = Image.open(out / "overlays" / "c3.png")
    assert picture.format == "PNG" and picture.size[0] > 600


def test_a_torchscript_export_loads_back_and_segments_as_the_network_does(trained, tmp_path):
    import torch

    from tools.export_torchscript import main as export

    out = tmp_path / "model.pt"
    assert export([str(trained / "out"), str(out)]) == 0
    extra = {"desd.json": ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["desd.json"])
    assert meta["arch"] == "res3d10" and meta["num_classes"] == 2 and meta["spacing"] == 2
    model, _ = predict.load_model(str(trained / "out"), torch.device("cpu"))
    x = torch.randn(1, 1, 20, 56, 40)  # another size than the patch: the compiled network is not shape-bound
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_torchscript_export_that_differs_writes_nothing(trained, tmp_path, monkeypatch):
    import torch

    from tools import export_torchscript

    real = torch.jit.load

    def perturbed(*args, **kwargs):
        module = real(*args, **kwargs)
        return lambda x: module(x) + 1.0

    monkeypatch.setattr(torch.jit, "load", perturbed)
    out = tmp_path / "model.pt"
    with pytest.raises(RuntimeError, match="differs"):
        export_torchscript.export_torchscript(str(trained / "out"), str(out))
    assert not out.exists()


@pytest.mark.parametrize("fmt, name", [("torchscript", "model.pt"), ("export", "model.pt2")])
def test_the_plain_torch_loader_of_the_docs_segments_as_predict_does_with_either_export(trained, tmp_path, fmt, name):
    """The loader in tools/export_torchscript.py's docstring, run as written on both formats: its
    labels from raw HU equal those of the network on predict's network input."""
    import re

    import torch

    from tools import export_torchscript

    assert export_torchscript.main([str(trained / "out"), str(tmp_path / name), "--format", fmt]) == 0
    (snippet,) = re.findall(r"\n    import json, torch\n(.*?)\n\"\"\"", export_torchscript.__doc__ + '"""', flags=re.S)
    code = "\n".join(line[4:] for line in ("    import json, torch\n" + snippet).splitlines())
    if fmt == "export":
        code = code.replace('torch.jit.load("model.pt", _extra_files=extra)', 'torch.export.load("model.pt2", extra_files=extra).module()')
    model, run_args = predict.load_model(str(trained / "out"), torch.device("cpu"))
    hu = torch.randn(1, 1, *run_args["patch_size"], generator=torch.Generator().manual_seed(1)) * 600  # beyond the clip too
    scope = {"hu": hu}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(code, scope)
    finally:
        os.chdir(cwd)
    with torch.no_grad():
        expected = model(hu.clamp(-1024, 1024) / 1024).argmax(1)
    assert torch.equal(scope["labels"], expected)
    assert scope["meta"]["intensity"] == {"clip_hu": [-1024.0, 1024.0], "divide_by": 1024.0} and "(I, P, L)" in scope["meta"]["input"]


# ============ refusals: nothing lost, every message names its file or flag ============


def test_an_export_never_writes_over_its_checkpoint_nor_a_file_it_did_not_write(trained, tmp_path):
    from tools import export_torchscript

    best = trained / "out" / "best.pth"
    before = best.read_bytes()
    with pytest.raises(ValueError, match=r"best.pth' is the fine-tuned checkpoint being exported"):
        export_torchscript.main([str(trained / "out"), str(best)])
    assert best.read_bytes() == before
    other = tmp_path / "notes.pt"
    other.write_text("someone's file")
    with pytest.raises(FileExistsError, match=r"notes.pt' exists and is not an export of this tool.*--overwrite"):
        export_torchscript.main([str(best), str(other)])
    assert other.read_text() == "someone's file"
    out = tmp_path / "model.pt"
    assert export_torchscript.main([str(best), str(out)]) == 0
    assert export_torchscript.main([str(best), str(out)]) == 0  # its own export: replaced without asking
    assert export_torchscript.main([str(best), str(other), "--overwrite"]) == 0


def test_a_read_only_output_is_refused_before_the_lock_and_names_the_flag(trained, tmp_path, monkeypatch):
    """Permission bits do not stop root (CI runs as root), so the folder's refusal is injected
    where the write check creates its probe file."""
    import tempfile

    out = tmp_path / "ro"
    out.mkdir()
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(out):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    image = trained / "task" / "imagesTr" / "c3.nii.gz"
    with pytest.raises(PermissionError, match=r"--output '.*ro' cannot be written \(Permission denied\); nothing was written"):
        predict.main(["--model", str(trained / "out"), "--input", str(image), "--output", str(out), "--device", "cpu"])
    assert os.listdir(out) == []  # no run.lock left behind


def test_a_read_only_overlays_folder_costs_the_pictures_not_the_label_maps(trained, tmp_path, monkeypatch, capsys):
    import tempfile

    out = tmp_path / "p"
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.basename(str(dir)) == "overlays":
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    image = trained / "task" / "imagesTr" / "c3.nii.gz"
    argv = ["--model", str(trained / "out"), "--input", str(image), "--output", str(out), "--device", "cpu", "--overlay", "True"]
    assert predict.main(argv) == 0
    assert (out / "c3.nii.gz").exists() and not (out / "overlays" / "c3.png").exists()
    assert "overlays' cannot be written" in capsys.readouterr().err


def test_a_4d_image_is_named_with_its_shape_not_the_transform_object(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), folder / "four_d.nii.gz")
    assert predict.main(["--model", str(trained / "out"), "--input", str(folder), "--output", str(tmp_path / "p"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "four_d.nii.gz: ValueError" in err and "got shape (8, 8, 8, 2)" in err and "applying transform" not in err


def test_a_label_map_given_as_an_image_is_warned_about(trained, tmp_path, capsys):
    label = trained / "task" / "labelsTr" / "c3.nii.gz"
    assert predict.main(["--model", str(trained / "out"), "--input", str(label), "--output", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert "looks like a label map, not CT in HU" in capsys.readouterr().err
    image = trained / "task" / "imagesTr" / "c3.nii.gz"
    assert predict.main(["--model", str(trained / "out"), "--input", str(image), "--output", str(tmp_path / "q"), "--device", "cpu"]) == 0
    assert "looks like a label map" not in capsys.readouterr().err


def test_an_image_whose_header_spacing_is_absurd_is_refused_before_allocating(trained, tmp_path, capsys):
    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.diag([500.0, 500.0, 500.0, 1.0])), path)
    assert predict.main(["--model", str(trained / "out"), "--input", str(path), "--output", str(tmp_path / "p"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "huge.nii.gz: ValueError" in err and "spanning [4000, 4000, 4000] mm" in err and "is the header's spacing right?" in err


def test_a_run_keeps_its_console_in_console_log(trained, tmp_path, capsys):
    image = trained / "task" / "imagesTr" / "c3.nii.gz"
    label = trained / "task" / "labelsTr" / "c3.nii.gz"
    for path in (image, label):
        predict.main(["--model", str(trained / "out"), "--input", str(path), "--output", str(tmp_path / "p"), "--device", "cpu"])
    log = (tmp_path / "p" / "console.log").read_text()
    assert log.count("==== ") == 2 and "1 label maps in" in log and "looks like a label map" in log  # stdout and stderr
    assert "\r" not in log  # no progress bars
    assert "1 label maps in" in capsys.readouterr().out  # still on the console
    assert "==== " in (trained / "out" / "console.log").read_text() and "Dice" in (trained / "out" / "console.log").read_text()


def test_a_real_jpeg2000_dicom_folder_is_predicted_into_its_own_geometry(trained, tmp_path):
    """The real series of the reference scans (make realct): its label map has the series' size,
    spacing, origin and direction, as SimpleITK's own series reader gives them."""
    from tests.helpers import realct_files

    series = os.path.join(realct_files(), "example_ct_dicom")
    argv = ["--model", str(trained / "out"), "--input", series, "--output", str(tmp_path / "p"), "--device", "cpu", "--overlay", "True"]
    assert predict.main(argv) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(series))
    ref = reader.Execute()
    out = sitk.ReadImage(str(tmp_path / "p" / "example_ct_dicom.nii.gz"))
    assert out.GetSize() == ref.GetSize() == (512, 512, 20)
    assert np.allclose(out.GetSpacing(), ref.GetSpacing()) and np.allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    assert np.allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert (tmp_path / "p" / "overlays" / "example_ct_dicom.png").exists()


def test_the_overlays_colour_key_sits_below_the_slices_even_for_tall_images(tmp_path, monkeypatch):
    import utils

    drawn = {}

    def keep(fig, out, dpi=100, rect=None):
        fig.tight_layout(rect=rect)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        to_fig = fig.transFigure.inverted()
        drawn["key_top"] = to_fig.transform(fig.legends[0].get_window_extent(renderer))[1, 1]
        drawn["slices_bottom"] = min(to_fig.transform(ax.get_window_extent(renderer))[0, 1] for ax in fig.axes)
        return out

    monkeypatch.setattr(utils, "save_figure", keep)
    labels = np.zeros((10, 512, 512), np.uint8)  # a 512 x 512 DICOM-like slice: tall for its panel
    labels[:, 100:300, 100:300] = 1
    predict.draw_overlay(
        np.zeros_like(labels, dtype=np.float32), labels, ["liver", "spleen", "kidney", "stomach", "aorta", "heart"], "x.png"
    )
    assert drawn["key_top"] <= drawn["slices_bottom"] + 1e-3
