import argparse
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import finetune
from models import create_model
from models.pretrained import load_pretrained_encoder
from models.segmentation import Res3DSegmentation
from tests.helpers import TINY_TRAIN_ARGS, free_port, run_main_desd, write_cube_task


@pytest.mark.parametrize("shape", [(16, 64, 64), (13, 50, 70), (20, 33, 97)])
def test_segmentation_output_has_the_input_shape(shape):
    torch.manual_seed(0)
    model = Res3DSegmentation(create_model("res3d10"), num_classes=3)
    out = model(torch.randn(1, 1, *shape))
    assert out.shape == (1, 3, *shape) and torch.isfinite(out).all()


def test_segmentation_on_res3d50_keeps_the_released_encoder_names():
    model = Res3DSegmentation(create_model("res3d50"), num_classes=2)
    assert model(torch.randn(1, 1, 16, 40, 40)).shape == (1, 2, 16, 40, 40)
    assert len(model.encoder.state_dict()) == 159


def test_every_encoder_tensor_loads_from_a_checkpoint_our_trainer_wrote(patch_root, tmp_path):
    run_main_desd(
        ["--data_path", patch_root, "--output_dir", str(tmp_path), *TINY_TRAIN_ARGS, "--epochs", "1", "--max_iters_per_epoch", "1"]
    )
    model = Res3DSegmentation(create_model("res3d10"), num_classes=2)
    shared, total = load_pretrained_encoder(model.encoder, str(tmp_path / "checkpoint.pth"))
    assert shared == total == len(model.encoder.state_dict())
    teacher = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["teacher"]
    assert torch.equal(model.encoder.layer4[0].conv2.weight, teacher["module.backbone.layer4.0.conv2.weight"])

    # the exported backbone alone loads into the same encoder, and is much smaller
    from tools import export_teacher

    assert export_teacher.main([str(tmp_path / "checkpoint.pth"), str(tmp_path / "teacher.pth")]) == 0
    again = Res3DSegmentation(create_model("res3d10"), num_classes=2)
    assert load_pretrained_encoder(again.encoder, str(tmp_path / "teacher.pth")) == (total, total)
    assert all(torch.equal(a, b) for a, b in zip(again.encoder.state_dict().values(), model.encoder.state_dict().values()))
    assert (tmp_path / "teacher.pth").stat().st_size < (tmp_path / "checkpoint.pth").stat().st_size / 3


def released_format(path, state, **extra):
    ckpt = {
        "teacher": {f"module.backbone.{k}": v for k, v in state.items()},
        "args": argparse.Namespace(arch="res3d50", lr=0.3),
        "epoch": 300,
    }
    ckpt.update(extra)
    torch.save(ckpt, path)


def test_a_file_in_the_released_format_with_namespace_args_loads(tmp_path):
    torch.manual_seed(0)
    source = create_model("res3d50")
    released_format(tmp_path / "desd.pth", source.state_dict())
    with pytest.raises(Exception):  # noqa: B017 - plain safe mode refuses the Namespace
        torch.load(tmp_path / "desd.pth", weights_only=True)
    encoder = create_model("res3d50")
    assert load_pretrained_encoder(encoder, str(tmp_path / "desd.pth")) == (159, 159)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), source.state_dict().values()))


def test_refusals_name_the_problem(tmp_path):
    released_format(tmp_path / "other.pth", {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shares no tensor"):
        load_pretrained_encoder(create_model("res3d50"), str(tmp_path / "other.pth"))
    released_format(tmp_path / "r50.pth", create_model("res3d50").state_dict())
    with pytest.raises(ValueError, match="res3d50 teacher, but the encoder is res3d18"):
        load_pretrained_encoder(create_model("res3d18"), str(tmp_path / "r50.pth"))
    with pytest.raises(ValueError, match="does not fit"):  # even a partial load refuses tensors of other shapes
        load_pretrained_encoder(create_model("res3d18"), str(tmp_path / "r50.pth"), partial=True)
    torch.save({"student": {}}, tmp_path / "no_teacher.pth")
    with pytest.raises(KeyError, match="no 'teacher'"):
        load_pretrained_encoder(create_model("res3d10"), str(tmp_path / "no_teacher.pth"))


def test_a_teacher_of_another_arch_is_refused_naming_both_unless_a_partial_load_is_asked_for(tmp_path, capsys):
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in create_model("res3d10").state_dict().items()}, "args": {"arch": "res3d10"}}
    torch.save(ckpt, tmp_path / "r10.pth")
    encoder = create_model("res3d18")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(ValueError, match="res3d10 teacher, but the encoder is res3d18"):
        load_pretrained_encoder(encoder, str(tmp_path / "r10.pth"))
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # nothing loaded
    assert load_pretrained_encoder(encoder, str(tmp_path / "r10.pth"), partial=True) == (39, 63)
    assert "39 of the encoder's 63 tensors loaded" in capsys.readouterr().out
    del ckpt["args"]  # no arch stored: the missing tensors still refuse a silent partial load
    torch.save(ckpt, tmp_path / "r10_no_args.pth")
    with pytest.raises(ValueError, match="lacks 24 of the encoder's 63 tensors"):
        load_pretrained_encoder(create_model("res3d18"), str(tmp_path / "r10_no_args.pth"))


