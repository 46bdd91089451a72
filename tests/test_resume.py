"""Resuming pretraining: which checkpoint, with which settings, in whose folder, and what is
never written or rotated."""

import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

import main_desd
import utils
from models import create_model
from tests.helpers import TINY_TRAIN_ARGS, run_main_desd, write_patches


def tiny_run(root, out, *extra):
    run_main_desd(["--data_path", root, "--output_dir", str(out), *TINY_TRAIN_ARGS, "--max_iters_per_epoch", "1", *extra])


def save(path, epoch, iteration):
    torch.save({"epoch": epoch, "iteration": iteration, "tag": torch.tensor([epoch, iteration])}, path)


def test_resume_picks_the_furthest_checkpoint_whatever_the_file_times(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save(run / "checkpoint0000.pth", 1, 0)
    save(run / "checkpoint.prev.pth", 3, 40)
    save(run / "checkpoint.pth", 3, 80)
    old = time.time() - 3600
    os.utime(run / "checkpoint.pth", (old, old))  # the furthest is now the oldest file
    path, ckpt = utils.load_latest_checkpoint(str(run))
    assert os.path.basename(path) == "checkpoint.pth" and ckpt["tag"].tolist() == [3, 80]
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("checkpoint.pth", "checkpoint.prev.pth", "checkpoint0000.pth"):  # copied without times, oldest last
        shutil.copyfile(run / name, copy / name)
        time.sleep(0.01)
    assert utils.load_latest_checkpoint(str(copy))[1]["tag"].tolist() == [3, 80]
    save(copy / "checkpoint0003.pth", 3, 80)  # an equal position prefers the main file
    assert os.path.basename(utils.load_latest_checkpoint(str(copy))[0]) == "checkpoint.pth"


def test_a_checkpoint_that_failed_to_load_never_replaces_the_backup(tmp_path, capsys):
    save(tmp_path / "checkpoint.prev.pth", 2, 0)
    save(tmp_path / "checkpoint.pth", 3, 0)
    with open(tmp_path / "checkpoint.pth", "r+b") as f:
        f.truncate(100)
    path, ckpt = utils.load_latest_checkpoint(str(tmp_path))
    assert os.path.basename(path) == "checkpoint.prev.pth" and "checkpoint.pth' is unreadable" in capsys.readouterr().out
    good = (tmp_path / "checkpoint.prev.pth").read_bytes()
    utils.save_atomic({"epoch": 3}, str(tmp_path / "checkpoint.pth"), keep_previous=True)
    assert (tmp_path / "checkpoint.prev.pth").read_bytes() == good  # the corrupt file was replaced, not rotated
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True) == {"epoch": 3}
    utils.UNREADABLE.clear()
    utils.save_atomic({"epoch": 4}, str(tmp_path / "checkpoint.pth"), keep_previous=True)  # a readable one rotates as before
    assert torch.load(tmp_path / "checkpoint.prev.pth", weights_only=True) == {"epoch": 3}


def test_a_resumed_run_with_other_settings_is_refused_naming_each(patch_root, tmp_path):
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--epochs", "1")
    args = dict(zip(TINY_TRAIN_ARGS[::2], TINY_TRAIN_ARGS[1::2]))
    changed = {**args, "--arch": "res3d18", "--out_dim": "128"}
    argv = [x for kv in changed.items() for x in kv]
    with pytest.raises(ValueError, match=r"arch res3d10 \(this run: res3d18\); out_dim 64 \(this run: 128\)"):
        run_main_desd(["--data_path", patch_root, "--output_dir", str(out), *argv, "--epochs", "2", "--stage_weights", "0", "0", "0", "1"])
    with pytest.raises(ValueError, match=r"stage_weights \[0.25, 0.25, 0.25, 0.25\] \(this run: \[0.0, 0.0, 0.0, 1.0\]\)"):
        tiny_run(patch_root, out, "--epochs", "2", "--stage_weights", "0", "0", "0", "1")
    assert not (tmp_path / "out" / "run.lock").exists()  # released on the way out


