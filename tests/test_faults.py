"""Faults injected for real: processes killed with SIGKILL mid-run and mid-save, a torchrun
worker killed, truncated checkpoints, a corrupt patch, a killed preprocessing run."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import utils
from tests.helpers import ROOT, TINY_TRAIN_ARGS, free_port, run_main_desd, write_patches


def desd_command(root, out, *extra):
    return [sys.executable, "main_desd.py", "--data_path", root, "--output_dir", str(out), *TINY_TRAIN_ARGS, *extra]


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def kill_after_a_checkpoint(cmd, out, delay, log):
    """Start cmd, wait for a checkpoint written by this process, sleep `delay`, SIGKILL it."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ckpt = out / "checkpoint.pth"
    wait_for(lambda: proc.poll() is not None or (ckpt.exists() and ckpt.stat().st_mtime > started))
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


def assert_same_state(a, b):
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    assert torch.equal(a["desd_loss"]["center"], b["desd_loss"]["center"])
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(value, b["optimizer"]["state"][pid][name]), f"optimizer {pid}.{name} differs"
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])


@pytest.mark.slow
def test_runs_killed_at_random_iterations_end_with_the_same_weights_bit_for_bit(tmp_path):
    root = write_patches(str(tmp_path / "data"), n=8)
    extra = ("--epochs", "2", "--save_every_iters", "1", "--num_workers", "2")
    subprocess.run(desd_command(root, tmp_path / "whole", *extra), cwd=ROOT, check=True, capture_output=True)
    rng = random.Random(0)
    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "wb") as log:
        for _ in range(2):
            assert kill_after_a_checkpoint(desd_command(root, out, *extra), out, rng.uniform(0.0, 1.5), log) == -signal.SIGKILL
        subprocess.run(desd_command(root, out, *extra), cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    assert "Resuming at epoch" in (tmp_path / "killed.log").read_text()
    whole = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(out / "checkpoint.pth", weights_only=True)
    assert_same_state(whole, resumed)


@pytest.mark.slow
def test_a_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    root = write_patches(str(tmp_path / "data"), n=8)
    out = tmp_path / "out"
    extra = ("--epochs", "2", "--save_every_iters", "1", "--out_dim", "8192", "--saveckp_freq", "1")
    rng = random.Random(1)
    with open(tmp_path / "run.log", "wb") as log:
        for _ in range(3):
            kill_after_a_checkpoint(desd_command(root, str(out), *extra), out, rng.uniform(0.0, 0.6), log)
            assert utils.load_checkpoint(str(out / "checkpoint.pth"))["epoch"] >= 0  # never half-written
        subprocess.run(desd_command(root, str(out), *extra), cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    assert utils.load_checkpoint(str(out / "checkpoint.pth"))["epoch"] == 2
    assert not [f for f in os.listdir(out) if ".partial" in f]


def test_truncated_checkpoints_are_reported_and_the_newest_intact_one_is_used(patch_root, tmp_path, capsys):
    out = tmp_path / "out"
    one = ("--max_iters_per_epoch", "1")
    run_main_desd(["--data_path", patch_root, "--output_dir", str(out), *TINY_TRAIN_ARGS, "--epochs", "2", "--saveckp_freq", "1", *one])
    for name in ("checkpoint.pth", "checkpoint.prev.pth"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 3])
        os.utime(out / name)  # the damaged files are the newest
    capsys.readouterr()
    run_main_desd(["--data_path", patch_root, "--output_dir", str(out), *TINY_TRAIN_ARGS, "--epochs", "3", "--saveckp_freq", "1", *one])
    printed = capsys.readouterr().out
    assert "checkpoint.pth' is unreadable or truncated" in printed and "checkpoint.prev.pth' is unreadable" in printed
    assert "checkpoint0001.pth" in printed  # resumed from the newest intact one: after epoch 1
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1, 2]


