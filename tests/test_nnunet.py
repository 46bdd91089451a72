"""DeSD inside nnU-Net v2: the network class its plans name, the plans tool, the teacher as
-pretrained_weights, and the five README commands end to end (where nnunetv2 is installed)."""

import importlib.util
import json
import os
import pydoc
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from downstream import nnunet
from models import create_model
from models.nnunet import DeSDUNet, ds_strides
from tests.helpers import ROOT
from tests.test_own_ct import NIH, stored_as

ORIENTATIONS = ("PLI", "RAS", "LPS", "SRA", "IPL")


def nnunet_array(path: str, reader: str, transpose_forward) -> np.ndarray:
    """The array nnU-Net's reader gives for the file (c, ...), then its transpose_forward."""
    if reader == "NibabelIOWithReorient":
        arr = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj).transpose(2, 1, 0)
    elif reader == "NibabelIO":
        arr = np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)
    elif reader == "SimpleITKIOWithReorient":
        arr = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(path), "RAS"))
    else:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(path))
    return arr[None].transpose([0, *[t + 1 for t in transpose_forward]])


@pytest.mark.parametrize("reader", ["SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "SimpleITKIOWithReorient"])
@pytest.mark.parametrize("transpose_forward", [[0, 1, 2], [2, 0, 1]])
def test_the_network_sees_every_stored_orientation_as_the_pretraining_layout(tmp_path, reader, transpose_forward):
    rng = np.random.default_rng(0)
    pli = rng.normal(size=(12, 10, 8)).astype(np.float32)  # nibabel (x, y, z): x -> P, y -> L, z -> I
    want = torch.from_numpy(pli.transpose(2, 0, 1).copy())  # the pretraining layout: depth (I), then P, then L
    for codes in ORIENTATIONS:
        arr, affine = stored_as(pli, NIH, codes)
        path = str(tmp_path / f"{codes}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), path)
        axes, flips = nnunet.network_axes(nnunet.nnunet_codes(nnunet.dataset_orientation([path]), reader, transpose_forward))
        net = DeSDUNet(1, 2, arch="res3d10", input_axes=axes, input_flips=flips)
        x = torch.from_numpy(nnunet_array(path, reader, transpose_forward).copy())[None]
        seen = net.to_network(x)[0, 0]
        assert torch.equal(seen, want), (codes, axes, flips)
        assert torch.equal(net.from_network(net.to_network(x)), x)


def test_deep_supervision_outputs_have_the_shapes_nnunet_downsamples_the_target_to():
    axes = [1, 2, 0]  # nnU-Net's axis 1 is depth
    strides = ds_strides(axes)
    net = DeSDUNet(1, 3, arch="res3d10", deep_supervision=True, input_axes=axes, input_flips=[True, False, True], strides=strides)
    patch = [64, 32, 64]  # nnU-Net order: 32 in depth, 64 x 64 in-plane
    outputs = net(torch.randn(1, 1, *patch) * 500)
    scales = 1 / np.cumprod(np.vstack(strides), axis=0)[:-1]  # nnU-Net's _get_deep_supervision_scales
    assert [tuple(y.shape[2:]) for y in outputs] == [tuple(round(n * s) for n, s in zip(patch, row)) for row in scales]
    assert all(y.shape[:2] == (1, 3) for y in outputs)
    net.decoder.deep_supervision = False  # as nnU-Net's trainer switches it for inference
    single = net(torch.ones(1, 1, 20, 30, 40))  # one tensor, any size
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, 20, 30, 40)


def test_the_network_clips_and_scales_hu_itself():
    net = DeSDUNet(1, 2, arch="res3d10").eval()
    x = torch.randn(1, 1, 32, 64, 64) * 3000
    with torch.no_grad():
        assert torch.allclose(net(x), net(x.clamp(-1024, 1024)))


def test_the_network_refuses_strides_that_are_not_its_scales_and_more_channels():
    with pytest.raises(ValueError, match="strides"):
        DeSDUNet(1, 2, arch="res3d10", strides=[[1, 1, 1], [2, 2, 2]])
    with pytest.raises(ValueError, match="one CT channel"):
        DeSDUNet(2, 2, arch="res3d10")


def source_plans(shape=(40, 200, 180), spacing=(2.5, 0.8, 0.8)) -> dict:
    """The parts of nnU-Net's plans that the plans tool reads."""
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "batch_size": 2,
        "patch_size": [40, 160, 160],
        "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet", "arch_kwargs": {}},
    }
    return {
        "dataset_name": "Dataset009_X",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(shape),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"2d": dict(config), "3d_fullres": config, "3d_cascade_fullres": {"inherits_from": "3d_fullres"}},
    }