def test_a_resume_with_another_batch_size_or_list_file_says_so(capsys):
    args = main_desd.get_args_parser().parse_args(["--arch", "res3d10", "--data_path", "x", "--batch_size_per_gpu", "4"])
    stored = {**vars(args), "batch_size_per_gpu": 8, "list_path": "other.txt"}
    state = {f"module.backbone.{k}": v for k, v in create_model("res3d10").state_dict().items()}
    main_desd.check_resumable({"args": stored, "teacher": state}, "old.pth", args)
    out = capsys.readouterr().out
    assert "WARNING: resuming 'old.pth' with other settings: batch_size_per_gpu 8 (this run: 4); list_path other.txt" in out


def test_a_basicblock_checkpoint_of_the_earlier_layout_is_refused_on_resume(tmp_path):
    args = main_desd.get_args_parser().parse_args(["--arch", "res3d10", "--data_path", "x"])
    state = {f"module.backbone.{k}": v for k, v in create_model("res3d10").state_dict().items() if "layer1.0.downsample" not in k}
    ckpt = {"teacher": state, "args": dict(vars(args))}
    with pytest.raises(ValueError, match="no projection shortcut"):
        main_desd.check_resumable(ckpt, "old.pth", args)


def test_an_output_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(patch_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(f'{{"pid": {holder.pid}, "host": "{os.uname().nodename}", "started": "now"}}')
        with pytest.raises(RuntimeError, match=f"in use by another run \\(PID {holder.pid} on {os.uname().nodename}"):
            tiny_run(patch_root, out, "--epochs", "1")
        assert not (out / "checkpoint.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    tiny_run(patch_root, out, "--epochs", "1")  # its holder is gone: taken over
    assert (out / "checkpoint.pth").exists() and not (out / "run.lock").exists()
    (out / "run.lock").write_text('{"pid": 1, "host": "another-node", "started": "now"}')
    with pytest.raises(RuntimeError, match="PID 1 on another-node"):
        tiny_run(patch_root, out, "--epochs", "2")


def test_temporaries_of_a_live_writer_survive_a_start_and_a_dead_ones_go(patch_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / f".checkpoint.partial{holder.pid}.pth").write_bytes(b"being written")
        (out / ".checkpoint.partial999999999.pth").write_bytes(b"left by a killed run")
        tiny_run(patch_root, out, "--epochs", "1")
        assert (out / f".checkpoint.partial{holder.pid}.pth").exists() and not (out / ".checkpoint.partial999999999.pth").exists()
    finally:
        holder.kill()


def test_non_finite_weights_are_never_saved(patch_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    tiny_run(patch_root, out, "--epochs", "1")
    before = (out / "checkpoint.pth").read_bytes()
    original = utils.update_teacher

    def poisoned(student, teacher, momentum):
        original(student, teacher, momentum)
        next(teacher.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(utils, "update_teacher", poisoned)
    with pytest.raises(SystemExit):
        tiny_run(patch_root, out, "--epochs", "2")
    assert "Non-finite weights" in capsys.readouterr().out
    assert (out / "checkpoint.pth").read_bytes() == before


def write_float_patches(root, nan_patch: int) -> str:
    write_patches(root, n=6)
    names = sorted(os.listdir(os.path.join(root, "DL_patches_v2")))
    path = os.path.join(root, "DL_patches_v2", names[nan_patch])
    arr = np.asarray(nib.load(path).dataobj).astype(np.float32)
    arr[:, :, 10] = np.nan  # a slice that every 16-slice view of a 20-slice patch holds
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    return path


def test_a_patch_with_nan_is_named_and_skipped_when_asked(tmp_path):
    root = str(tmp_path / "data")
    bad = write_float_patches(root, nan_patch=3)
    with pytest.raises(RuntimeError, match=f"{os.path.basename(bad)}.*non-finite"):
        tiny_run(root, tmp_path / "a", "--epochs", "1", "--max_iters_per_epoch", "3")
    run_main_desd(
        ["--data_path", root, "--output_dir", str(tmp_path / "b"), *TINY_TRAIN_ARGS, "--epochs", "1", "--skip_bad_patches", "True"]
    )
    import json

    log = [json.loads(line) for line in (tmp_path / "b" / "log.txt").read_text().splitlines()]
    assert log[0]["train_replaced_patches"] == 1 and np.isfinite(log[0]["train_loss"])