def test_a_full_disk_at_a_checkpoint_write_stops_the_run_and_keeps_the_last_checkpoint(patch_root, tmp_path):
    out = tmp_path / "out"
    run_main_desd(["--data_path", patch_root, "--output_dir", str(out), *TINY_TRAIN_ARGS, "--epochs", "1"])
    before = (out / "checkpoint.pth").read_bytes()

    def fill_the_disk_at_50_mb():  # in the child: writes past 50 MB fail, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 2**20, resource.RLIM_INFINITY))

    run = subprocess.run(
        desd_command(patch_root, out, "--epochs", "2"), cwd=ROOT, capture_output=True, text=True, preexec_fn=fill_the_disk_at_50_mb
    )
    assert run.returncode != 0
    assert f"could not write {str(out / 'checkpoint.pth')!r}" in run.stderr and "The file already there is unchanged" in run.stderr
    assert (out / "checkpoint.pth").read_bytes() == before
    assert not [f for f in os.listdir(out) if ".partial" in f]
    subprocess.run(desd_command(patch_root, out, "--epochs", "2"), cwd=ROOT, check=True, capture_output=True)  # space freed: it goes on
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_corrupt_patch_stops_training_with_its_path_or_is_replaced_when_asked(tmp_path):
    root = write_patches(str(tmp_path / "data"), n=6)
    bad = os.path.join(root, "DL_patches_v2", sorted(os.listdir(os.path.join(root, "DL_patches_v2")))[2])
    with open(bad, "r+b") as f:
        f.truncate(200)
    with pytest.raises(RuntimeError, match=os.path.basename(bad)):
        run_main_desd(["--data_path", root, "--output_dir", str(tmp_path / "a"), *TINY_TRAIN_ARGS, "--epochs", "1"])
    run_main_desd(
        ["--data_path", root, "--output_dir", str(tmp_path / "b"), *TINY_TRAIN_ARGS, "--epochs", "2", "--skip_bad_patches", "True"]
    )
    log = [json.loads(line) for line in (tmp_path / "b" / "log.txt").read_text().splitlines()]
    assert [r["train_replaced_patches"] for r in log] == [1, 1]  # the one bad patch, every epoch


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_from_the_latest_checkpoint(tmp_path):
    root = write_patches(str(tmp_path / "data"), n=16)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--nnodes", "1",
           "main_desd.py", "--data_path", root, "--output_dir", str(out), *TINY_TRAIN_ARGS, "--epochs", "2", "--save_every_iters", "1"]  # fmt: skip
    started = time.time()
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        assert wait_for(lambda: (out / "checkpoint.pth").exists() and (out / "checkpoint.pth").stat().st_mtime > started)

        def workers():
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]

        assert wait_for(lambda: len(workers()) == 2)
        os.kill(workers()[1], signal.SIGKILL)  # one worker dies mid-run
        assert proc.wait(timeout=300) == 0
    text = (tmp_path / "run.log").read_text()
    assert "Resuming at epoch" in text or "=> resumed" in text
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 0


@pytest.mark.slow
def test_preprocessing_killed_at_random_points_and_rerun_equals_an_uninterrupted_run(tmp_path):
    from preprocessing import synthetic_deeplesion

    def prepare(root):
        synthetic_deeplesion.make_deeplesion(str(root), patients=3, size=192, seed=5, context_mm=12)

    scripts = ["DL_save_nifti.py", "re_spacing_ITK.py", "splitting_to_patches.py"]

    def run(root, script, kill_after=None):
        cmd = [sys.executable, "-m", f"preprocessing.{script.removesuffix('.py')}", "--data_root", str(root), "--workers", "2"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if kill_after is not None:
            time.sleep(kill_after)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    prepare(clean)
    prepare(killed)
    for script in scripts:
        assert run(clean, script) == 0
    rng = random.Random(2)
    for script in scripts:
        for _ in range(2):
            run(killed, script, kill_after=rng.uniform(0.3, 2.0))
        assert run(killed, script) == 0
    for folder in ("Images_nifti", "Images_nifti_spacing", "DL_patches_v2"):
        names = sorted(os.listdir(clean / folder))
        assert sorted(os.listdir(killed / folder)) == names  # no partial file survives
        for name in names:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(clean / folder / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(killed / folder / name)))
            assert np.array_equal(a, b), f"{folder}/{name}"
    assert (clean / "SSL_data_deeplesion.txt").read_text() == (killed / "SSL_data_deeplesion.txt").read_text()


@pytest.mark.parametrize("script", ["run_ssl.sh", "run_finetune.sh"])
def test_the_launch_scripts_pick_a_free_port_on_one_node_and_a_shared_one_on_several(script, tmp_path):
    fake = tmp_path / "python"  # runs the scripts' own python snippets; prints the torchrun command instead of running it
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "$@"; exit 0; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUTPUT_DIR": str(tmp_path / "out")}

    def port(**extra):
        out = subprocess.run(["sh", script], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, check=True).stdout
        return int(out.split("--master_port=")[1].split()[0])

    assert port() not in (29500, 29501) and port(MASTER_PORT="31234") == 31234
    assert port(NNODES="2") in (29500, 29501)