def test_desd_plans_name_the_network_at_the_pretraining_spacing_without_normalisation():
    plans = nnunet.desd_plans(source_plans(), ("P", "L", "I"), "res3d18")
    assert list(plans["configurations"]) == ["3d_fullres"] and plans["plans_name"] == "nnUNetPlans_DeSD"
    config = plans["configurations"]["3d_fullres"]
    assert config["spacing"] == [1.0, 1.0, 1.0] and config["normalization_schemes"] == ["NoNormalization"]
    assert config["data_identifier"] == "nnUNetPlans_DeSD_3d_fullres"
    # stored PLI, read by SimpleITK as (I, L, P): network depth is nnU-Net's axis 0, rows 2, cols 1
    kwargs = config["architecture"]["arch_kwargs"]
    assert kwargs["input_axes"] == [0, 2, 1] and kwargs["input_flips"] == [False, False, False]
    # the median image is 100 x 160 x 144 mm: depth 64 fits, in-plane 128 fits, nnU-Net order (I, L, P)
    assert config["patch_size"] == [64, 128, 128]
    net = pydoc.locate(config["architecture"]["network_class_name"])(input_channels=1, num_classes=4, deep_supervision=True, **kwargs)
    assert isinstance(net, DeSDUNet) and net.encoder.layer1[0].conv1.in_channels == 64


def test_desd_plans_cut_the_patch_to_a_small_image_in_multiples_of_the_stride():
    plans = nnunet.desd_plans(source_plans(shape=(14, 30, 50), spacing=(1.0, 1.0, 1.0)), ("R", "A", "S"), "res3d10")
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 64]
    with pytest.raises(ValueError, match="multiple of the encoder's stride"):
        nnunet.desd_plans(source_plans(), ("R", "A", "S"), "res3d10", patch=(40, 128, 128))
    with pytest.raises(KeyError, match="no configuration '3d_lowres'"):
        nnunet.desd_plans(source_plans(), ("R", "A", "S"), "res3d10", configuration="3d_lowres")


def test_a_set_stored_in_two_orientations_is_refused_naming_the_odd_files(tmp_path):
    arr = np.zeros((8, 8, 8), np.int16)
    paths = []
    for i, codes in enumerate(("RAS", "RAS", "LPS")):
        a, affine = stored_as(arr, NIH, codes)
        paths.append(str(tmp_path / f"case{i}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(a, affine), paths[-1])
    with pytest.raises(ValueError, match=r"case2_0000.nii.gz \(LPS\).*--reader SimpleITKIOWithReorient"):
        nnunet.dataset_orientation(paths)
    plans = nnunet.desd_plans(source_plans(), ("P", "L", "I"), "res3d10", reader="SimpleITKIOWithReorient")  # RAS whatever is stored
    assert plans["image_reader_writer"] == "SimpleITKIOWithReorient"
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["input_flips"] == [True, True, True]


def write_teacher(path, arch="res3d10"):
    enc = create_model(arch)
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in enc.state_dict().items()}, "args": {"arch": arch}}, path)
    return enc.state_dict()