def test_a_basicblock_checkpoint_without_the_layer1_shortcut_is_refused_saying_why(tmp_path):
    state = create_model("res3d18").state_dict()
    old = {f"module.backbone.{k}": v for k, v in state.items() if not k.startswith("layer1.0.downsample.")}
    torch.save({"teacher": old, "args": {"arch": "res3d18"}}, tmp_path / "old.pth")
    with pytest.raises(ValueError, match="BasicBlock net .*has no projection shortcut"):
        load_pretrained_encoder(create_model("res3d18"), str(tmp_path / "old.pth"))


def test_dice_of_hand_made_masks():
    truth = torch.zeros(1, 1, 4, 8, 8)
    truth[:, :, :, :4, :] = 1  # class 1: half the volume
    truth[:, :, :, 4:6, :] = 2  # class 2
    pred = truth.clone()
    pred[:, :, :, :2, :] = 0  # class 1 predicted on half its voxels
    logits = torch.nn.functional.one_hot(pred[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    args = argparse.Namespace(patch_size=(4, 8, 8), sw_batch_size=1, sw_overlap=0.0, use_bf16=False, spacing=1.0, nsd_tolerance=0.5)
    batch = {"image": torch.zeros(1, 1, 4, 8, 8), "label": truth, "id": ["case7"], "image_path": ["imagesTr/case7.nii.gz"]}
    metrics = finetune.evaluate(Fixed(), [batch], 3, args, torch.device("cpu"))
    (case,) = metrics["per_case"]  # nnU-Net's summary.json keeps each case's metrics too
    assert case["case"] == "case7" and case["image"] == "imagesTr/case7.nii.gz" and case["dice"] == pytest.approx(metrics["dice"])
    assert metrics["dice"][0] == pytest.approx(2 * 64 / (128 + 64))
    assert metrics["dice"][1] == pytest.approx(1.0)
    assert metrics["hd95"][1] == pytest.approx(0.0) and metrics["nsd"][1] == pytest.approx(1.0)  # a perfect class
    assert metrics["hd95"][0] > 0 and metrics["nsd"][0] < 1


def test_tiny_fine_tuning_improves_dice_over_its_first_evaluation(tmp_path):
    write_cube_task(str(tmp_path / "task"))
    parser = argparse.ArgumentParser(parents=[finetune.get_args_parser()])
    args = parser.parse_args(
        ["--data_dir", str(tmp_path / "task"), "--output_dir", str(tmp_path / "out"), "--arch", "res3d10", "--spacing", "2",
         "--patch_size", "16", "64", "64", "--epochs", "6", "--num_workers", "0", "--device", "cpu", "--lr", "1e-3"]
    )  # fmt: skip
    result = finetune.main(args)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert len(log) == 6
    assert max(r["mean_dice"] for r in log[1:]) > log[0]["mean_dice"] + 0.05
    assert json.loads((tmp_path / "out" / "dice.json").read_text())["classes"] == ["box"]
    assert result["best_mean_dice"] >= max(r["mean_dice"] for r in log)


def tiny_args(tmp_path, *extra):
    parser = argparse.ArgumentParser(parents=[finetune.get_args_parser()])
    return parser.parse_args(
        ["--data_dir", str(tmp_path / "task"), "--output_dir", str(tmp_path / "out"), "--arch", "res3d10", "--spacing", "2",
         "--patch_size", "16", "48", "48", "--epochs", "1", "--num_workers", "0", "--device", "cpu", *extra]
    )  # fmt: skip


def test_a_rerun_of_a_finished_run_prints_its_result_and_touches_nothing_and_other_settings_are_refused(tmp_path, capsys):
    write_cube_task(str(tmp_path / "task"), n=3)
    first = finetune.main(tiny_args(tmp_path))
    text = (tmp_path / "out" / "dice.json").read_text()
    result = json.loads(text)  # strict JSON: json.loads would accept NaN, so check the text too
    assert "NaN" not in text and result["finished"] and set(result) >= {"dice", "hd95", "nsd", "classes"}
    assert [c["case"] for c in result["per_case"]] and len(result["per_case"][0]["dice"]) == len(result["classes"])
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != "console.log"}
    capsys.readouterr()
    assert finetune.main(tiny_args(tmp_path)) == first
    assert "holds a finished run with these settings" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != "console.log"} == stamps
    assert "holds a finished run" in (tmp_path / "out" / "console.log").read_text()  # the rerun's console is logged, nothing else
    with pytest.raises(ValueError, match=r"other settings: lr 0.0003 \(this run: 0.001\)"):
        finetune.main(tiny_args(tmp_path, "--lr", "1e-3"))
    finetune.main(tiny_args(tmp_path, "--lr", "1e-3", "--restart", "True"))
    assert json.loads((tmp_path / "out" / "args.json").read_text())["lr"] == 1e-3