def test_the_weights_file_covers_the_network_but_its_output_layers(tmp_path):
    teacher = write_teacher(tmp_path / "teacher.pth")
    out = tmp_path / "weights.pth"
    nnunet.convert_teacher(str(tmp_path / "teacher.pth"), "res3d10", str(out))
    weights = torch.load(out, weights_only=True)["network_weights"]
    net = DeSDUNet(1, 5, arch="res3d10", deep_supervision=True, input_axes=[2, 0, 1])
    needed = [k for k in net.state_dict() if ".seg_layers." not in k]  # what nnU-Net's load_pretrained_weights asserts
    assert sorted(needed) == sorted(weights)
    assert all(weights[k].shape == v.shape for k, v in net.state_dict().items() if k in weights)
    assert all(torch.equal(weights[f"encoder.{k}"], v) for k, v in teacher.items())


def test_a_teacher_of_another_depth_is_refused_by_name_and_nothing_is_written(tmp_path):
    write_teacher(tmp_path / "teacher.pth", "res3d10")
    with pytest.raises(ValueError, match="res3d10 teacher, but the encoder is res3d18"):
        nnunet.convert_teacher(str(tmp_path / "teacher.pth"), "res3d18", str(tmp_path / "w.pth"))
    assert not os.path.exists(tmp_path / "w.pth")
    assert nnunet.weights_main([str(tmp_path / "teacher.pth"), str(tmp_path / "w.pth"), "--arch", "res3d18"]) == 1


# ============ the README's five commands, with nnU-Net installed ============


def write_raw(root, n_train=5, shape=(30, 30, 14)):
    """A tiny nnU-Net v2 dataset of boxes brighter than their noise, stored RAS (1 mm): the
    refusal tests' raw set."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n_train + 1):
        img = rng.normal(-100, 20, shape).astype(np.int16)
        lab = np.zeros(shape, np.uint8)
        x, y = rng.integers(8, 22, 2)
        lab[x - 5 : x + 5, y - 5 : y + 5, 3:11] = 1
        img[lab == 1] += 300
        folder = "imagesTs" if i == n_train else "imagesTr"
        nib.save(nib.Nifti1Image(img, np.eye(4)), os.path.join(root, folder, f"box_{i:03d}_0000.nii.gz"))
        if i < n_train:
            nib.save(nib.Nifti1Image(lab, np.eye(4)), os.path.join(root, "labelsTr", f"box_{i:03d}.nii.gz"))
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "box": 1}, "numTraining": n_train, "file_ending": ".nii.gz"}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)


def shim_installed() -> bool:
    spec = importlib.util.find_spec("nnunetv2")
    return spec is not None and os.path.isfile(
        os.path.join(spec.submodule_search_locations[0], "training", "nnUNetTrainer", "nnUNetTrainer_DeSD.py")
    )


NEEDS_SHIM = pytest.mark.skipif(
    not shim_installed(), reason="nnunetv2 and its nnUNetTrainer_DeSD module are not installed (make test installs both)"
)
BIN = os.path.dirname(sys.executable)
# nnUNetTrainer_DeSD cut to one epoch of 2 iterations, validated without mirroring; no augmentation workers
SHORT = {"DESD_NNUNET_EPOCHS": "1", "DESD_NNUNET_ITERATIONS": "2", "DESD_NNUNET_VAL_ITERATIONS": "1", "DESD_NNUNET_VAL_MIRRORING": "0"}
SHORT["nnUNet_n_proc_DA"] = "0"


def nnunet_runner(tmp_path):
    """A function that runs one nnU-Net command with its three folders under tmp_path and
    returns its stdout, failing with its output (with check=False: the finished process)."""
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(tmp_path / "raw"),
        nnUNet_preprocessed=str(tmp_path / "preprocessed"),
        nnUNet_results=str(tmp_path / "results"),
        nnUNet_compile="f",
        nnUNet_def_n_proc="1",  # its default of 8 spawned export workers, each importing torch, cost 2 cores a minute
        PYTHONPATH=ROOT,
        PATH=BIN + os.pathsep + os.environ["PATH"],  # the README's lines name the commands bare
    )

    def run(*cmd, check=True, **extra_env):
        done = subprocess.run(list(cmd), env={**env, **extra_env}, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        if not check:
            return done
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    return run


def same_grid(a: str, b: str) -> bool:
    """Whether two images have the same size, origin, spacing and direction."""
    a, b = sitk.ReadImage(a), sitk.ReadImage(b)
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


# What the README's nnU-Net lines get appended here: the CPU, the short trainer, one worker, a coarse grid.
README_BUDGET = {
    "nnUNetv2_plan_and_preprocess": " -npfp 1",
    "desd-nnunet-plans": " --spacing 3 --patch_size 32 64 64",  # a coarse grid: a CPU check, not a model
    "nnUNetv2_preprocess": " -np 1",
    "nnUNetv2_train": " -tr nnUNetTrainer_DeSD -device cpu",
    "nnUNetv2_predict": " -tr nnUNetTrainer_DeSD -device cpu -npp 1 -nps 1 --disable_tta",
}


def readme_nnunet_lines() -> list[str]:
    """The README's five nnU-Net commands, on the real-CT set (Dataset003_Liver -> 901) with a
    res3d10 teacher, each with its budget appended."""
    from tests.test_readme import readme_shell_lines

    lines = []
    for line in readme_shell_lines():
        program = line.split()[0]
        if program in README_BUDGET:
            line = line.replace("Dataset003_Liver", "Dataset901_RealCT").replace("res3d50", "res3d10")
            lines.append(re.sub(r"(-d|nnUNetv2_train) 3 ", r"\1 901 ", line) + README_BUDGET[program])
    return lines


@pytest.mark.slow
@NEEDS_SHIM
def test_the_readme_nnunet_route_runs_on_real_ct_and_writes_each_prediction_on_its_inputs_grid(tmp_path):
    """The README's five nnU-Net commands on the real-CT set (tools/real_ct_dataset.py), with the
    dataset and a res3d10 teacher swapped in and the budget turned down (README_BUDGET). Its
    images are stored RAS, LPS and PLI: the plans tool refuses them with the plain reader, naming
    the odd files, and takes them with the reorienting one; its three cases take the fold it ships
    in splits_final.json. nnU-Net's validation of the converted DICOM series (512 x 512, 2 mm,
    PLI) and its prediction of the int32 RAS abdomen come back on their inputs' grids."""
    from tests.helpers import realct_files
    from tools import real_ct_dataset

    realct_files()
    raw = tmp_path / "raw" / "Dataset901_RealCT"
    assert real_ct_dataset.main(["--out", str(raw)]) == 0
    (raw / "imagesTs").mkdir()
    shutil.copy(raw / "imagesTr" / "abdomen_0000.nii.gz", raw / "imagesTs" / "abdomen_0000.nii.gz")
    write_teacher(tmp_path / "teacher.pth")
    run = nnunet_runner(tmp_path)
    lines = readme_nnunet_lines()
    assert [line.split()[0] for line in lines] == [*README_BUDGET], lines  # the five, in order

    run("sh", "-c", lines[0])
    refused = run("sh", "-c", lines[1], check=False)
    assert refused.returncode == 1 and "chestcta_0000.nii.gz (LPS), upperabdomen_0000.nii.gz (PLI)" in refused.stderr
    assert "images RAS as SimpleITKIOWithReorient reads them" in run("sh", "-c", lines[1] + " --reader SimpleITKIOWithReorient")
    run("sh", "-c", lines[2])
    shutil.copy(raw / "splits_final.json", tmp_path / "preprocessed" / "Dataset901_RealCT" / "splits_final.json")
    out = run("sh", "-c", lines[3], **SHORT)
    weights = tmp_path / "preprocessed" / "Dataset901_RealCT" / "nnUNetPlans_DeSD_res3d10.pth"
    assert f"Loading pretrained weights from file  {weights}" in out
    assert "This split has 2 training and 1 validation cases" in out
    run_folder = tmp_path / "results" / "Dataset901_RealCT" / "nnUNetTrainer_DeSD__nnUNetPlans_DeSD__3d_fullres"
    fold = run_folder / "fold_0"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert (fold / "checkpoint_final.pth").is_file() and "Epoch 0" in log and "Epoch 1" not in log  # one epoch
    plans_json = json.loads((run_folder / "plans.json").read_text())
    assert plans_json["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == "models.nnunet.DeSDUNet"
    assert same_grid(str(fold / "validation" / "upperabdomen.nii.gz"), str(raw / "imagesTr" / "upperabdomen_0000.nii.gz"))

    run("sh", "-c", lines[4])
    assert same_grid(str(tmp_path / "preds" / "abdomen.nii.gz"), str(raw / "imagesTs" / "abdomen_0000.nii.gz"))
    labels = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "preds" / "abdomen.nii.gz"))))
    assert set(labels) <= set(range(7))  # background and the six organs; never the ignore label