@pytest.mark.parametrize("extra,message", [(("--eval_every", "0"), "--eval_every"), (("--lr", "nan"), "--lr")])
def test_nonsense_settings_are_refused_at_start(tmp_path, extra, message):
    write_cube_task(str(tmp_path / "task"), n=3)
    with pytest.raises(ValueError, match=message):
        finetune.main(tiny_args(tmp_path, *extra))
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_nan_images_stop_fine_tuning_before_any_checkpoint(tmp_path, capsys):
    write_cube_task(str(tmp_path / "task"), n=3)
    for i in range(3):
        path = tmp_path / "task" / "imagesTr" / f"c{i}.nii.gz"
        img = nib.load(path)
        arr = np.asarray(img.dataobj).astype(np.float32)
        arr[10:20, 10:20, 5:10] = np.nan
        nib.save(nib.Nifti1Image(arr, img.affine), path)
    with pytest.raises(SystemExit):
        finetune.main(tiny_args(tmp_path))
    assert "Loss is not finite" in capsys.readouterr().out
    assert not (tmp_path / "out" / "checkpoint.pth").exists() and not (tmp_path / "out" / "best.pth").exists()


def test_a_broken_dataset_lists_its_problems_and_the_command_exits_non_zero(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    write_cube_task(str(tmp_path / "task"), n=3)
    lab = nib.load(tmp_path / "task" / "labelsTr" / "c1.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, :12], lab.affine), tmp_path / "task" / "labelsTr" / "c1.nii.gz")
    cmd = [sys.executable, "finetune.py", "--data_dir", str(tmp_path / "task"), "--output_dir", str(tmp_path / "out"),
           "--arch", "res3d10", "--device", "cpu", "--epochs", "1", "--patch_size", "16", "48", "48", "--num_workers", "0"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "c1.nii.gz: shape" in proc.stderr


def test_compare_dice_names_a_missing_or_empty_result(tmp_path, capsys):
    from tools import compare_dice

    (tmp_path / "a.json").write_text(json.dumps({"classes": ["box"], "dice": [0.5], "finished": True}))
    (tmp_path / "empty.json").write_text(json.dumps({"classes": [], "dice": []}))
    assert compare_dice.main([f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'missing.json'}", f"c={tmp_path / 'empty.json'}"]) == 1
    err = capsys.readouterr().err
    assert "missing.json" in err and "does not exist" in err and "empty.json" in err and "no result" in err


@pytest.mark.slow
def test_two_process_fine_tuning_through_torchrun(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    write_cube_task(str(tmp_path / "task"), n=6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "finetune.py",
           "--data_dir", str(tmp_path / "task"), "--output_dir", str(tmp_path / "out"), "--arch", "res3d10", "--spacing", "2",
           "--patch_size", "16", "64", "64", "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--batch_size", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "process 1 of 2" in proc.stdout
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and "mean_dice" in log[-1]


def test_an_nnunet_v2_dataset_of_mha_files_with_an_ignore_label_and_a_fold_fine_tunes_from_its_cache_and_predicts(tmp_path):
    import SimpleITK as sitk

    import predict
    from tests.helpers import write_nnunet

    root = write_nnunet(str(tmp_path / "Dataset001_Tiny"), n=4, ending=".mha", ignore=True)
    label = tmp_path / "Dataset001_Tiny" / "labelsTr" / "liver_000.mha"
    lab = sitk.ReadImage(str(label))
    arr = sitk.GetArrayFromImage(lab)
    arr[:2] = 3  # the ignore label on two slices
    marked = sitk.GetImageFromArray(arr)
    marked.CopyInformation(lab)
    sitk.WriteImage(marked, str(label))
    os.makedirs(f"{root}/imagesTs")
    test_image = f"{root}/imagesTs/liver_009_0000.mha"
    sitk.WriteImage(sitk.ReadImage(f"{root}/imagesTr/liver_003_0000.mha"), test_image)
    folds = [{"train": ["liver_000", "liver_001", "liver_002"], "val": ["liver_003"]}, {"train": ["liver_003"], "val": ["liver_000"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    parser = argparse.ArgumentParser(parents=[finetune.get_args_parser()])
    args = parser.parse_args(
        ["--data_dir", root, "--output_dir", str(tmp_path / "out"), "--arch", "res3d10", "--spacing", "2", "--patch_size", "16", "48", "48",
         "--epochs", "1", "--num_workers", "0", "--device", "cpu", "--split_file", str(tmp_path / "splits_final.json"), "--fold", "0"]
    )  # fmt: skip
    result = finetune.main(args)
    assert result["classes"] == ["liver", "tumour"] and len(result["dice"]) == 2
    from downstream import cache as cache_module

    cache = cache_module.default_dir(root, 2.0)
    assert cache.startswith(os.environ["DESD_CACHE"]) and not os.path.exists(f"{root}_preprocessed")  # never beside the dataset
    assert sorted(f for f in os.listdir(cache) if f.endswith(".json")) == [f"liver_00{i}.json" for i in range(4)]
    assert predict.main(["--model", str(tmp_path / "out"), "--input", root, "--output", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    out, ref = sitk.ReadImage(str(tmp_path / "pred" / "liver_009.mha")), sitk.ReadImage(test_image)
    assert out.GetSize() == ref.GetSize() and np.allclose(out.GetSpacing(), ref.GetSpacing())
    assert np.allclose(out.GetOrigin(), ref.GetOrigin()) and np.allclose(out.GetDirection(), ref.GetDirection())


def test_a_second_run_in_a_live_runs_folder_is_refused_and_the_cache_names_an_unwritable_folder(tmp_path, capsys):
    import subprocess
    import sys

    from downstream import cache, labelled

    write_cube_task(str(tmp_path / "task"), n=3)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname(), "started": "now"}))
        parser = argparse.ArgumentParser(parents=[finetune.get_args_parser()])
        args = parser.parse_args(["--data_dir", str(tmp_path / "task"), "--output_dir", str(out), "--device", "cpu", "--lr", "5"])
        with pytest.raises(RuntimeError, match=r"is in use by another run \(PID"):
            finetune.main(args)
        assert "WARNING: --lr 5 is far above" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match=r"cannot write the preprocessed cache .*--preprocessed_dir"):
        cache.build(labelled.read_dataset(str(tmp_path / "task")).cases, 2.0, str(tmp_path / "file" / "cache"))


def test_tensorboard_gets_each_epochs_scalars_when_asked(tmp_path, monkeypatch):
    import utils

    written = []

    class Writer:  # stands in for SummaryWriter (the tensorboard package is an optional extra)
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def flush(self):
            pass

    monkeypatch.setattr(utils, "tensorboard_writer", Writer)
    write_cube_task(str(tmp_path / "task"), n=3)
    finetune.main(tiny_args(tmp_path, "--epochs", "2", "--tensorboard", "True"))
    assert {("train_loss", 0), ("train_loss", 1), ("mean_dice", 1), ("lr", 0)} <= set(written)


def test_left_right_mirroring_can_be_left_out_of_the_patch_augmentation():
    image = torch.arange(32, dtype=torch.float32).expand(1, 8, 16, 32).clone()  # rises to the patient's left (cols)

    def cols_reversed(flip_axes) -> list[bool]:
        augment = finetune.patch_augmentation(flip_axes)
        augment.set_random_state(0)
        out = [augment({"image": image.clone(), "label": (image > 15).long()})["image"] for _ in range(24)]
        return [bool(x[0, 0, 0, 0] > x[0, 0, 0, -1]) for x in out]

    assert not any(cols_reversed((0, 1)))
    assert 0 < sum(cols_reversed((0, 1, 2))) < 24
    parser = argparse.ArgumentParser(parents=[finetune.get_args_parser()])
    assert parser.parse_args(["--data_dir", "d", "--flip_axes", "0", "1"]).flip_axes == [0, 1]