def test_plans_refuse_a_network_name_that_resolves_to_another_models_package(tmp_path, monkeypatch):
    import models

    fake_file = tmp_path / "elsewhere" / "models" / "nnunet.py"
    fake_file.parent.mkdir(parents=True)
    fake_file.write_text("class DeSDUNet:\n    pass\n")
    spec = importlib.util.spec_from_file_location("fake_nnunet", fake_file)
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "fake_nnunet", fake)
    nnunet.check_network_resolves()  # the real class: accepted
    monkeypatch.setattr(models, "nnunet", fake)  # what pydoc.locate walks to
    with pytest.raises(SystemExit, match=re.escape(str(fake_file))):
        nnunet.check_network_resolves()


def test_the_trainer_module_is_written_once_and_never_over_a_foreign_file(tmp_path):
    folder = tmp_path / "nnUNetTrainer"
    folder.mkdir()
    path = nnunet.install_trainer(str(folder))
    assert open(path).read() == nnunet.SHIM and nnunet.install_trainer(str(folder)) == path  # a rerun: the same file
    (folder / "nnUNetTrainer_DeSD.py").write_text("# someone's own trainer\n")
    with pytest.raises(FileExistsError, match="nnUNetTrainer_DeSD.py' exists and is not the module desd-nnunet-trainer writes"):
        nnunet.install_trainer(str(folder))
    assert (folder / "nnUNetTrainer_DeSD.py").read_text() == "# someone's own trainer\n"


def test_the_short_trainer_takes_its_length_from_the_environment(monkeypatch):
    pytest.importorskip("nnunetv2")
    from downstream import nnunet_trainer

    monkeypatch.setattr(nnunet_trainer.nnUNetTrainer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setenv("DESD_NNUNET_EPOCHS", "3")
    monkeypatch.setenv("DESD_NNUNET_ITERATIONS", "7")
    trainer = nnunet_trainer.nnUNetTrainer_DeSD({}, "3d_fullres", 0, {})
    assert trainer.num_epochs == 3 and trainer.num_iterations_per_epoch == 7
    monkeypatch.setenv("DESD_NNUNET_EPOCHS", "0")
    with pytest.raises(ValueError, match=r"\$DESD_NNUNET_EPOCHS='0': expected a whole number"):
        nnunet_trainer.nnUNetTrainer_DeSD({}, "3d_fullres", 0, {})


def test_the_short_trainer_validates_without_mirroring_only_when_asked_and_keeps_the_axes(monkeypatch):
    pytest.importorskip("nnunetv2")
    from downstream import nnunet_trainer

    seen = []
    monkeypatch.setattr(nnunet_trainer.nnUNetTrainer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(
        nnunet_trainer.nnUNetTrainer, "perform_actual_validation", lambda self, *a: seen.append(self.inference_allowed_mirroring_axes)
    )
    trainer = nnunet_trainer.nnUNetTrainer_DeSD({}, "3d_fullres", 0, {})
    trainer.inference_allowed_mirroring_axes = (0, 1, 2)
    trainer.perform_actual_validation()
    monkeypatch.setenv("DESD_NNUNET_VAL_MIRRORING", "0")
    trainer.perform_actual_validation()
    assert seen == [(0, 1, 2), None] and trainer.inference_allowed_mirroring_axes == (0, 1, 2)
    monkeypatch.setenv("DESD_NNUNET_VAL_MIRRORING", "no")
    with pytest.raises(ValueError, match=r"\$DESD_NNUNET_VAL_MIRRORING='no': expected 0 or 1"):
        trainer.perform_actual_validation()
